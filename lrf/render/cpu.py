"""Fast differentiable CPU rasterizer over sparse (pixel, gaussian) pairs.

Why this shape: autograd over per-pair tensors records dozens of large
intermediates and was what made an earlier prototype slow, so compositing is
one ``torch.autograd.Function`` with a hand-written backward, and every step
is a handful of flat, vectorised passes:

1. *Scanlines.*  For each Gaussian (front to back) and each image row it can
   reach, solve the quadratic ``sigma(x) <= ln(255 * opacity)`` for the exact
   pixel span where its alpha can reach 1/255 (plus a rounding margin).  This
   bins pairs far tighter than 16x16 tiles, so nearly every generated pair
   survives the per-pair alpha test (which is still applied, with the very
   same expression as the reference, so both agree bit for bit).
2. *Per-pixel lists.*  A stable radix sort on the pixel id groups the pairs
   per pixel while keeping the depth order inside each group.
3. *Transmittance.*  log T is a segmented cumulative sum of log(1 - alpha)
   (one float64 cumsum minus each pixel's offset); T <= 1e-4 early
   termination becomes a mask, and only surviving pairs go further.
4. *Channels.*  The [pairs, C] work is done by MKL sparse kernels: the image
   is ``W @ F`` with W the sparse [P, N] weight matrix (CSR), the backward
   needs ``W^T @ dI`` and the sampled product ``(dI @ F^T)[pairs]``.
5. *Backward.*  dL/dalpha per pair from a segmented suffix sum, then 1-D
   ``index_add_`` into per-Gaussian gradients.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .project import ALPHA_THRESHOLD, MAX_ALPHA, TRANSMITTANCE_THRESHOLD

_LOG_T_MIN = math.log(TRANSMITTANCE_THRESHOLD)
_LOG_ALPHA_THRESHOLD = math.log(ALPHA_THRESHOLD)


def sigma_of(a: Tensor, dx: Tensor, cdy2: Tensor, bdy: Tensor) -> Tensor:
    """Gaussian exponent 0.5 d^T conic d, written once for both CPU backends.

    ``cdy2 = c*dy*dy`` and ``bdy = b*dy``; sharing the expression makes the
    reference and the fast path round identically, so the discrete
    ``alpha >= 1/255`` decisions agree even in float32.
    """
    return 0.5 * (a * dx * dx + cdy2) + bdy * dx


def _csr(crow_counts: Tensor, col: Tensor, values: Tensor, rows: int, cols: int) -> Tensor:
    crow = torch.zeros(rows + 1, dtype=torch.long, device=col.device)
    torch.cumsum(crow_counts, 0, out=crow[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, col, values, size=(rows, cols),
                                       check_invariants=False)


SEG = 4  # pixels per scanline segment: dense [segments, SEG] blocks, ~1.3x padding


def _scanline_segments(mx: Tensor, my: Tensor, a: Tensor, b: Tensor, c: Tensor, op: Tensor,
                       width: int, height: int):
    """Pixel spans where each depth-sorted Gaussian's alpha can reach 1/255.

    Each Gaussian covers rows y0..y1; on each row the span is the solution of
    a quadratic.  Spans are cut into segments of at most SEG pixels so pairs
    can be evaluated as a dense [S, SEG] block (broadcasting instead of
    per-pair gathers).  Segments stay in Gaussian-major (= depth) order.

    Returns per-segment tensors: Gaussian position, first pixel x, span
    length, flat pixel id of the first pixel, dy, and the row-constant parts
    of sigma (a, c dy^2, b dy) plus opacity.
    """
    dev, dt = mx.device, mx.dtype
    n = mx.shape[0]
    lim = torch.log(op.clamp_min(ALPHA_THRESHOLD)) - _LOG_ALPHA_THRESHOLD  # ln(255 op) >= 0
    det = (a * c - b * b).clamp_min(1e-30)
    ey = (2.0 * lim * a / det).sqrt()
    ey = ey * (1 + 1e-4) + 1e-4  # rounding margin: we need a superset
    y0 = torch.ceil(my - ey - 0.5).clamp(0, height).long()
    y1 = torch.floor(my + ey - 0.5).clamp(-1, height - 1).long()
    bh = (y1 - y0 + 1).clamp_min(0)
    R = int(bh.sum())
    rg = torch.repeat_interleave(torch.arange(n, device=dev), bh, output_size=R)
    ry = y0.index_select(0, rg) + (torch.arange(R, device=dev)
                                   - (torch.cumsum(bh, 0) - bh).index_select(0, rg))
    # Row-level quantities (same expressions as the reference's dense version).
    dy = (ry.to(dt) + 0.5) - my.index_select(0, rg)
    ar, br, cr = a.index_select(0, rg), b.index_select(0, rg), c.index_select(0, rg)
    bdy = br * dy
    cdy2 = cr * dy * dy
    # 0.5 a dx^2 + bdy dx + 0.5 cdy2 - lim <= 0  ->  dx in centre +- half
    lr = lim.index_select(0, rg)
    disc = bdy * bdy - ar * (cdy2 - 2.0 * lr)
    disc = disc + 1e-4 * (bdy * bdy + ar * (cdy2 + 2.0 * lr))
    half = disc.clamp_min(0).sqrt() / ar + 1e-4
    centre = -bdy / ar + mx.index_select(0, rg) - 0.5
    x0 = torch.ceil(centre - half).clamp(0, width).long()
    x1 = torch.floor(centre + half).clamp(-1, width - 1).long()
    lens = torch.where(disc >= 0, (x1 - x0 + 1).clamp_min(0), torch.zeros_like(x0))
    nseg = torch.div(lens + (SEG - 1), SEG, rounding_mode="floor")
    S = int(nseg.sum())
    sr = torch.repeat_interleave(torch.arange(R, device=dev), nseg, output_size=S)
    k = (torch.arange(S, device=dev) - (torch.cumsum(nseg, 0) - nseg).index_select(0, sr)) * SEG
    sx0 = x0.index_select(0, sr) + k
    slen = lens.index_select(0, sr) - k
    spix = (ry * width).index_select(0, sr) + sx0
    return (rg.index_select(0, sr), sx0, slen, spix, dy.index_select(0, sr),
            ar.index_select(0, sr), cdy2.index_select(0, sr), bdy.index_select(0, sr),
            op.index_select(0, rg).index_select(0, sr), mx.index_select(0, rg).index_select(0, sr))


class _Composite(torch.autograd.Function):
    """Front-to-back alpha compositing.

    Inputs are full-size (all N Gaussians); ``order`` lists the visible ones
    front to back.  Gradients come back full-size (zero for culled ones), so
    no [N, C] gather/scatter is needed around the call.
    """

    @staticmethod
    def forward(ctx, means2d, conics, opacities, features, background, order, width, height):
        P = width * height
        N, C = features.shape
        dt = features.dtype
        dev = features.device
        m = means2d.index_select(0, order)
        con = conics.index_select(0, order)
        op_s = opacities.index_select(0, order)
        sg, sx0, slen, spix, sdy, sa, scdy2, sbdy, sop, smx = _scanline_segments(
            m[:, 0], m[:, 1], con[:, 0], con[:, 1], con[:, 2], op_s, width, height)

        # Dense [S, SEG] evaluation of every candidate pair.
        lane = torch.arange(SEG, device=dev)
        dx = ((sx0.to(dt) + 0.5)[:, None] + lane.to(dt)) - smx[:, None]
        sigma = sigma_of(sa[:, None], dx, scdy2[:, None], sbdy[:, None])
        vis = sop[:, None] * torch.exp(-sigma)
        keep = (vis >= ALPHA_THRESHOLD) & (sigma >= 0) & (lane < slen[:, None])

        # Stable radix sort by pixel; rejected pairs get key P and sink to the end.
        key = torch.where(keep, spix[:, None] + lane, P).to(torch.int32).reshape(-1)
        n_keep = int(keep.sum())
        key_sorted, perm = torch.sort(key, stable=True)
        perm = perm[:n_keep]
        pix = key_sorted[:n_keep].long()
        alpha = vis.reshape(-1).index_select(0, perm).clamp_max(MAX_ALPHA)

        # Segmented cumsum of log(1 - alpha) -> transmittance after each pair.
        log1m = torch.log1p(-alpha.double())
        csum = torch.cumsum(log1m, 0)
        counts = torch.bincount(pix, minlength=P)
        base = torch.cat([csum.new_zeros(1), csum])[torch.cumsum(counts, 0) - counts]
        log_t_after = csum - torch.repeat_interleave(base, counts, output_size=n_keep)
        used = (log_t_after > _LOG_T_MIN).nonzero().squeeze(1)

        pix = pix.index_select(0, used)
        src = perm.index_select(0, used)  # flat index into the [S, SEG] block
        seg = torch.div(src, SEG, rounding_mode="floor")
        alpha = alpha.index_select(0, used)
        log1m = log1m.index_select(0, used)
        t_before = torch.exp(log_t_after.index_select(0, used) - log1m).to(dt)
        w = alpha * t_before
        gid = order.index_select(0, sg.index_select(0, seg))  # original Gaussian id
        counts = torch.bincount(pix, minlength=P)
        log_t_final = torch.zeros(P, dtype=torch.float64, device=dev).index_add_(0, pix, log1m)
        t_final = torch.exp(log_t_final).to(dt)

        W = _csr(counts, gid, w, P, N)
        image = (W @ features) + t_final[:, None] * background
        alpha_img = 1.0 - t_final

        ctx.save_for_backward(conics, opacities, features, background, pix, gid, counts,
                              dx.reshape(-1).index_select(0, src), sdy.index_select(0, seg),
                              vis.reshape(-1).index_select(0, src), alpha, t_before, w,
                              t_final)
        return image.reshape(height, width, C), alpha_img.reshape(height, width)

    @staticmethod
    def backward(ctx, g_image, g_alpha):
        (conics, opacities, features, background, pix, gid, counts, dx, dy,
         vis, alpha, t_before, w, t_final) = ctx.saved_tensors
        N, C = features.shape
        P = t_final.shape[0]
        dt, dev = features.dtype, features.device
        G = (g_image.reshape(P, C).contiguous() if g_image is not None
             else features.new_zeros(P, C))
        gA = g_alpha.reshape(P) if g_alpha is not None else features.new_zeros(P)

        # c_k = dL/dw_k = <G[pix_k], F[gid_k]> as a sampled dense-dense product.
        pattern = _csr(counts, gid, w, P, N)
        c = torch.sparse.sampled_addmm(pattern, G, features.t(), beta=0.0).values()
        # dL/dF = W^T G, with W^T built gid-major (stable sort keeps pixels sorted).
        gperm = torch.sort(gid.to(torch.int32), stable=True).indices
        WT = _csr(torch.bincount(gid, minlength=N), pix.index_select(0, gperm),
                  w.index_select(0, gperm), N, P)
        g_features = WT @ G
        g_background = (t_final[:, None] * G).sum(0)

        # dL/dalpha_k = T_k c_k - (sum_{j>k} w_j c_j + T_final (G.bg - gA)) / (1 - alpha_k)
        v = (w * c).double()
        vsum = torch.cumsum(v, 0)
        seg_last = torch.cat([vsum.new_zeros(1), vsum])[torch.cumsum(counts, 0)]
        suffix = seg_last.index_select(0, pix) - vsum
        bg_term = (t_final * (G @ background - gA)).double()
        rest = (suffix + bg_term.index_select(0, pix)).to(dt)
        g_alpha_pair = t_before * c - rest / (1.0 - alpha)
        # alpha = min(MAX_ALPHA, vis), vis = op exp(-sigma)
        g_vis = torch.where(vis < MAX_ALPHA, g_alpha_pair, torch.zeros_like(g_alpha_pair))
        g_sig = g_vis * vis  # = -dL/dsigma
        a = conics[:, 0].index_select(0, gid)
        b = conics[:, 1].index_select(0, gid)
        cc = conics[:, 2].index_select(0, gid)
        gdx, gdy = g_sig * dx, g_sig * dy

        def acc(vals: Tensor) -> Tensor:
            return torch.zeros(N, dtype=dt, device=dev).index_add_(0, gid, vals)

        # sigma = 0.5(a dx^2 + c dy^2) + b dx dy with dx = px + 0.5 - mx
        g_mx = acc(a * gdx + b * gdy)
        g_my = acc(b * gdx + cc * gdy)
        g_a = acc(-0.5 * gdx * dx)
        g_b = acc(-gdx * dy)
        g_c = acc(-0.5 * gdy * dy)
        g_op = acc(g_vis * vis) / opacities.clamp_min(1e-30)
        return (torch.stack([g_mx, g_my], 1), torch.stack([g_a, g_b, g_c], 1), g_op,
                g_features, g_background, None, None, None)


def composite_cpu(means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor,
                  background: Tensor, order: Tensor, width: int, height: int
                  ) -> tuple[Tensor, Tensor]:
    """Image [H,W,C] and alpha [H,W]; ``order`` = visible ids, front to back."""
    return _Composite.apply(means2d, conics, opacities, features, background, order,
                            width, height)
