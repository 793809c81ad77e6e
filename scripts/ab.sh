#!/usr/bin/env bash
# One arm of a stage-1 or stage-3 A/B on the cross-dataset preset's scenes, same seed and
# schedule as the preset (stage 1: 250 steps, stage 3: 300; batch 2, 96 px crops): tuned on
# lego / fox / statue-of-liberty, measured on fern / Herz-Jesu / mary-rose (never trained on).
#   bash scripts/ab.sh stage1 RESULTS OUT NAME '{"corr_loss": "ratio"}'
#   bash scripts/ab.sh stage3 RESULTS OUT NAME '{"w_lpips": 0.1}'
#   bash scripts/ab.sh fields RESULTS OUT NAME   (after `stage1 ... NAME`: the arm's encoder through
#       encode -> `enc` field (config.yaml's field.latent) -> evaluate on the measured scenes)
# RESULTS: the results/ folder of a cross-dataset run (prepared scenes, correspondences, and for
# stage 3 the stage-1 encoder and the `enc` fields). Stage 3 then scores `full` (enc field +
# the new decoder) on the held-out views of the measured scenes with lrf.evaluate.
set -euo pipefail
stage=$1; res=$2; out=$3; name=$4; extra=${5:-"{}"}
tune="nerf_synthetic/lego instant-ngp/fox nerd/statue-of-liberty"
eval="llff/fern strecha/herz-jesu-p25 nerd/mary-rose"
weights="${LRF_SHARED:-../shared}/weights"
enc="$res/vae/taef2/stage1/encoder.safetensors"
if [ "$stage" = fields ]; then
  fcfg=$(python -c 'import json,yaml; print(json.dumps(yaml.safe_load(open("config/config.yaml"))["field"]["latent"]))')
  spec="{\"kind\":\"taef2\",\"source\":\"{weights}/taef2\",\"encoder\":\"$out/$name/encoder.safetensors\"}"
  for s in $eval; do
    d="$out/$name/fields/$s"; mkdir -p "$d"
    python -m lrf.encode --scene "$res/$s/prepared/scene.json" --vae "$spec" --weights-dir "$weights" --threads 1 \
      --out "$d/latents.safetensors" > "$d/log.txt" 2>&1
    python -m lrf.fit --scene "$res/$s/prepared/scene.json" --targets latents "$d/latents.safetensors" --cfg "$fcfg" \
      --seed 0 --threads 1 --out "$d/enc" >> "$d/log.txt" 2>&1
    python -m lrf.evaluate --scene "$res/$s/prepared/scene.json" --kind latent --method enc --field "$d/enc/field.safetensors" \
      --vae "$spec" --weights-dir "$weights" --lpips alex --threads 1 --out "$d/eval" 2>&1 | tail -n 1
  done
  exit 0
fi
case $stage in
  stage1) pair=corr; steps=250; vae='{"kind":"taef2","source":"{weights}/taef2"}';
          what() { echo "$res/$1/correspondences"; } ;;
  stage3) pair=field; steps=300; vae="{\"kind\":\"taef2\",\"source\":\"{weights}/taef2\",\"encoder\":\"$enc\"}";
          what() { echo "$res/$1/fields/enc/field.safetensors"; } ;;
  *) echo "stage1 or stage3" >&2; exit 2 ;;
esac
args=()
for s in $tune; do args+=(--scene "$res/$s/prepared/scene.json" --$pair "$(what $s)"); done
for s in $eval; do args+=(--measure-scene "$res/$s/prepared/scene.json" --measure-$pair "$(what $s)"); done
cfg=$(python -c 'import json,sys; d={"steps":int(sys.argv[2]),"batch":2,"crop":96,"checkpoint_every":50,"log_every":25}; d.update(json.loads(sys.argv[1])); print(json.dumps(d))' "$extra" $steps)
mkdir -p "$out/$name"
/usr/bin/time -f "%e s wall" python -m lrf.finetune.$stage --vae "$vae" --weights-dir "$weights" "${args[@]}" \
  --cfg "$cfg" --seed 0 --threads 1 --out "$out/$name" > "$out/$name/log.txt" 2>&1
tail -n 2 "$out/$name/log.txt"
if [ "$stage" = stage3 ]; then
  spec="{\"kind\":\"taef2\",\"source\":\"{weights}/taef2\",\"encoder\":\"$enc\",\"decoder\":\"$out/$name/decoder.safetensors\"}"
  for s in $eval; do
    python -m lrf.evaluate --scene "$res/$s/prepared/scene.json" --kind latent --method full \
      --field "$res/$s/fields/enc/field.safetensors" --vae "$spec" --weights-dir "$weights" --lpips alex \
      --threads 1 --out "$out/$name/eval/$s" 2>&1 | tail -n 1
  done
fi
