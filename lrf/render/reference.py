"""Brute-force reference compositor: every Gaussian against every pixel.

Dense [pixels, gaussians] tensors and plain autograd; deliberately simple so
it can serve as ground truth for the fast rasterizer's outputs and gradients.
Memory is bounded by processing pixel chunks (with activation checkpointing
when gradients are needed), but time stays O(P * N): small scenes only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .cpu import sigma_of
from .project import ALPHA_THRESHOLD, MAX_ALPHA, TRANSMITTANCE_THRESHOLD

_LOG_T_MIN = math.log(TRANSMITTANCE_THRESHOLD)


def _composite_chunk(pix_xy: Tensor, means2d: Tensor, conics: Tensor, opacities: Tensor,
                     features: Tensor, background: Tensor) -> tuple[Tensor, Tensor]:
    """Composite depth-sorted Gaussians over a chunk of pixel centres [p, 2]."""
    dx = pix_xy[:, 0:1] - means2d[None, :, 0]
    dy = pix_xy[:, 1:2] - means2d[None, :, 1]
    a, b, c = conics[:, 0], conics[:, 1], conics[:, 2]
    sigma = sigma_of(a, dx, c * dy * dy, b * dy)  # 0.5 (a dx^2 + c dy^2) + b dx dy
    alpha = (opacities * torch.exp(-sigma)).clamp_max(MAX_ALPHA)
    with torch.no_grad():
        valid = alpha >= ALPHA_THRESHOLD
        # A pair is composited iff the transmittance after it stays above the
        # threshold; T only decreases, so this is the "stop at the first
        # failure" rule of gsplat/3DGS.
        log_t_after = torch.cumsum(torch.log1p(-torch.where(valid, alpha, 0.0)), dim=1)
        used = valid & (log_t_after > _LOG_T_MIN)
    a_used = torch.where(used, alpha, torch.zeros_like(alpha))
    t_incl = torch.cumprod(1.0 - a_used, dim=1)
    t_before = torch.cat([torch.ones_like(t_incl[:, :1]), t_incl[:, :-1]], dim=1)
    w = a_used * t_before
    t_final = t_incl[:, -1] if t_incl.shape[1] else torch.ones_like(pix_xy[:, 0])
    image = w @ features + t_final[:, None] * background
    return image, 1.0 - t_final


def composite_reference(means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor,
                        background: Tensor, width: int, height: int,
                        max_chunk_elems: int = 1 << 22) -> tuple[Tensor, Tensor]:
    """Image [H,W,C] and alpha [H,W] of Gaussians already sorted front to back."""
    dev, dt = features.device, features.dtype
    ys, xs = torch.meshgrid(torch.arange(height, device=dev, dtype=dt) + 0.5,
                            torch.arange(width, device=dev, dtype=dt) + 0.5, indexing="ij")
    pix = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)
    n = max(1, means2d.shape[0])
    chunk = max(1, max_chunk_elems // n)
    need_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (means2d, conics, opacities, features, background))
    imgs, alphas = [], []
    for s in range(0, pix.shape[0], chunk):
        args = (pix[s:s + chunk], means2d, conics, opacities, features, background)
        if need_grad and chunk < pix.shape[0]:
            img, al = checkpoint(_composite_chunk, *args, use_reentrant=False)
        else:
            img, al = _composite_chunk(*args)
        imgs.append(img)
        alphas.append(al)
    image = torch.cat(imgs, 0).reshape(height, width, -1)
    return image, torch.cat(alphas, 0).reshape(height, width)
