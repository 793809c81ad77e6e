"""Fit one field for one scene: latent targets (from the encode cache) or RGB photos.

    python -m lrf.fit --scene results/D/S/prepared/scene.json --targets latents results/D/S/latents/taef2.safetensors \
        --cfg '{"iterations": 2000}' --out results/D/S/fields/vanilla
    python -m lrf.fit --scene ... --targets rgb --cfg '{...}' --out results/D/S/fields/rgb-3dgs
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lrf.errors import InputError
from lrf.scene.model import Scene
from lrf.settings import FieldConfig, check_overrides


def downscale_image(img: torch.Tensor, k: int) -> torch.Tensor:
    """[C,H,W] -> [C,H/k,W/k] by area averaging; the fit scales K by the same exact factor."""
    if k == 1:
        return img
    return torch.nn.functional.avg_pool2d(img[None], k)[0].contiguous()


def build_targets(scene: Scene, kind: str, latents: Path | None, downscale: int = 1) -> dict[int, torch.Tensor]:
    """{camera index: [C, h, w]} for the training views only (test views never reach a fit).

    RGB targets may be downscaled by an integer factor: a CPU cannot fit full-resolution colour
    fields in the demo's time (the rasteriser's cost grows with pixels x splat area).
    """
    if kind == "rgb":
        return {i: downscale_image(torch.from_numpy(scene.load_image(i)).permute(2, 0, 1), downscale)
                for i in scene.train}
    from lrf.encode import load_latents

    lat, _ = load_latents(latents)
    missing = [scene.cameras[i].name for i in scene.train if scene.cameras[i].name not in lat]
    if missing:
        raise InputError(f"{scene.key}: {latents}: no latents for {', '.join(missing[:5])}")
    return {i: lat[scene.cameras[i].name] for i in scene.train}


def field_config(overrides: dict, rgb: bool, seed: int):
    check_overrides(FieldConfig, overrides)  # names and types (the workflow checked them before the DAG)
    return FieldConfig(**{**overrides, "rgb": rgb, "seed": seed})


def main(argv=None) -> int:
    from lrf.cli import run_main

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scene", required=True, type=Path)
    ap.add_argument("--targets", nargs="+", required=True, help="'rgb' or 'latents PATH'")
    ap.add_argument("--cfg", default="{}", help="JSON overrides of lrf.field.FieldConfig")
    ap.add_argument("--downscale", type=int, default=1, help="RGB fields: fit at 1/k of the working resolution")
    ap.add_argument("--init", default="points", choices=["points", "random"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default=None, help="rasterizer (lrf.gpu): auto | cpu | gsplat (default: --cfg's, auto)")
    ap.add_argument("--device", default=None, help="auto | cpu | cuda (cuda: a GPU job; fail without one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)

    def go():
        from lrf.field import fit_field
        from lrf.gpu import select

        torch.set_num_threads(args.threads)
        kind = args.targets[0]
        scene = Scene.load(args.scene)
        over = json.loads(args.cfg)
        over.update({k: v for k, v in (("backend", args.backend), ("device", args.device)) if v is not None})
        backend, dev = select(over.get("backend", "auto"), over.get("device", "auto"), who=scene.key)
        over.update(backend=backend, device=str(dev))  # resolved once, before any work
        targets = build_targets(scene, kind, Path(args.targets[1]) if kind == "latents" else None, args.downscale)
        cfg = field_config(over, rgb=(kind == "rgb"), seed=args.seed)
        res = fit_field(scene, targets, cfg, args.out, init=args.init, progress=True)
        return (f"{scene.key}: fitted {kind} field, {res.field.num_gaussians} Gaussians, {res.steps} steps, "
                f"loss {res.initial_loss} -> {res.final_loss}, {res.seconds:.0f} s "
                f"({res.steps / max(res.seconds, 1e-9):.1f} it/s on {dev.type} with {backend})")

    return run_main(go)


if __name__ == "__main__":
    raise SystemExit(main())
