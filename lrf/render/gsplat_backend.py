"""CUDA backend: thin adapter around ``gsplat.rasterization``.

gsplat is imported lazily so that this module (and the package) import fine
on machines without CUDA.  Output is adapted to :class:`lrf.render.RenderOutput`
so training code is backend-agnostic:

* ``means2d`` is an [N, 2] leaf whose ``.grad`` is filled from gsplat's
  [1, N, 2] ``meta["means2d"]`` by a backward hook (gsplat's own tensor is
  batched, and a view of it would not be on the autograd path);
* ``radii`` is recomputed as ceil(3 sqrt(lambda_max)) of the blurred 2D
  covariance (from gsplat's conics) wherever gsplat kept the Gaussian, so
  radii mean the same in every backend (gsplat >= 1.5 returns per-axis
  opacity-aware extents instead).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor


def gsplat_available() -> bool:
    return importlib.util.find_spec("gsplat") is not None


def _import_gsplat():
    try:
        import gsplat  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise ImportError(
            "backend='gsplat' needs the gsplat package (CUDA): `pip install gsplat`; "
            "use backend='cpu' on machines without it") from e
    return gsplat


def _radius_from_conics(conics: Tensor) -> Tensor:
    a, b, c = conics.unbind(-1)
    det = a * c - b * b
    det = torch.where(det > 0, det, torch.ones_like(det))
    sxx, sxy, syy = c / det, -b / det, a / det  # covariance = conic^-1
    half = 0.5 * (sxx + syy)
    lam = half + (half * half - (sxx * syy - sxy * sxy)).clamp_min(0).sqrt()
    return torch.ceil(3.0 * lam.clamp_min(0).sqrt())


def rasterize_gsplat(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor,
                     features: Tensor, viewmat: Tensor, K: Tensor, width: int, height: int,
                     background: Tensor, near: float, far: float):
    from . import RenderOutput

    gsplat = _import_gsplat()
    if not means.is_cuda:
        raise ValueError("backend='gsplat' needs CUDA tensors; use backend='cpu'")
    C = features.shape[-1]
    colors, alphas, meta = gsplat.rasterization(
        means=means, quats=quats, scales=scales, opacities=opacities,
        colors=features[None], viewmats=viewmat[None], Ks=K[None],
        width=width, height=height, near_plane=near, far_plane=far, eps2d=0.3,
        sh_degree=None, packed=False, backgrounds=background[None],
        render_mode="RGB", rasterize_mode="classic",
    )
    image = colors[0]
    if image.shape[-1] != C:  # very old gsplat pads channel counts
        image = image[..., :C]
    alpha = alphas[0, ..., 0]

    m2d_batched = meta["means2d"]  # [1, N, 2]
    means2d = m2d_batched.detach()[0].clone()
    if m2d_batched.requires_grad:
        means2d.requires_grad_(True)

        def _copy_grad(g: Tensor) -> None:
            g0 = g.detach()[0]
            means2d.grad = g0.clone() if means2d.grad is None else means2d.grad + g0

        m2d_batched.register_hook(_copy_grad)

    raw_radii = meta["radii"][0]
    kept = raw_radii > 0 if raw_radii.dim() == 1 else (raw_radii > 0).any(-1)
    with torch.no_grad():
        r = _radius_from_conics(meta["conics"][0].float())
        radii = torch.where(kept, r, torch.zeros_like(r)).to(torch.int32)
    depths = meta["depths"][0]
    return RenderOutput(image=image, alpha=alpha, means2d=means2d, radii=radii, depths=depths)
