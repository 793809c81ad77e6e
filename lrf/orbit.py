"""Render a fitted field along an orbit of novel views, decode latents, write an animation.

    python -m lrf.orbit --scene results/D/S/prepared/scene.json --field results/D/S/fields/vanilla/field.safetensors \
        --kind latent --vae '{...}' --weights-dir W --frames 48 --out results/D/S/orbit/vanilla.webp
"""
from __future__ import annotations

from pathlib import Path

import torch

from lrf.scene.model import Scene


@torch.no_grad()
def orbit_frames(scene: Scene, field, kind: str, n_frames: int, vae=None, background=None, rgb_downscale: int = 1,
                 backend: str = "auto"):
    from lrf.field import orbit_path, render_at

    cam = scene.cameras[scene.train[0] if scene.train else 0]
    k = vae.downscale if kind == "latent" else rgb_downscale
    frames = []
    for w2c in orbit_path(scene, n_frames):
        out = render_at(field, cam, k, background, backend, w2c=w2c)
        img = out.image.permute(2, 0, 1)[None]
        if kind == "latent":
            img = vae.decode(img)
        elif k != 1:
            img = torch.nn.functional.interpolate(img, size=(cam.height, cam.width), mode="bilinear",
                                                  align_corners=False)
        frames.append(img[0].clamp(0, 1).permute(1, 2, 0).float().cpu().numpy())
    return frames


def main(argv=None) -> int:
    from lrf.cli import run_main, start_step, step_parser

    ap = step_parser(__doc__, vae="optional", renders=True)
    ap.add_argument("--field", required=True, type=Path)
    ap.add_argument("--kind", choices=["latent", "rgb"], required=True)
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--rgb-downscale", type=int, default=1)
    args = ap.parse_args(argv)

    def go():
        from lrf.field import field_background, load_field, write_video
        from lrf.vae.factory import load_vae

        scene = Scene.load(args.scene)
        step = start_step(args, who=scene.key, renders=True)
        field = load_field(args.field, step.device)
        vae = load_vae(step.spec, args.weights_dir, str(step.device)) if args.kind == "latent" else None
        frames = orbit_frames(scene, field, args.kind, args.frames, vae, field_background(args.field, field.channels),
                              args.rgb_downscale, step.backend)
        path = write_video(frames, args.out, fps=12)
        return f"{scene.key}: orbit of {len(frames)} frames -> {path}"

    return run_main(go)


if __name__ == "__main__":
    raise SystemExit(main())
