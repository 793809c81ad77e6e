"""`python -m lrf.view --bench`: frames per second of the viewer's live path while moving.

A synthetic field (lrf.bench's frustum-filling Gaussians: 30k by default, 32 channels) is seen
from a camera that orbits a little every frame, through the viewer's own code: render the 1/8
latent grid, decode with TAEF2 (the live precision), JPEG-encode as viser sends it. Prints the
frames per second at the live precision and, for reference, with a float32 decode.
"""
from __future__ import annotations

import math
import os
import statistics
import time

import numpy as np


def synthetic_field(n: int, channels: int, px: int, seed: int = 0):
    """(GaussianField, w2c, vertical fov) with Gaussians filling the camera's frustum."""
    import torch

    from lrf.bench import make_scene
    from lrf.field.gaussians import SH_C0, GaussianField

    s = make_scene(n, channels, px // 8, px // 8, seed=seed)
    op = s["opacities"].clamp(1e-4, 1 - 1e-4)
    field = GaussianField(s["means"], torch.log(s["scales"]), s["quats"], torch.log(op / (1 - op)),
                          s["features"] / SH_C0)
    field.requires_grad_(False)
    fov = 2 * math.atan(0.5 * (px // 8) / float(s["K"][1, 1]))
    return field, s["viewmat"].double().numpy(), fov


def orbit_step(w2c: np.ndarray, k: int, depth: float = 4.0, deg: float = 0.5) -> np.ndarray:
    """The camera turned k*deg degrees about the point `depth` ahead of it (a moving camera)."""
    a = math.radians(deg * k)
    R = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    T1, T2, Rot = np.eye(4), np.eye(4), np.eye(4)
    T1[2, 3], T2[2, 3], Rot[:3, :3] = -depth, depth, R
    return T2 @ Rot @ T1 @ w2c


def time_path(renderer, method, w2c, fov, px: int, frames: int, warmup: int = 2) -> dict:
    from viser._scene_api import _encode_image_binary

    from lrf.view.render import Timing, compose

    times, parts = [], []
    for k in range(warmup + frames):
        tm = Timing()
        t0 = time.perf_counter()
        img = compose(renderer, method, None, orbit_step(w2c, k), fov, 1.0, px, timing=tm)
        _encode_image_binary(img, "jpeg", jpeg_quality=85)
        dt = time.perf_counter() - t0
        if k >= warmup:
            times.append(dt)
            parts.append((tm.render_ms, tm.decode_ms, dt * 1e3 - tm.render_ms - tm.decode_ms))
    med = statistics.median(times)
    return {"fps": 1.0 / med, "ms": med * 1e3, "shape": img.shape,
            "render_ms": statistics.median(p[0] for p in parts), "decode_ms": statistics.median(p[1] for p in parts),
            "encode_ms": statistics.median(p[2] for p in parts)}


def run_bench(args) -> str:
    import tempfile
    from pathlib import Path

    import torch

    from lrf.field import save_field
    from lrf.view.render import Renderer
    from lrf.view.sources import MethodSource, default_vae, default_weights

    if args.threads:
        torch.set_num_threads(args.threads)
    spec, _ = default_vae()
    if args.vae:
        import json

        spec = json.loads(args.vae)
    weights = args.weights_dir or default_weights()
    probe = Renderer(spec, weights, "fp32")
    channels = probe.vae()[0].latent_channels
    field, w2c, fov = synthetic_field(args.gaussians, channels, args.px)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average {load:.2f} on {os.cpu_count()} cpus; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "field.safetensors"
        save_field(field, path)
        method = MethodSource("bench", "latent", path)
        results = {}
        live = Renderer(spec, weights, args.precision)
        for name, r in ((f"live ({live.precision})", live), ("reference (fp32 decode)", probe)):
            if name.startswith("reference") and live.precision == "fp32":
                continue
            res = time_path(r, method, w2c, fov, args.px, args.frames)
            results[name] = res
            h, w = res["shape"][:2]
            print(f"{name}: {res['fps']:.1f} frames/s, median {res['ms']:.0f} ms per {w}x{h} frame "
                  f"(render {res['render_ms']:.0f} ms of a {w // 8}x{h // 8} latent, decode {res['decode_ms']:.0f}, "
                  f"encode {res['encode_ms']:.0f})", flush=True)
    first = next(iter(results.values()))
    verdict = "meets" if first["fps"] >= 5 else "MISSES"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    ratio = ""
    if len(results) == 2:
        ref = list(results.values())[1]
        ratio = f"; {first['fps'] / ref['fps']:.1f}x the fp32 decode"
    return (f"viewer bench: {args.gaussians} Gaussians x {channels} channels, {spec.get('kind')}, {args.px} px moving: "
            f"{first['fps']:.1f} frames/s{ratio}; {verdict} the >= 5 frames/s goal (load average now {load:.2f})")
