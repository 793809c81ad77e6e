#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU, from a fresh clone (<= 10 minutes on one
# H100/H200-class GPU; the first gsplat kernel build is most of it):
#
#   bash scripts/gpu_check.sh [--out DIR] [--steps 3000] [--vae-source DIR] [--no-install]
#   bash scripts/gpu_check.sh --dry [--out DIR]      # CI: the same path on the CPU, tiny sizes
#
# 1. installs with the README's command (python3.11 -m venv .venv && .venv/bin/pip install -e ".[test]");
# 2. prints the versions of torch, CUDA and gsplat, and builds/loads gsplat's kernels;
# 3. scripts/check_cuda_render.py: gsplat vs our CPU rasterizer, outputs and gradients within 1e-4;
# 4. runs one tuning scene (lego) and one evaluation scene (fern) through every stage with the
#    paper's VAE path (diffusers-kl; random weights unless --vae-source) and short schedules,
#    with the latent fields at the paper preset's field settings for --steps iterations, GPU jobs
#    one at a time: fern's vanilla fit has the GPU to itself and its it/s is printed;
# 5. prints the report's table and leaves DIR/summary.json (its path is printed last).
# Needs the scenes and weights in ../shared (or LRF_SHARED). Exit status 0 iff every part passed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DRY=0; OUT=""; STEPS=""; VAE_SOURCE=""; INSTALL=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) DRY=1 ;;
    --out) OUT=$2; shift ;;
    --steps) STEPS=$2; shift ;;
    --vae-source) VAE_SOURCE=$2; shift ;;
    --no-install) INSTALL=0 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
[ "$DRY" = 1 ] && INSTALL=0   # CI has just installed; the dry run checks everything after that
OUT=${OUT:-results/gpu_check/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
: > "$OUT/phases.tsv"
mode=$([ "$DRY" = 1 ] && echo "dry (CPU, tiny)" || echo "GPU")
echo "gpu_check: $mode, output in $OUT"

phase() {  # phase NAME LOG COMMAND...: run (output to LOG, or the terminal for -), time, record
  local name=$1 log=$2; shift 2
  local t0; t0=$(date +%s)
  echo "== $name"
  if [ "$log" = - ]; then "$@"; else "$@" > "$log" 2>&1; fi
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$(( $(date +%s) - t0 ))" "$rc" >> "$OUT/phases.tsv"
  echo "== $name: $([ $rc = 0 ] && echo ok || echo "FAILED ($rc)") in $(( $(date +%s) - t0 )) s"
  return $rc
}

if [ "$INSTALL" = 1 ]; then
  phase install - bash -c 'python3.11 -m venv .venv && .venv/bin/pip install -q -e ".[test]"' || exit 1
  PY=$REPO/.venv/bin/python
else
  PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo "$REPO/.venv/bin/python" || command -v python )}
  echo "== install: skipped ($([ "$DRY" = 1 ] && echo "--dry" || echo "--no-install"); using $PY)"
fi
export PATH="$(dirname "$PY"):$PATH"

# Build gsplat's kernels for this GPU only (much faster than every architecture), once, before
# parallel jobs would race to build them.
if [ "$DRY" = 0 ] && [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null) && export TORCH_CUDA_ARCH_LIST=$arch
fi
gpu_args=$([ "$DRY" = 1 ] && echo "" || echo "--require")
phase versions - bash -c "'$PY' -m lrf.gpu $gpu_args > '$OUT/versions.json'"; rc_v=$?
"$PY" -c "
import json, sys
v = json.load(open(sys.argv[1]))
print(f\"  torch {v['torch']} (CUDA {v['torch_cuda']}), driver CUDA {v.get('driver_cuda')}, \"
      f\"device {v.get('device', 'none')}, gsplat {v['gsplat']}\" + (f\", kernels: {v['gsplat_kernels']}\" if 'gsplat_kernels' in v else ''))
" "$OUT/versions.json" 2>/dev/null
[ "$DRY" = 0 ] && [ $rc_v != 0 ] && { "$PY" scripts/gpu_check.py summary --out "$OUT"; echo "summary: $OUT/summary.json"; exit 1; }

dry_flag=$([ "$DRY" = 1 ] && echo "--dry --repeats 1" || echo "")
phase render_check "$OUT/render_check.log" "$PY" scripts/check_cuda_render.py $dry_flag --json "$OUT/render_check.json"
"$PY" -c "
import json, sys
d = json.load(open(sys.argv[1]))
for s in d.get('scenes', []):
    g = max(v for v in s['grad_rel'].values() if v is not None)
    print(f\"  {s['n']} Gaussians, {s['channels']} ch, {s['width']}x{s['height']}: image {s['image_max_abs']:.1e}, \"
          f\"alpha {s['alpha_max_abs']:.1e}, grad (rel) {g:.1e} {'ok' if s['ok'] else 'FAIL'}\")
print('  ' + (d.get('error') or ('all within %g' % d['tol'] if d.get('ok') else 'NOT within tolerance')))
" "$OUT/render_check.json" 2>/dev/null || tail -5 "$OUT/render_check.log"

prep_args=(--out "$OUT")
[ "$DRY" = 1 ] && prep_args+=(--dry)
[ -n "$STEPS" ] && prep_args+=(--steps "$STEPS")
[ -n "$VAE_SOURCE" ] && prep_args+=(--vae-source "$VAE_SOURCE")
phase config "$OUT/config.log" "$PY" scripts/gpu_check.py prepare "${prep_args[@]}"
if [ "$DRY" = 1 ]; then res=(--cores 2); else res=(--cores "$(nproc)" --resources gpu=1); fi
mkdir -p "$OUT/run"
phase workflow "$OUT/workflow.log" "$(dirname "$PY")/snakemake" --snakefile "$REPO/Snakefile" \
  --directory "$OUT/run" --configfile "$OUT/config.yaml" "${res[@]}" --rerun-incomplete \
  results/report/summary.json || { grep -E '^ERROR|Error in rule' "$OUT/workflow.log" | head -20; tail -20 "$OUT/workflow.log"; }

echo "== report"
"$PY" scripts/gpu_check.py summary --out "$OUT" $([ "$DRY" = 1 ] && echo --dry); rc=$?
echo "summary: $OUT/summary.json"
exit $rc
