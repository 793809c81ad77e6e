#!/usr/bin/env bash
# One arm of the per-scene alignment A/B (docs/experiments.md E10) on the three unseen scenes:
# lrf.align from each scene's `vanilla` field and the pretrained TAEF2 decoder (`vanilla-ps`),
# shipped and scored at each of SNAPSHOTS steps from one run configured for MAX steps
# (scripts/align_arms.py; a later call with longer snapshots continues the same run).
#   bash scripts/align_ab.sh RESULTS FIELDS OUT NAME '{"w_lpips": 0.1}' 300 [2000]
# RESULTS: a results/ folder with the prepared scenes; FIELDS: <FIELDS>/<dataset>/<scene>/field/
# field.safetensors, the fitted vanilla fields. One thread, one scene at a time.
set -euo pipefail
res=$1; fields=$2; out=$3; name=$4; cfg=${5:-"{}"}; snaps=${6:-300}; max=${7:-2000}
weights="${LRF_SHARED:-../shared}/weights"
vae='{"kind":"taef2","source":"{weights}/taef2"}'
for s in llff/fern strecha/herz-jesu-p25 nerd/mary-rose; do
  d="$out/$name/$s"; mkdir -p "$d"
  python scripts/align_arms.py --scene "$res/$s/prepared/scene.json" --field "$fields/$s/field/field.safetensors" \
    --vae "$vae" --weights-dir "$weights" --cfg "$cfg" --snapshots "$snaps" --max-steps "$max" --out "$d" \
    >> "$d/log.txt" 2>&1
  grep -E "^$s " "$d/log.txt" | tail -n "$(echo "$snaps" | tr ',' '\n' | wc -l)"
done
