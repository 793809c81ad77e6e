"""Benchmark the CPU rasterizer against the brute-force reference.

``python -m lrf.bench [--quick] [--repeats N] [--threads N]`` prints ms per
forward+backward for latent-sized images, then for two named cases the CPU
rasterizer's and the reference's ms, their ratio and the iterations/second:
the target (20k Gaussians x 32 channels x 63x47, the latent of a 504x376
photo; goal >= 25 it/s on 2 cores) and RGB (20k x 3 channels x 252x188, the
size an RGB 3DGS field is fitted at on fern).

Run as a script it sets OMP_WAIT_POLICY=PASSIVE unless already set (see
below), and prints the load average and CPU seconds per iteration so that
timings taken on a busy machine can be judged.

Scenes are realistic rather than degenerate: means uniform in the camera
frustum (slightly beyond the image edges) at depths 2..6, log-uniform scales
giving radii of a few latent pixels, opacities 0.1..0.9, seen through a
non-trivial camera pose.  Everything is seeded.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

if __name__ == "__main__":
    # Spinning OpenMP workers collapse throughput when the cores are shared
    # (other jobs running): 2-thread timings got 3-5x worse than 1 thread.
    # Must be set before torch loads libgomp; export OMP_WAIT_POLICY=ACTIVE
    # to measure the default behaviour.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from lrf.render import rasterize  # noqa: E402

TARGET = (20_000, 32, 63, 47)  # N, C, width, height
TARGET_ITS = 25.0
RGB = (20_000, 3, 252, 188)  # an RGB field at fern's fitting size


def make_scene(n: int, channels: int, width: int, height: int, seed: int = 0,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               fov_deg: float = 60.0, depth: tuple[float, float] = (2.0, 6.0),
               scale_range: tuple[float, float] = (0.01, 0.12),
               opacity_range: tuple[float, float] = (0.1, 0.9), margin: float = 0.1) -> dict:
    """Random Gaussians filling a camera frustum; returns rasterize() kwargs."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=f64)

    f = 0.5 * width / math.tan(0.5 * math.radians(fov_deg))
    K = torch.tensor([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], dtype=f64)
    z = depth[0] + (depth[1] - depth[0]) * rand(n)
    u = (-margin + (1 + 2 * margin) * rand(n)) * width
    v = (-margin + (1 + 2 * margin) * rand(n)) * height
    p_cam = torch.stack([(u - K[0, 2]) * z / f, (v - K[1, 2]) * z / f, z], -1)
    # A tilted camera somewhere in the world; means are placed in world space.
    axis = torch.randn(3, generator=g, dtype=f64)
    axis = axis / axis.norm()
    ang = 0.4
    kx = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]],
                      dtype=f64)
    R = torch.eye(3, dtype=f64) + math.sin(ang) * kx + (1 - math.cos(ang)) * kx @ kx
    t = torch.randn(3, generator=g, dtype=f64)
    viewmat = torch.eye(4, dtype=f64)
    viewmat[:3, :3], viewmat[:3, 3] = R, t
    means = (p_cam - t) @ R  # invert x_cam = R x_world + t
    lo, hi = math.log(scale_range[0]), math.log(scale_range[1])
    scales = torch.exp(lo + (hi - lo) * rand(n, 3))
    quats = torch.randn(n, 4, generator=g, dtype=f64)
    opacities = opacity_range[0] + (opacity_range[1] - opacity_range[0]) * rand(n)
    features = torch.randn(n, channels, generator=g, dtype=f64)
    out = dict(means=means, quats=quats, scales=scales, opacities=opacities,
               features=features, viewmat=viewmat, K=K)
    out = {k: v.to(device=device, dtype=dtype) for k, v in out.items()}
    out.update(width=width, height=height)
    return out


_PARAMS = ("means", "quats", "scales", "opacities", "features")


def time_fwd_bwd(scene: dict, backend: str, repeats: int, warmup: int = 1,
                 cpu_times: list | None = None) -> list[float]:
    """Wall seconds per forward+backward (fixed random cotangents on image and
    alpha); process CPU seconds are appended to ``cpu_times`` if given."""
    params = {k: scene[k].clone().requires_grad_(True) for k in _PARAMS}
    rest = {k: v for k, v in scene.items() if k not in _PARAMS}
    g = torch.Generator().manual_seed(1)
    H, W, C = scene["height"], scene["width"], scene["features"].shape[1]
    g_img = torch.randn(H, W, C, generator=g).to(scene["features"])
    g_alpha = torch.randn(H, W, generator=g).to(scene["features"])
    times = []
    for i in range(warmup + repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = rasterize(**params, **rest, backend=backend)
        ((out.image * g_img).sum() + (out.alpha * g_alpha).sum()).backward()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            if cpu_times is not None:
                cpu_times.append(time.process_time() - c0)
        for p in params.values():
            p.grad = None
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, smaller reference budget")
    ap.add_argument("--repeats", type=int, default=None, help="timed iterations (cpu backend)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref-budget", type=float, default=None,
                    help="skip the dense reference (about 0.2 us per Gaussian-pixel on 2 "
                         "cores) when N x pixels exceeds this; default 7e7 with --quick, "
                         "else 4e8 (everything)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    repeats = args.repeats or (3 if args.quick else 10)
    ref_repeats = 1  # seconds per call: one timed call (no warm-up) is enough
    budget = args.ref_budget or (7e7 if args.quick else 4e8)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average {load:.2f} on {os.cpu_count()} cpus; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32; "
          f"median ms per forward+backward ({repeats} cpu / {ref_repeats} reference repeats); "
          f"reference skipped when N x pixels > {budget:.0e}")
    hdr = f"{'N':>7} {'C':>3} {'image':>6} {'cpu ms':>9} {'reference ms':>20} {'ref/cpu':>8}"
    print(hdr)
    print("-" * len(hdr))
    for n in (20_000, 100_000):
        for c in (4, 32):
            for w, h in ((32, 32), (64, 48)):
                scene = make_scene(n, c, w, h, seed=args.seed)
                cpu_ms = 1e3 * statistics.median(time_fwd_bwd(scene, "cpu", repeats))
                work = n * w * h
                if work > budget:
                    ref, ratio = "skipped (budget)", "-"
                else:
                    ref_ms = 1e3 * statistics.median(
                        time_fwd_bwd(scene, "reference", ref_repeats, warmup=0))
                    ref, ratio = f"{ref_ms:.1f}", f"{ref_ms / cpu_ms:.1f}x"
                print(f"{n:>7} {c:>3} {f'{w}x{h}':>6} {cpu_ms:>9.1f} {ref:>20} {ratio:>8}",
                      flush=True)

    print()
    for name, (n, c, w, h) in (("target", TARGET), ("rgb", RGB)):
        scene = make_scene(n, c, w, h, seed=args.seed)
        cpu: list[float] = []
        times = time_fwd_bwd(scene, "cpu", max(repeats, 5), warmup=2, cpu_times=cpu)
        med = statistics.median(times)
        if n * w * h > budget:
            ref = f"reference skipped (N x pixels = {n * w * h:.1e} > budget)"
        else:
            ref_ms = 1e3 * statistics.median(
                time_fwd_bwd(scene, "reference", ref_repeats, warmup=0))
            ref = f"reference {ref_ms:.1f} ms = {ref_ms / (1e3 * med):.1f}x the cpu rasterizer"
        goal = ""
        if name == "target":
            verdict = "meets" if 1.0 / med >= TARGET_ITS else "MISSES"
            goal = f"; {verdict} the >= {TARGET_ITS:g} it/s goal"
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"{name} {n} x {c}ch x {w}x{h}: cpu median {1e3 * med:.1f} ms "
              f"(best {1e3 * min(times):.1f} ms) = {1.0 / med:.2f} it/s{goal}")
        print(f"  {ref}")
        print(f"  process CPU time per iteration: median {1e3 * statistics.median(cpu):.1f} ms "
              f"(all threads); load average now {load:.2f}", flush=True)


if __name__ == "__main__":
    main()
