"""Fast differentiable CPU rasterizer: sparse (gaussian, pixel) pairs.

Why this shape: autograd over per-pair tensors records dozens of large
intermediates and was the bottleneck of an earlier prototype, so compositing
is one ``torch.autograd.Function`` with a hand-written backward.  The work is
organised like a tile rasterizer, but with one-pixel bins:

1. each Gaussian emits candidate pairs only inside the pixel rectangle where
   its alpha can reach 1/255 (its opacity-aware bounding box), generated in
   front-to-back order of the Gaussians;
2. alpha is evaluated per pair and pairs below 1/255 are dropped at once;
3. a stable radix sort by pixel id groups pairs per pixel while keeping the
   depth order inside each group;
4. transmittance is a segmented cumulative sum of log(1 - alpha) (float64
   global cumsum minus each pixel's offset), which also gives the early
   termination (T <= 1e-4) as a mask; only surviving pairs touch the
   C-channel features, so the expensive [pairs, C] work is minimal;
5. backward uses the same pair list: per-pair dL/dalpha from a segmented
   suffix sum, then ``index_add_`` into the per-Gaussian gradients.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .project import ALPHA_THRESHOLD, MAX_ALPHA, TRANSMITTANCE_THRESHOLD, alpha_extent

_LOG_T_MIN = math.log(TRANSMITTANCE_THRESHOLD)


def _exclusive_segment_base(csum: Tensor, counts: Tensor) -> Tensor:
    """Value of an inclusive cumsum just before each segment starts ([S])."""
    ends = torch.cumsum(counts, 0)
    padded = torch.cat([csum.new_zeros(1), csum])
    return padded[ends - counts]


def _pairs(means2d: Tensor, conics: Tensor, opacities: Tensor, width: int, height: int):
    """Alpha-culled (pixel, gaussian) pairs sorted by pixel, then by depth.

    Returns pixel ids, gaussian ids, offsets dx/dy (pixel centre - mean),
    unclamped visibility op*exp(-sigma) and clamped alpha, all of length M.
    """
    dev = means2d.device
    n = means2d.shape[0]
    with torch.no_grad():
        ex, ey = alpha_extent(conics, opacities)
        # Small relative margin: the rectangle must contain every pixel the
        # exact per-pair test accepts, up to rounding.
        ex = ex * (1 + 1e-6) + 1e-6
        ey = ey * (1 + 1e-6) + 1e-6
        mx, my = means2d[:, 0], means2d[:, 1]
        x0 = torch.ceil(mx - ex - 0.5).clamp(0, width)
        x1 = torch.floor(mx + ex - 0.5).clamp(-1, width - 1)
        y0 = torch.ceil(my - ey - 0.5).clamp(0, height)
        y1 = torch.floor(my + ey - 0.5).clamp(-1, height - 1)
        bw = (x1 - x0 + 1).clamp_min(0).long()
        bh = (y1 - y0 + 1).clamp_min(0).long()
        counts = bw * bh
        total = int(counts.sum())
        if total == 0:
            e = torch.zeros(0, dtype=torch.long, device=dev)
            z = means2d.new_zeros(0)
            return e, e, z, z, z, z
        gid = torch.repeat_interleave(torch.arange(n, device=dev), counts, output_size=total)
        start = torch.cumsum(counts, 0) - counts
        ints = torch.stack([start, bw, x0.long(), y0.long()], 1).index_select(0, gid)
        local = torch.arange(total, device=dev) - ints[:, 0]
        ly = torch.div(local, ints[:, 1], rounding_mode="floor")
        px = ints[:, 2] + (local - ly * ints[:, 1])
        py = ints[:, 3] + ly
        del local, ly, ints
        par = torch.cat([means2d, conics, opacities[:, None]], 1).index_select(0, gid)
        dx = px.to(means2d.dtype) + 0.5 - par[:, 0]
        dy = py.to(means2d.dtype) + 0.5 - par[:, 1]
        sigma = 0.5 * (par[:, 2] * dx * dx + par[:, 4] * dy * dy) + par[:, 3] * dx * dy
        vis = par[:, 5] * torch.exp(-sigma)
        keep = (vis >= ALPHA_THRESHOLD) & (sigma >= 0)
        sel = keep.nonzero().squeeze(1)
        pix = (py * width + px).index_select(0, sel)
        order = torch.sort(pix, stable=True).indices
        sel = sel.index_select(0, order)
        pix = pix.index_select(0, order)
        gid = gid.index_select(0, sel)
        dx = dx.index_select(0, sel)
        dy = dy.index_select(0, sel)
        vis = vis.index_select(0, sel)
        alpha = vis.clamp_max(MAX_ALPHA)
    return pix, gid, dx, dy, vis, alpha


class _Composite(torch.autograd.Function):
    """Front-to-back alpha compositing of depth-sorted, visible Gaussians."""

    @staticmethod
    def forward(ctx, means2d, conics, opacities, features, background, width, height):
        P = width * height
        C = features.shape[1]
        dt = features.dtype
        pix, gid, dx, dy, vis, alpha = _pairs(means2d, conics, opacities, width, height)
        # Transmittance via a segmented cumsum of log(1 - alpha), in float64
        # so the global running sum does not lose the per-pixel differences.
        log1m = torch.log1p(-alpha.double())
        csum = torch.cumsum(log1m, 0)
        counts = torch.bincount(pix, minlength=P)
        base = _exclusive_segment_base(csum, counts)
        log_t_after = csum - base.index_select(0, pix)
        used = (log_t_after > _LOG_T_MIN).nonzero().squeeze(1)
        pix, gid = pix.index_select(0, used), gid.index_select(0, used)
        dx, dy = dx.index_select(0, used), dy.index_select(0, used)
        vis, alpha = vis.index_select(0, used), alpha.index_select(0, used)
        log1m = log1m.index_select(0, used)
        t_before = torch.exp(log_t_after.index_select(0, used) - log1m)
        w = alpha * t_before.to(dt)
        log_t_final = torch.zeros(P, dtype=torch.float64, device=pix.device).index_add_(0, pix, log1m)
        t_final = torch.exp(log_t_final).to(dt)

        image = torch.zeros(P, C, dtype=dt, device=features.device)
        image.index_add_(0, pix, features.index_select(0, gid) * w[:, None])
        image += t_final[:, None] * background
        alpha_img = 1.0 - t_final

        ctx.save_for_backward(conics, opacities, features, background, pix, gid, dx, dy,
                              vis, alpha, t_before, w, t_final)
        return image.reshape(height, width, C), alpha_img.reshape(height, width)

    @staticmethod
    def backward(ctx, g_image, g_alpha):
        (conics, opacities, features, background, pix, gid, dx, dy,
         vis, alpha, t_before, w, t_final) = ctx.saved_tensors
        n, C = features.shape
        dt = features.dtype
        P = t_final.shape[0]
        G = g_image.reshape(P, C) if g_image is not None else features.new_zeros(P, C)
        gA = g_alpha.reshape(P) if g_alpha is not None else features.new_zeros(P)

        Gp = G.index_select(0, pix)
        Fg = features.index_select(0, gid)
        c = (Gp * Fg).sum(1)  # dL/dw per pair
        g_features = torch.zeros_like(features).index_add_(0, gid, Gp * w[:, None])
        del Gp, Fg
        g_background = (t_final[:, None] * G).sum(0)

        # dL/dalpha_k = T_k c_k - (sum_{j>k} w_j c_j + T_final (G.bg - gA)) / (1 - alpha_k)
        v = (w * c).double()
        vsum = torch.cumsum(v, 0)
        counts = torch.bincount(pix, minlength=P)
        seg_end = torch.cat([vsum.new_zeros(1), vsum])[torch.cumsum(counts, 0)]
        suffix = seg_end.index_select(0, pix) - vsum
        bg_term = (t_final * ((G * background).sum(1) - gA)).double()
        rest = (suffix + bg_term.index_select(0, pix)).to(dt)
        g_alpha_pair = t_before.to(dt) * c - rest / (1.0 - alpha)
        # alpha = min(MAX_ALPHA, vis); vis = op * exp(-sigma)
        g_vis = torch.where(vis < MAX_ALPHA, g_alpha_pair, torch.zeros_like(g_alpha_pair))
        g_sigma = -g_vis * vis
        a_, b_, c_ = conics.index_select(0, gid).unbind(1)
        per = torch.stack([
            -g_sigma * (a_ * dx + b_ * dy),  # d/d mean x  (dx = px - mx)
            -g_sigma * (b_ * dx + c_ * dy),  # d/d mean y
            0.5 * g_sigma * dx * dx,  # d/d conic a
            g_sigma * dx * dy,  # d/d conic b
            0.5 * g_sigma * dy * dy,  # d/d conic c
            g_vis * vis / opacities.index_select(0, gid),  # d/d opacity
        ], 1)
        acc = torch.zeros(n, 6, dtype=dt, device=features.device).index_add_(0, gid, per)
        return (acc[:, 0:2], acc[:, 2:5], acc[:, 5], g_features, g_background, None, None)


def composite_cpu(means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor,
                  background: Tensor, width: int, height: int) -> tuple[Tensor, Tensor]:
    """Image [H,W,C] and alpha [H,W] of Gaussians already sorted front to back."""
    return _Composite.apply(means2d, conics, opacities, features, background, width, height)
