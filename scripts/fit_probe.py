"""Experiment probe: fit one latent field with given FieldConfig overrides and report how well it
FITS (decoded PSNR at training views, latent loss) and GENERALISES (held-out PSNR, LPIPS-alex).

    python scripts/fit_probe.py --scene results/llff/fern/prepared/scene.json \
        --latents results/llff/fern/latents/taef2.safetensors --cfg '{"steps": 2000, "eps2d": 0.1}' \
        --out /tmp/probe/fern-a --tag a

Prints one JSON line. Used for the field-fit experiments of docs/experiments.md (E7); held-out
views never reach the fit (lrf.fit.build_targets takes training views only).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scene", required=True, type=Path)
    ap.add_argument("--latents", required=True, type=Path)
    ap.add_argument("--cfg", default="{}")
    ap.add_argument("--weights", type=Path, default=Path("../shared/weights"))
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    torch.set_num_threads(1)
    from lrf.evaluate import diagnosis_views, predict
    from lrf.field import fit_field
    from lrf.field.io import field_background
    from lrf.fit import build_targets, field_config
    from lrf.metrics import LPIPS, psnr
    from lrf.scene.model import Scene
    from lrf.vae.factory import load_vae

    scene = Scene.load(args.scene)
    targets = build_targets(scene, "latents", args.latents)
    over = {"log_every": 500, "checkpoint_every": 0, "background": "mean", **json.loads(args.cfg),
            "backend": "cpu", "device": "cpu"}
    cfg = field_config(over, rgb=False, seed=0)
    t0 = time.time()
    res = fit_field(scene, targets, cfg, args.out, progress=False)
    fit_s = time.time() - t0
    vae = load_vae({"name": "taef2", "kind": "taef2", "source": str(args.weights / "taef2")}, args.weights)
    lp = LPIPS("alex", args.weights / "lpips")
    bg = field_background(args.out / "field.safetensors", 0)

    def score(ids):
        ps, ls = [], []
        for i in ids:
            photo = torch.from_numpy(scene.load_image(i)).permute(2, 0, 1)[None]
            pred, _ = predict(scene, i, "latent", vae, res.field, bg, "cpu")
            ps.append(psnr(pred, photo))
            ls.append(float(lp(pred, photo).mean()))
        return sum(ps) / len(ps), sum(ls) / len(ls), ps

    tr = score(diagnosis_views(scene))
    te = score(scene.test)
    print(json.dumps({"tag": args.tag, "scene": scene.key, "train_psnr": round(tr[0], 2),
                      "test_psnr": round(te[0], 2), "test_lpips": round(te[1], 3),
                      "test_per_view": [round(p, 2) for p in te[2]],
                      "loss": [res.initial_loss, res.final_loss], "n": res.field.num_gaussians,
                      "fit_s": round(fit_s)}), flush=True)


if __name__ == "__main__":
    main()
