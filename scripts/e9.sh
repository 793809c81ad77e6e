#!/usr/bin/env bash
# One arm of docs/experiments.md E9 (issue 18: latents a field can hold), on a results folder with
# prepared scenes, correspondences and pretrained latents of the eight scenes below.
#   bash scripts/e9.sh stage1 RESULTS OUT NAME '{"tune_decoder": true, "w_shift_avg": 1}'
#       stage 1 on the tuning scenes (training views only): OUT/NAME/{encoder,decoder}.safetensors,
#       consistency.json (tuning scenes; E9_MEASURE_IN_STAGE1=1 adds the unseen ones)
#   bash scripts/e9.sh fields RESULTS OUT NAME [SCENES]
#       the arm's encoder -> encode -> `enc` field (config.yaml's field.latent) -> evaluate with the
#       arm's decoder, per unseen scene (OUT/NAME/fields/<scene>/eval/metrics.json)
#   bash scripts/e9.sh measure RESULTS OUT NAME [SCENES]
#       plain and shift-averaged ceilings of the arm's autoencoder on the unseen scenes' held-out
#       views (OUT/NAME/shift_unseen.json)
#   bash scripts/e9.sh vanilla RESULTS OUT [SCENES]
#       the baseline: `vanilla` fields on RESULTS' pretrained latents (OUT/vanilla/...)
#   bash scripts/e9.sh redecode RESULTS OUT NAME [SCENES]
#       OUT/vanilla's fields decoded by the arm's decoder (no refit: what the decoder alone adds)
# Every step runs on one thread; seed 0.
set -euo pipefail
[ -n "${VIRTUAL_ENV:-}" ] || . /work/main/.venv/bin/activate
mode=$1; res=$2; out=$3
tune="nerf_synthetic/lego instant-ngp/fox nerd/statue-of-liberty llff/flower nerf_synthetic/mic"
unseen="llff/fern strecha/herz-jesu-p25 nerd/mary-rose"
weights="${LRF_SHARED:-../shared}/weights"
base='"kind":"taef2","source":"{weights}/taef2"'
fcfg=$(python -c 'import json,yaml; print(json.dumps(yaml.safe_load(open("config/config.yaml"))["field"]["latent"]))')
fit_eval() {  # scene latents spec dir method
  python -m lrf.fit --scene "$res/$1/prepared/scene.json" --targets latents "$2" --cfg "$fcfg" \
    --seed 0 --threads 1 --out "$4/field" >> "$4/log.txt" 2>&1
  python -m lrf.evaluate --scene "$res/$1/prepared/scene.json" --kind latent --method "$5" \
    --field "$4/field/field.safetensors" --vae "$3" --weights-dir "$weights" --lpips alex --threads 1 \
    --out "$4/eval" 2>&1 | tail -n 1
}
case $mode in
  stage1)
    name=$4; extra=${5:-"{}"}; args=()
    for s in $tune; do args+=(--scene "$res/$s/prepared/scene.json" --corr "$res/$s/correspondences"); done
    if [ -n "${E9_MEASURE_IN_STAGE1:-}" ]; then  # else: `measure` afterwards (no "before" pass per arm)
      for s in $unseen; do args+=(--measure-scene "$res/$s/prepared/scene.json" --measure-corr "$res/$s/correspondences"); done
    fi
    cfg=$(python -c 'import json,sys; d={"steps":200,"batch":2,"crop":96,"checkpoint_every":50,"log_every":25,"shift_measure":"measure"}; d.update(json.loads(sys.argv[1])); print(json.dumps(d))' "$extra")
    mkdir -p "$out/$name"; echo "$cfg" > "$out/$name/cfg.json"
    /usr/bin/time -f "%e s wall" python -m lrf.finetune.stage1 --vae "{$base}" --weights-dir "$weights" "${args[@]}" \
      --cfg "$cfg" --seed 0 --threads 1 --out "$out/$name" > "$out/$name/log.txt" 2>&1
    tail -n 2 "$out/$name/log.txt" ;;
  fields)
    name=$4; scenes=${5:-$unseen}
    spec="{$base,\"encoder\":\"$out/$name/encoder.safetensors\",\"decoder\":\"$out/$name/decoder.safetensors\"}"
    for s in $scenes; do
      d="$out/$name/fields/$s"; mkdir -p "$d"
      python -m lrf.encode --scene "$res/$s/prepared/scene.json" --vae "$spec" --weights-dir "$weights" --threads 1 \
        --out "$d/latents.safetensors" > "$d/log.txt" 2>&1
      fit_eval "$s" "$d/latents.safetensors" "$spec" "$d" enc
    done ;;
  measure)
    name=$4; scenes=${5:-$unseen}; sj=()
    for s in $scenes; do sj+=("$res/$s/prepared/scene.json"); done
    spec="{$base,\"encoder\":\"$out/$name/encoder.safetensors\",\"decoder\":\"$out/$name/decoder.safetensors\"}"
    python -m lrf.vae.shift --vae "$spec" --weights-dir "$weights" --scene "${sj[@]}" --out "$out/$name/shift_unseen.json" ;;
  vanilla)
    scenes=${4:-$unseen}
    for s in $scenes; do
      d="$out/vanilla/fields/$s"; mkdir -p "$d"
      fit_eval "$s" "$res/$s/latents/taef2.safetensors" "{$base}" "$d" vanilla
    done ;;
  redecode)
    name=$4; scenes=${5:-$unseen}
    spec="{$base,\"decoder\":\"$out/$name/decoder.safetensors\"}"
    for s in $scenes; do
      d="$out/$name/redecode/$s"; mkdir -p "$d"
      python -m lrf.evaluate --scene "$res/$s/prepared/scene.json" --kind latent --method vanilla+dec \
        --field "$out/vanilla/fields/$s/field/field.safetensors" --vae "$spec" --weights-dir "$weights" \
        --lpips alex --threads 1 --out "$d" 2>&1 | tail -n 1
    done ;;
  *) echo "stage1 | measure | fields | vanilla | redecode" >&2; exit 2 ;;
esac
