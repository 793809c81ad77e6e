#!/usr/bin/env bash
# Transfer against the number of tuning scenes (issue 19): the cross-dataset preset with only its
# first N tuning scenes (lego, fox, statue-of-liberty, flower, mic, temple, in that order), same
# seeds, scored on the preset's unseen scenes (fern, Herz-Jesu, mary-rose) with vanilla, enc, dec,
# full and the VAE ceiling. Each N runs in its own folder OUT/tune-N, a copy of the workflow
# seeded (hard links) with SEED's per-scene SfM, prepared images, correspondences, pretrained
# latents and vanilla fields, so only what depends on the tuning set runs again (stages 1 and 3,
# the tuned encoder's latents and fields, the evaluations).
#   bash scripts/transfer.sh SEED_RESULTS OUT N [N ...] [-- extra snakemake args]
# SEED_RESULTS: a results/ folder holding those per-scene outputs (e.g. a cross-dataset run's).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
seed=$(cd "$1" && pwd); out=$2; shift 2
ns=(); while [ $# -gt 0 ] && [ "$1" != -- ]; do ns+=("$1"); shift; done; [ "${1:-}" = -- ] && shift
tune=(nerf_synthetic/lego instant-ngp/fox nerd/statue-of-liberty llff/flower nerf_synthetic/mic
      middlebury/temple-sparse-ring)
eval=(llff/fern strecha/herz-jesu-p25 nerd/mary-rose)
list() { local IFS=,; echo "[$*]"; }
for n in "${ns[@]}"; do
  wf="$out/tune-$n"; mkdir -p "$wf/results"
  for p in Snakefile workflow config envs; do rm -rf "${wf:?}/$p"; cp -r "$repo/$p" "$wf/$p"; done
  for key in "${tune[@]:0:$n}" "${eval[@]}"; do
    for part in sfm prepared correspondences latents/taef2.safetensors fields/vanilla; do
      src="$seed/$key/$part"; dst="$wf/results/$key/$part"
      [ -e "$src" ] && [ ! -e "$dst" ] && { mkdir -p "$(dirname "$dst")"; cp -al "$src" "$dst"; }
    done
  done
  echo "== tune-$n: ${tune[*]:0:$n}"
  (cd "$wf" && /usr/bin/time -f "tune-$n: %e s wall" snakemake --cores 2 --rerun-triggers mtime \
     --configfile config/presets/cross-dataset.yaml \
     --config "select=$(list "${eval[@]}")" "protocol={tune: $(list "${tune[@]:0:$n}"), eval: $(list "${eval[@]}")}" \
              "methods=[vae-ceiling,vanilla,enc,dec,full]" "orbit={methods: []}" "$@" -- report \
     > "$wf/snakemake.log" 2>&1) || { echo "tune-$n failed: see $wf/snakemake.log"; tail -n 5 "$wf/snakemake.log"; }
  tail -n 1 "$wf/snakemake.log"
done
