"""What this machine offers a GPU step: torch, its CUDA, the GPU and gsplat (and its kernels).

    python -m lrf.gpu [--load] [--require]   # JSON; --require: exit 1 with one ERROR line without a GPU

Where a step computes is decided by `lrf.device.resolve_device`, which rasteriser renders by
`lrf.render.resolve_backend`; this module only reports. Nothing here imports gsplat unless
asked to load its kernels.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from lrf.render.gsplat_backend import gsplat_problem


def versions(load: bool = False) -> dict:
    """torch, CUDA, the GPU and gsplat; `load` also builds/loads gsplat's kernels (minutes, once)."""
    from importlib import metadata

    try:
        gs = metadata.version("gsplat")
    except metadata.PackageNotFoundError:
        gs = None
    out = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "gsplat": gs, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name()
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        out["driver_cuda"] = _driver_cuda()
    if load:
        out["gsplat_kernels"] = gsplat_problem(torch.device("cuda")) or "ok"
    return out


def _driver_cuda() -> str | None:
    try:
        import ctypes

        v = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v))
        return f"{v.value // 1000}.{v.value % 1000 // 10}"
    except Exception:  # noqa: BLE001 - informative only
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load", action="store_true", help="build/load gsplat's CUDA kernels (needs a GPU)")
    ap.add_argument("--require", action="store_true",
                    help="exit 1 with one ERROR line unless a GPU is visible and gsplat's kernels load")
    args = ap.parse_args(argv)

    def go():
        print(json.dumps(versions(load=args.load or args.require)))
        if args.require:
            from lrf.device import resolve_device
            from lrf.render import resolve_backend

            resolve_backend("auto", resolve_device("cuda", who="gpu", renders=True), who="gpu")

    from lrf.cli import run_main  # the project's one-line ERROR handling

    return run_main(go)


if __name__ == "__main__":
    raise SystemExit(main())
