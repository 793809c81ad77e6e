"""Differentiable splatting of C-channel Gaussians (RGB or VAE latents).

One entry point, :func:`rasterize`, with interchangeable backends so training
code is identical on a laptop CPU and on a CUDA box:

* ``"cpu"``: our rasterizer, compiled CPU loops (numba) with hand-written
  backwards (tensors on another device are copied to the CPU and back);
* ``"reference"``: dense brute force, ground truth for tests;
* ``"gsplat"``: ``gsplat.rasterization`` (CUDA only, imported lazily);
* ``"auto"``: gsplat for CUDA tensors, ``"cpu"`` otherwise.  On CUDA there is no
  silent fallback: if gsplat cannot load its kernels, :class:`GsplatError` says why
  (rendering on the CPU instead is far slower; ask for it with ``"cpu"``).

CPU tensors never import gsplat (not even its Python parts).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lrf.errors import InputError

from .gsplat_backend import GsplatError, gsplat_problem, rasterize_gsplat  # light: imports no gsplat
from .project import EPS2D, RenderOutput, project_gaussians, project_gaussians_fused

__all__ = ["RenderOutput", "rasterize", "resolve_backend", "BACKENDS", "GsplatError"]

BACKENDS = ("auto", "cpu", "reference", "gsplat")


def resolve_backend(backend: str, device: torch.device, who: str = "") -> str:
    """The one place that decides which rasteriser renders on `device` (see the module docstring).

    Returns "gsplat", "cpu" or "reference"; a one-line InputError / GsplatError (prefixed with
    `who`, e.g. ``llff/fern``) where the setting cannot be honoured: gsplat on the CPU, or gsplat
    on CUDA without its kernels (no silent fallback to the far slower CPU rasterizer)."""
    prefix = f"{who}: " if who else ""
    if backend not in BACKENDS:
        raise InputError(f"{prefix}backend: unknown {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "gsplat" and device.type != "cuda":
        raise GsplatError(f"{prefix}gsplat: backend 'gsplat' renders on CUDA only, and this step runs on the CPU")
    if device.type == "cuda" and backend in ("auto", "gsplat"):
        problem = gsplat_problem(device)
        if problem:
            raise GsplatError(f"{prefix}{problem}; `backend: cpu` renders with the CPU rasterizer instead")
        return "gsplat"
    return "cpu" if backend == "auto" else backend


def _front_to_back(depths: Tensor, visible: Tensor, near: float) -> Tensor:
    """Ids of the visible Gaussians, stably sorted by depth.

    Visible depths exceed ``near``; when that is >= 0 their IEEE bit patterns sort
    like the values, so on CPU two (float32) or four (float64) stable 16-bit
    radix passes replace the comparison sort (~5x faster).
    """
    if (depths.device.type != "cpu" or near < 0
            or depths.dtype not in (torch.float32, torch.float64)):
        idx = visible.nonzero().squeeze(1)
        return idx[torch.argsort(depths[idx], stable=True)]
    idx = np.flatnonzero(visible.numpy())
    bits = depths.numpy()[idx].view(np.uint32 if depths.dtype == torch.float32 else np.uint64)
    perm = np.arange(idx.shape[0])
    for shift in range(0, 8 * bits.itemsize, 16):  # least significant digit first
        perm = perm[np.argsort((bits[perm] >> shift).astype(np.uint16), kind="stable")]
    return torch.from_numpy(idx[perm])


def rasterize(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, features: Tensor,
              viewmat: Tensor, K: Tensor, width: int, height: int,
              background: Tensor | None = None, backend: str = "auto",
              near: float = 0.01, far: float = 1e10, eps2d: float = EPS2D) -> RenderOutput:
    """Render N Gaussians with C-channel features into an [H, W, C] image.

    means [N,3] world; quats [N,4] (w,x,y,z), any norm; scales [N,3] linear;
    opacities [N] in (0,1); features [N,C]; viewmat [4,4] world-to-camera
    (OpenCV axes); K [3,3]; background [C] or None (zeros).  The camera is a
    constant (no gradients to viewmat or K).  eps2d is the screen-space blur
    (pixels^2) added to every projected covariance.  Culling and compositing rules
    are documented in :mod:`lrf.render.project`; culled Gaussians get
    ``radii == 0``, ``means2d == 0`` and zero gradients.
    """
    width, height = int(width), int(height)
    backend = resolve_backend(backend, means.device)
    C = features.shape[-1]
    if background is None:
        background = features.new_zeros(C)
    else:
        background = background.to(device=features.device, dtype=features.dtype).reshape(C)
    viewmat = viewmat.to(means)
    K = K.to(means)

    if backend == "gsplat":
        return rasterize_gsplat(means, quats, scales, opacities, features, viewmat, K, width,
                                height, background, near, far, eps2d)

    # The cpu backend projects in compiled loops with a hand-written backward; the reference
    # keeps autograd (bit-identical forward values), so the tests check one against the other.
    project = project_gaussians_fused if backend == "cpu" else project_gaussians
    proj = project(means, quats, scales, opacities, viewmat, K, width, height, near, far, eps2d)
    means2d = proj.means2d
    if means2d.requires_grad:
        means2d.retain_grad()  # densification reads means2d.grad
    order = _front_to_back(proj.depths.detach(), proj.visible, near)
    if backend == "cpu":
        from .cpu import composite_cpu

        image, alpha = composite_cpu(means2d, proj.conics, opacities, features, background,
                                     order, width, height)
    else:
        from .reference import composite_reference

        image, alpha = composite_reference(
            means2d.index_select(0, order), proj.conics.index_select(0, order),
            opacities.index_select(0, order), features.index_select(0, order), background,
            width, height)
    return RenderOutput(image=image, alpha=alpha, means2d=means2d, radii=proj.radii,
                        depths=proj.depths)
