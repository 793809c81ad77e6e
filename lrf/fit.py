"""Fit one field for one scene: latent targets (from the encode cache) or RGB photos.

    python -m lrf.fit --scene results/D/S/prepared/scene.json --targets latents results/D/S/latents/taef2.safetensors \
        --cfg '{"steps": 2000}' --out results/D/S/fields/vanilla
    python -m lrf.fit --scene ... --targets rgb --cfg '{...}' --out results/D/S/fields/rgb-3dgs
"""
from __future__ import annotations

from pathlib import Path

import torch

from lrf.errors import InputError
from lrf.scene.model import Scene
from lrf.settings import FieldConfig


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


def main(argv=None) -> int:
    from lrf.cli import run_main, start_step, step_parser

    ap = step_parser(__doc__, cfg="lrf.settings.FieldConfig", renders=True)
    ap.add_argument("--targets", nargs="+", required=True, help="'rgb' or 'latents PATH'")
    ap.add_argument("--downscale", type=int, default=1, help="RGB fields: fit at 1/k of the working resolution")
    ap.add_argument("--init", default="points", choices=["points", "random"])
    args = ap.parse_args(argv)

    def go():
        from lrf.field import fit_field

        kind = args.targets[0]
        scene = Scene.load(args.scene)
        step = start_step(args, who=scene.key, renders=True)
        targets = build_targets(scene, kind, Path(args.targets[1]) if kind == "latents" else None, args.downscale)
        cfg = step.config(FieldConfig, rgb=kind == "rgb")
        res = fit_field(scene, targets, cfg, args.out, init=args.init, progress=True)
        return (f"{scene.key}: fitted {kind} field, {res.field.num_gaussians} Gaussians, {res.steps} steps, "
                f"loss {res.initial_loss} -> {res.final_loss}, {res.seconds:.0f} s "
                f"({res.steps / max(res.seconds, 1e-9):.1f} it/s on {step.device.type} with {step.backend})")

    return run_main(go)


if __name__ == "__main__":
    raise SystemExit(main())
