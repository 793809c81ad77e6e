"""Encode every image of a scene once and cache the latents (safetensors, one tensor per view).

    python -m lrf.encode --scene results/D/S/prepared/scene.json --vae '{"kind":"taef2","source":"{weights}/taef2"}' \
        --weights-dir ../shared/weights --out results/D/S/latents/taef2.safetensors
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from lrf.io import atomic_path
from lrf.scene.model import Scene


@torch.no_grad()
def encode_scene(scene: Scene, vae, batch: int = 1) -> dict[str, torch.Tensor]:
    out = {}
    for i, cam in enumerate(scene.cameras):
        img = torch.from_numpy(scene.load_image(i)).permute(2, 0, 1)[None]
        out[cam.name] = vae.encode(img)[0].float().cpu().contiguous()
    return out


def save_latents(path: Path, latents: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(latents, str(tmp), metadata={"lrf": json.dumps(meta)})


def load_latents(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lrf", "{}"))
    return load_file(str(path)), meta


def main(argv=None) -> int:
    from lrf.cli import run_main, start_step, step_parser
    from lrf.vae.factory import load_vae

    args = step_parser(__doc__, vae="required").parse_args(argv)

    def go():
        scene = Scene.load(args.scene)
        step = start_step(args, who=scene.key)
        vae = load_vae(step.spec, args.weights_dir, str(step.device))
        t0 = time.perf_counter()
        lat = encode_scene(scene, vae)
        dt = time.perf_counter() - t0
        z = next(iter(lat.values()))
        save_latents(args.out, lat, {"vae": step.spec, "channels": int(z.shape[0]), "seconds": dt})
        return (f"{scene.key}: encoded {len(lat)} views to {tuple(z.shape)} latents with {step.spec['kind']} "
                f"on {step.device.type} in {dt:.1f} s")

    return run_main(go)


if __name__ == "__main__":
    raise SystemExit(main())
