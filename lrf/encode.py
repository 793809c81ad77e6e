"""Encode every image of a scene once and cache the latents (safetensors, one tensor per view).

    python -m lrf.encode --scene results/D/S/prepared/scene.json --vae '{"kind":"taef2","source":"{weights}/taef2"}' \
        --weights-dir ../shared/weights --out results/D/S/latents/taef2.safetensors
"""
from __future__ import annotations

import argparse
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
    from lrf.cli import run_main
    from lrf.vae.factory import load_vae

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scene", required=True, type=Path)
    ap.add_argument("--vae", required=True, help="JSON spec: kind, source[, encoder, decoder]")
    ap.add_argument("--weights-dir", required=True, type=Path)
    ap.add_argument("--device", default="cpu", help="auto | cpu | cuda (cuda: a GPU job; fail without one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)

    def go():
        from lrf.gpu import select

        torch.set_num_threads(args.threads)
        spec = json.loads(args.vae)
        scene = Scene.load(args.scene)
        _, dev = select("auto", args.device, who=scene.key, renders=False)
        vae = load_vae(spec, args.weights_dir, str(dev))
        t0 = time.perf_counter()
        lat = encode_scene(scene, vae)
        dt = time.perf_counter() - t0
        z = next(iter(lat.values()))
        save_latents(args.out, lat, {"vae": spec, "channels": int(z.shape[0]), "seconds": dt})
        return (f"{scene.key}: encoded {len(lat)} views to {tuple(z.shape)} latents with {spec['kind']} "
                f"on {dev.type} in {dt:.1f} s")

    return run_main(go)


if __name__ == "__main__":
    raise SystemExit(main())
