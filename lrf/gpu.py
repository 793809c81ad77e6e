"""Where a step computes, and the one line it prints when a GPU step cannot have its GPU.

    python -m lrf.gpu [--load] [--require]   # JSON: torch, its CUDA, the GPU, gsplat (and its kernels)

Steps that render (`lrf.fit`, `lrf.evaluate`) or run the VAE (`lrf.encode`, and stages 1/3
through `lrf.vae.factory.load_vae`) resolve two settings here before any work:

- device `auto`: CUDA when torch sees a GPU, else the CPU; `cuda`: a GPU is required (the
  workflow passes it for rules with `resources.<rule>.gpu > 0`), and without one the step stops
  with one line, `ERROR <scene>: gsplat: no CUDA device is visible ...` (`cuda:` for steps that
  do not render) instead of running for hours on the CPU; `cpu`: the CPU.
- backend (config `backend`) `auto`: gsplat on CUDA, where the step stops with
  `ERROR <scene>: gsplat: <reason>` if gsplat cannot load its kernels; our rasterizer on the
  CPU. `cpu`: the pure-PyTorch rasterizer on any device (the explicit way to run on a GPU
  without gsplat); `gsplat`: gsplat, CUDA only; `reference`: the brute-force test renderer.

Nothing here imports gsplat unless a CUDA device is in use.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from lrf.errors import InputError
from lrf.render import BACKENDS
from lrf.render.gsplat_backend import GsplatError, gsplat_problem

DEVICES = ("auto", "cpu", "cuda")


def no_cuda_reason(device: str) -> str:
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
    return (f"no CUDA device is visible, but this step must run on {device!r} (a GPU job; resources gpu > 0) "
            f"(torch {torch.__version__} {build}"
            + (f", CUDA_VISIBLE_DEVICES={vis!r}" if vis is not None else "") + ")")


def select(backend: str = "auto", device: str = "auto", who: str = "", renders: bool = True
           ) -> tuple[str, torch.device]:
    """(rasterizer backend, torch device) for a step; GsplatError (one line) where that fails.

    `who` (e.g. ``llff/fern``) starts the message; `renders=False` for steps that only run the
    VAE: they need no gsplat, and their error names `cuda` instead.
    """
    prefix = f"{who}: " if who else ""
    if backend not in BACKENDS:
        raise InputError(f"{prefix}backend: unknown {backend!r}; expected one of {', '.join(BACKENDS)}")
    if device not in DEVICES and not device.startswith("cuda:"):
        raise InputError(f"{prefix}device: unknown {device!r}; expected auto, cpu, cuda or cuda:N")
    component = "gsplat" if renders else "cuda"
    want_cuda = device.startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise GsplatError(f"{prefix}{component}: {no_cuda_reason(device)}")
    if want_cuda:
        dev = torch.device(device)
    elif device == "auto" and torch.cuda.is_available():
        dev = torch.device("cuda")
    else:
        dev = torch.device("cpu")
    if not renders:
        return backend, dev
    if backend == "gsplat" and dev.type != "cuda":
        raise GsplatError(f"{prefix}gsplat: backend 'gsplat' renders on CUDA only, and this step runs on the CPU")
    if dev.type == "cuda" and backend in ("auto", "gsplat"):
        problem = gsplat_problem(dev)
        if problem:
            raise GsplatError(f"{prefix}{problem}; `backend: cpu` renders with the pure-PyTorch rasterizer instead")
        return "gsplat", dev
    return ("cpu" if backend == "auto" else backend), dev


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
            select("auto", "cuda", who="gpu")

    from lrf.cli import run_main  # the project's one-line ERROR handling

    return run_main(go)


if __name__ == "__main__":
    raise SystemExit(main())
