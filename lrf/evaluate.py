"""Held-out evaluation: render each test view, decode latents, score against the photo.

Three kinds share one code path so their numbers are comparable:
- `latent`: a latent field rendered at 1/8 resolution, decoded by the VAE;
- `rgb`: an RGB field rendered at the working resolution (the RGB-3DGS baseline);
- `ceiling`: no field, decode(encode(photo)) (the VAE's own limit); its views also get
  `psnr_shift`, the shift-averaged ceiling (lrf.vae.shift: what survives a field's averaging).

    python -m lrf.evaluate --scene results/D/S/prepared/scene.json --kind latent --method vanilla \
        --field results/D/S/fields/vanilla/field.safetensors --vae '{...}' --weights-dir W --out results/D/S/eval/vanilla

Writes metrics.json (quality only: the same config and seed give the same bytes, so two runs can
be compared with a checksum) and timing.json beside it (render and decode milliseconds, and the
field's fitting seconds: wall-clock numbers that differ on every run).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from lrf.field.io import field_background, render_at
from lrf.io import atomic_write_json
from lrf.scene.images import save_png
from lrf.scene.model import Scene

TRAIN_VIEWS = 8  # training views scored per scene for the fit-vs-generalisation diagnosis


@torch.no_grad()
def predict(scene: Scene, i: int, kind: str, vae=None, field=None, background=None, backend: str = "auto",
            rgb_downscale: int = 1) -> tuple[torch.Tensor, float | None]:
    """([1,3,H,W] image in [0,1], render ms) of view i: the one way every method makes a picture."""
    cam = scene.cameras[i]
    t0 = time.perf_counter()
    render_ms = None
    if kind == "ceiling":
        photo = torch.from_numpy(scene.load_image(i)).permute(2, 0, 1)[None]
        pred = vae.decode(vae.encode(photo))
    elif kind == "latent":
        out = render_at(field, cam, vae.downscale, background, backend)
        render_ms = (time.perf_counter() - t0) * 1e3
        pred = vae.decode(out.image.permute(2, 0, 1)[None])
    elif kind == "rgb":
        k = rgb_downscale
        out = render_at(field, cam, k, background, backend)
        render_ms = (time.perf_counter() - t0) * 1e3
        pred = out.image.permute(2, 0, 1)[None].clamp(0, 1)
        if k != 1:  # a field fitted at 1/k is scored at the photo's size, upsampled
            pred = torch.nn.functional.interpolate(pred, size=(cam.height, cam.width), mode="bilinear",
                                                   align_corners=False)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return pred.clamp(0, 1).float().cpu(), render_ms  # scored on the CPU, whatever rendered it


def diagnosis_views(scene: Scene, n: int = TRAIN_VIEWS) -> list[int]:
    """Up to n training views, evenly spread: where the field's FIT is measured (not generalisation)."""
    train = scene.train
    if len(train) <= n:
        return list(train)
    return [train[int(k)] for k in np.linspace(0, len(train) - 1, n).round()]


@torch.no_grad()
def evaluate(scene: Scene, kind: str, out_dir: Path, vae=None, field=None, background=None,
             lpips_nets: dict | None = None, backend: str = "auto", save_renders: bool = True,
             rgb_downscale: int = 1) -> tuple[dict, dict]:
    """(metrics, timing): scores per test view and their means, and the wall-clock times apart.

    metrics["train"] scores a few TRAINING views the same way (PSNR, SSIM): a field that is poor
    there does not fit what it was given; one good there but poor on held-out views does not
    generalise. The report puts the two side by side per scene.
    """
    from lrf.metrics import psnr, ssim
    from lrf.vae.shift import shift_ceiling_view

    out_dir = Path(out_dir)
    views, times = [], []
    for i in scene.test:
        cam = scene.cameras[i]
        photo = torch.from_numpy(scene.load_image(i)).permute(2, 0, 1)[None]
        t0 = time.perf_counter()
        pred, render_ms = predict(scene, i, kind, vae, field, background, backend, rgb_downscale)
        total_ms = (time.perf_counter() - t0) * 1e3
        row = {"view": cam.name, "psnr": psnr(pred, photo), "ssim": ssim(pred, photo)}
        if kind == "ceiling":   # what survives a field's averaging over sub-cell offsets (lrf.vae.shift)
            row["psnr_shift"] = shift_ceiling_view(vae, photo)["shift"]
        times.append({"view": cam.name, "render_ms": render_ms, "total_ms": total_ms})
        for net, model in (lpips_nets or {}).items():
            row[f"lpips_{net}"] = float(model(pred, photo).mean())
        views.append(row)
        if save_renders:
            save_png(out_dir / "renders" / (Path(cam.name.replace("/", "__")).stem + ".png"),
                     pred[0].permute(1, 2, 0).numpy())
    train_rows = []
    for i in diagnosis_views(scene):
        photo = torch.from_numpy(scene.load_image(i)).permute(2, 0, 1)[None]
        pred, _ = predict(scene, i, kind, vae, field, background, backend, rgb_downscale)
        train_rows.append({"view": scene.cameras[i].name, "psnr": psnr(pred, photo), "ssim": ssim(pred, photo)})
    metrics = {"scene": scene.key, "views": len(views), "mean": _means(views), "per_view": views,
               "train": {"views": len(train_rows), "mean": _means(train_rows), "per_view": train_rows}}
    timing = {"scene": scene.key, "views": len(times), "mean": _means(times), "per_view": times}
    return metrics, timing


def _means(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k != "view" and rows[0][k] is not None] if rows else []
    return {k: float(np.mean([v[k] for v in rows])) for k in keys}


def main(argv=None) -> int:
    from lrf.cli import InputError, run_main, start_step, step_parser

    ap = step_parser(__doc__, vae="optional", renders=True)
    ap.add_argument("--kind", required=True, choices=["latent", "rgb", "ceiling"])
    ap.add_argument("--method", required=True)
    ap.add_argument("--field", type=Path, default=None)
    ap.add_argument("--lpips", default="alex,vgg")
    ap.add_argument("--rgb-downscale", type=int, default=1, help="the RGB field was fitted at 1/k resolution")
    args = ap.parse_args(argv)

    def go():
        from lrf.metrics import load_lpips
        from lrf.vae.factory import load_vae

        torch.manual_seed(0)
        scene = Scene.load(args.scene)
        if not scene.test:
            raise InputError(f"{scene.key}: {args.scene}: no test views")
        if args.weights_dir is None:
            raise InputError(f"{scene.key}: --weights-dir is needed (LPIPS backbones)")
        step = start_step(args, who=scene.key, renders=args.kind != "ceiling")
        dev = step.device
        vae = load_vae(step.spec, args.weights_dir, str(dev)) if args.kind != "rgb" else None
        field, bg, fit_info, fit_time = None, None, {}, {}
        if args.kind != "ceiling":
            from lrf.field import load_field

            field = load_field(args.field, dev)
            bg = field_background(args.field, field.channels)
            meta_path = args.field.with_suffix(".json")
            if meta_path.exists():
                m = json.loads(meta_path.read_text())
                fit_info = {k: m.get(k) for k in ("steps", "num_gaussians", "final_loss") if k in m}
                fit_time = {k: m.get(k) for k in ("seconds",) if k in m}
        nets = {n: load_lpips(n, args.weights_dir) for n in args.lpips.split(",") if n}
        res, timing = evaluate(scene, args.kind, args.out, vae, field, bg, nets, backend=step.backend or "auto",
                               rgb_downscale=args.rgb_downscale)
        who = {"method": args.method, "kind": args.kind, "dataset": scene.dataset, "scene_name": scene.name}
        res.update({**who, "fit": fit_info, "rgb_downscale": args.rgb_downscale if args.kind == "rgb" else None,
                    "width": scene.cameras[0].width, "height": scene.cameras[0].height})
        timing.update({**who, "fit": fit_time, "threads": args.threads, "device": dev.type, "backend": step.backend})
        # timing first: a kill between the two leaves no metrics.json, so the step reruns whole
        atomic_write_json(args.out / "timing.json", timing)
        atomic_write_json(args.out / "metrics.json", res)
        m = res["mean"]
        return (f"{scene.key}: {args.method}: PSNR {m['psnr']:.2f} SSIM {m['ssim']:.3f} "
                + " ".join(f"LPIPS-{n} {m['lpips_' + n]:.3f}" for n in nets) + f" over {res['views']} test views")

    return run_main(go)


if __name__ == "__main__":
    raise SystemExit(main())
