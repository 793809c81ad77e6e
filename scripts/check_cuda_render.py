#!/usr/bin/env python
"""Check that the gsplat (CUDA) and our CPU rasterizers agree.

For a CUDA machine with gsplat installed: renders seeded random scenes with
both backends (gsplat on the GPU, ``cpu`` on host copies of the same float32
inputs), compares image and alpha (max abs difference) and the gradients
w.r.t. means, quats, scales, opacities, features and means2d (max abs
difference relative to the largest gradient), times both, and prints one JSON
document.  Exit status 0 iff every scene is within tolerance.

    python scripts/check_cuda_render.py [--tol 1e-4] [--repeats 5] [--dry]

``--dry`` (CI, no GPU): the same comparison and report at tiny sizes, with the brute-force
``reference`` renderer on the CPU standing in for gsplat, so the script cannot rot.

Importing this module has no side effects.  Known differences: gsplat
versions before 1.5 bin Gaussians into tiles with a 3-sigma radius instead
of the opacity-aware extent, and some clamp alpha at 0.999 instead of 0.99,
so scenes keep opacities <= 0.95; isolated pairs whose alpha sits within
float32 rounding of 1/255 can also flip.  ``image_p999`` (99.9th percentile
of the absolute image difference) is reported to tell such isolated flips
from systematic disagreement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SCENES = [  # n, channels, width, height, seed
    (2_000, 3, 64, 48, 0),
    (20_000, 4, 63, 47, 1),
    (20_000, 32, 63, 47, 2),
    (50_000, 16, 128, 96, 3),
]
DRY_SCENES = [(150, 3, 24, 18, 0), (200, 4, 23, 17, 1)]
PARAMS = ("means", "quats", "scales", "opacities", "features")


def _render(scene: dict, backend: str, device: str, cotangents):
    import torch

    from lrf.render import rasterize

    p = {k: scene[k].to(device).clone().requires_grad_(True) for k in PARAMS}
    out = rasterize(**p, viewmat=scene["viewmat"].to(device), K=scene["K"].to(device),
                    width=scene["width"], height=scene["height"],
                    background=scene["background"].to(device), backend=backend)
    gi, ga = (c.to(device) for c in cotangents)
    ((out.image * gi).sum() + (out.alpha * ga).sum()).backward()
    grads = {k: p[k].grad for k in PARAMS}
    grads["means2d"] = out.means2d.grad
    res = {"image": out.image.detach(), "alpha": out.alpha.detach(), "radii": out.radii}
    if device == "cuda":
        torch.cuda.synchronize()
    return res, grads


def _timed(fn, repeats: int, cuda: bool) -> float:
    import torch

    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def check_scene(n: int, c: int, w: int, h: int, seed: int, tol: float, repeats: int,
                candidate: tuple[str, str] = ("gsplat", "cuda")) -> dict:
    """Compare `candidate` (backend, device) with the CPU rasterizer on one seeded scene."""
    import torch

    cand_backend, cand_device = candidate
    cuda = cand_device == "cuda"

    from lrf.bench import make_scene

    scene = make_scene(n, c, w, h, seed=seed, opacity_range=(0.1, 0.95))
    g = torch.Generator().manual_seed(seed + 1)
    scene["background"] = torch.rand(c, generator=g)
    cot = (torch.randn(h, w, c, generator=g), torch.randn(h, w, generator=g))

    gs_out, gs_grad = _render(scene, cand_backend, cand_device, cot)
    cpu_out, cpu_grad = _render(scene, "cpu", "cpu", cot)

    def max_abs(a, b):
        return (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item()

    diff = (gs_out["image"].cpu().double() - cpu_out["image"].double()).abs().flatten()
    res = {
        "n": n, "channels": c, "width": w, "height": h, "seed": seed, "candidate": cand_backend,
        "image_max_abs": diff.max().item(),
        "image_p999": diff.kthvalue(max(1, int(0.999 * diff.numel()))).values.item(),
        "alpha_max_abs": max_abs(gs_out["alpha"], cpu_out["alpha"]),
        "visible_candidate": int((gs_out["radii"] > 0).sum()),
        "visible_cpu": int((cpu_out["radii"] > 0).sum()),
        "radii_mismatch": int((gs_out["radii"].cpu() != cpu_out["radii"]).sum()),
        "grad_rel": {},
    }
    for k in cpu_grad:
        a, b = gs_grad[k], cpu_grad[k]
        if a is None or b is None:
            res["grad_rel"][k] = None if a is None and b is None else float("inf")
            continue
        res["grad_rel"][k] = max_abs(a, b) / max(b.abs().max().item(), 1e-12)
    res["ok"] = bool(
        res["image_max_abs"] <= tol and res["alpha_max_abs"] <= tol
        and all(v is not None and v <= tol for v in res["grad_rel"].values()))

    def run(backend: str, device: str):
        return lambda: _render(scene, backend, device, cot)

    res[f"ms_fwd_bwd_{cand_backend}"] = _timed(run(cand_backend, cand_device), repeats, cuda=cuda)
    res["ms_fwd_bwd_cpu"] = _timed(run("cpu", "cpu"), repeats, cuda=False)
    if cuda:
        try:  # informative only: the cpu backend given CUDA tensors
            res["ms_fwd_bwd_cpu_path_on_cuda"] = _timed(run("cpu", "cuda"), repeats, cuda=True)
        except Exception as e:  # noqa: BLE001 - report, do not fail the check
            res["ms_fwd_bwd_cpu_path_on_cuda"] = f"failed: {type(e).__name__}: {e}"
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dry", action="store_true", help="no GPU: reference renderer for gsplat, tiny scenes")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args(argv)

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch

    from lrf.render.gsplat_backend import gsplat_available

    report: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "dry": args.dry}
    if args.dry:
        report["device"] = "cpu (dry: reference renderer in place of gsplat)"
        candidate, scenes = ("reference", "cpu"), DRY_SCENES
    else:
        if not torch.cuda.is_available() or not gsplat_available():
            report["error"] = "needs a CUDA device and the gsplat package"
            return _emit(report, args.json, 2)
        from lrf.render.gsplat_backend import gsplat_problem

        problem = gsplat_problem(torch.device("cuda"))
        if problem:
            report["error"] = problem
            return _emit(report, args.json, 2)
        import gsplat

        report["gsplat"] = getattr(gsplat, "__version__", "unknown")
        report["device"] = torch.cuda.get_device_name()
        candidate, scenes = ("gsplat", "cuda"), SCENES
    report["cpu_threads"] = torch.get_num_threads()
    report["tol"] = args.tol
    report["scenes"] = [check_scene(*s, tol=args.tol, repeats=args.repeats, candidate=candidate) for s in scenes]
    report["ok"] = all(s["ok"] for s in report["scenes"])
    return _emit(report, args.json, 0 if report["ok"] else 1)


def _emit(report: dict, path: str | None, status: int) -> int:
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
