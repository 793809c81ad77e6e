"""Where a step computes: the one function that turns a device setting into a torch device.

- `auto`: CUDA when torch sees a GPU, else the CPU;
- `cuda` / `cuda:N`: a GPU is required (the workflow passes it for rules with
  `resources.<rule>.gpu > 0`); without one the step stops with one line,
  `<who>: <component>: no CUDA device is visible ...`, instead of running for hours on the CPU;
- `cpu`: the CPU.

The rasteriser backend is decided next to the rasterisers (`lrf.render.resolve_backend`); a step
resolves both once, before any work (`lrf.cli.start_step`).
"""
from __future__ import annotations

import os

import torch

from lrf.errors import GsplatError, InputError

DEVICES = ("auto", "cpu", "cuda")


def no_cuda_reason(device: str) -> str:
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
    return (f"no CUDA device is visible, but this step must run on {device!r} (a GPU job; resources gpu > 0) "
            f"(torch {torch.__version__} {build}"
            + (f", CUDA_VISIBLE_DEVICES={vis!r}" if vis is not None else "") + ")")


def resolve_device(device: str | torch.device = "auto", who: str = "", renders: bool = False) -> torch.device:
    """The torch device for a device setting; a one-line InputError where it cannot be had.

    `who` (e.g. ``llff/fern``) starts the message. A step that renders names `gsplat` in it (the
    component a CUDA render needs, GsplatError); one that only runs networks names `cuda`."""
    if isinstance(device, torch.device):
        device = str(device)
    prefix = f"{who}: " if who else ""
    if device not in DEVICES and not device.startswith("cuda:"):
        raise InputError(f"{prefix}device: unknown {device!r}; expected auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            err = GsplatError if renders else InputError
            raise err(f"{prefix}{'gsplat' if renders else 'cuda'}: {no_cuda_reason(device)}")
        return torch.device(device)
    if device == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
