"""Fast differentiable CPU rasterizer over sparse (pixel, gaussian) pairs.

Why this shape: autograd over per-pair tensors records dozens of large
intermediates and was what made an earlier prototype slow, so compositing is
one ``torch.autograd.Function`` with a hand-written backward, and every step
is a handful of flat, vectorised (mostly in-place) passes:

1. *Scanline binning* (instead of 16x16 tiles).  For each Gaussian (front to
   back) and each image row it reaches, a quadratic gives the exact pixel
   span where its alpha can reach 1/255 (plus a rounding margin), so ~99.9%
   of the generated pairs pass the alpha test (a tile rasterizer evaluates
   whole tiles).  Spans are cut into segments of ``SEG`` pixels, evaluated
   as a dense [S, SEG] block by broadcasting (no per-pair gathers).  The
   per-pair alpha test uses the very same operations as the reference, so
   both agree bit for bit on which pairs exist.
2. *Per-pixel lists.*  A stable radix sort on the pixel id groups the pairs
   per pixel while keeping the depth order inside each group.
3. *Transmittance.*  log T is a segmented cumulative sum of log(1 - alpha)
   (one float64 cumsum minus each pixel's offset); T <= 1e-4 early
   termination becomes a mask, and only surviving pairs go further.
4. *Channels.*  The [pairs, C] work is done by sparse kernels: the image is
   ``W @ F`` with W the [P, N] CSR matrix of blending weights; the backward
   needs ``W^T @ dI`` and the sampled product ``(dI @ F^T)[pairs]``.
5. *Backward.*  dL/dalpha per pair from a segmented suffix sum, then 1-D
   ``index_add_`` of a few per-pair moments into per-Gaussian sums.

Steps 1-3 run per band of image rows holding at most ``band_budget``
candidate pairs (pixels in different rows never interact), which bounds
memory for full-resolution RGB renders; latent-sized images are one band.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .project import ALPHA_THRESHOLD, MAX_ALPHA, TRANSMITTANCE_THRESHOLD

_LOG_T_MIN = math.log(TRANSMITTANCE_THRESHOLD)
_LOG_ALPHA_THRESHOLD = math.log(ALPHA_THRESHOLD)
SEG = 4  # pixels per scanline segment (~1.3x padding for latent-sized splats)
_MARGIN = 1e-4  # relative/absolute slack on spans: they must be supersets


def sigma_of(a: Tensor, dx: Tensor, cdy2: Tensor, bdy: Tensor) -> Tensor:
    """Gaussian exponent 0.5 (a dx^2 + c dy^2) + b dx dy, shared by both CPU paths.

    ``cdy2 = c*dy*dy`` and ``bdy = b*dy``.  The fast path evaluates the same
    operations in the same order (in place), so both round identically and
    the discrete ``alpha >= 1/255`` decisions agree even in float32.
    """
    return 0.5 * (a * dx * dx + cdy2) + bdy * dx


def _at_segment_ends(values: Tensor, ends: Tensor) -> Tensor:
    """``values[ends - 1]``, with 0 where ``ends == 0``.

    With ``ends = cumsum(counts)`` (or ``cumsum(counts) - counts``) this reads
    a running sum at the end of (or just before) each pixel's run of pairs.
    """
    if values.numel() == 0:
        return values.new_zeros(ends.shape)
    idx = ends - 1
    return values.index_select(0, idx.clamp(min=0)).masked_fill_(idx < 0, 0.0)


def _csr(row_counts: Tensor, col: Tensor, values: Tensor, rows: int, cols: int) -> Tensor:
    crow = torch.zeros(rows + 1, dtype=torch.long, device=col.device)
    torch.cumsum(row_counts, 0, out=crow[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, col, values, size=(rows, cols),
                                       check_invariants=False)


def _rows(m: Tensor, con: Tensor, op: Tensor, width: int, height: int):
    """Scanline spans of depth-sorted Gaussians, in Gaussian-major order.

    Row y of a Gaussian spans dx in centre(dy) +- half(dy) with
    centre = -(b/a) dy and half^2 = 2 ln(255 op)/a - (det/a^2) dy^2
    (the alpha = 1/255 level set).  Returns per row: Gaussian position, image
    row, dy, first pixel x and span length (0 for empty rows).
    """
    dev, dt = m.device, m.dtype
    n = m.shape[0]
    mx, my = m[:, 0], m[:, 1]
    a, b, c = con[:, 0], con[:, 1], con[:, 2]
    lim2 = 2.0 * (torch.log(op.clamp_min(ALPHA_THRESHOLD)) - _LOG_ALPHA_THRESHOLD)
    det = (a * c - b * b).clamp_min(1e-30)
    k1 = lim2 / a  # half^2 at dy = 0
    k2 = det / (a * a)  # half^2 = k1 - k2 dy^2
    ey = (lim2 * a / det).sqrt() * (1 + _MARGIN) + _MARGIN
    y0 = torch.ceil(my - ey - 0.5).clamp_(0, height).long()
    bh = (torch.floor(my + ey - 0.5).clamp_(-1, height - 1).long() - y0 + 1).clamp_(min=0)
    R = int(bh.sum())
    rg = torch.repeat_interleave(torch.arange(n, device=dev), bh, output_size=R)
    ry = torch.arange(R, device=dev) - (torch.cumsum(bh, 0) - bh - y0).index_select(0, rg)
    # Same rounding as the reference's (i + 0.5) - my.
    dy = (ry.to(dt) + 0.5) - my.index_select(0, rg)
    q1, q2 = k1.index_select(0, rg), k2.index_select(0, rg) * (dy * dy)
    half = ((q1 - q2) + _MARGIN * (q1 + q2)).clamp_(min=0).sqrt_() + _MARGIN
    centre = (mx - 0.5).index_select(0, rg) - (b / a).index_select(0, rg) * dy
    x0 = torch.ceil(centre - half).clamp_(0, width).long()
    lens = (torch.floor(centre + half).clamp_(-1, width - 1).long() - x0 + 1).clamp_(min=0)
    return rg, ry, dy, x0, lens


def _bands(ry: Tensor, nseg: Tensor, height: int, budget: int) -> list[tuple[int, int]]:
    """Split image rows into bands of at most ``budget`` candidate pairs each.

    Pixels in different rows never interact, so bands are rendered one after
    the other; this bounds memory for full-resolution RGB renders.
    """
    per_row = torch.zeros(height, dtype=torch.long, device=ry.device)
    per_row.index_add_(0, ry, nseg * SEG)
    if int(per_row.sum()) <= budget:
        return [(0, height)]
    bands, start, acc = [], 0, 0
    for y, cnt in enumerate(per_row.tolist()):
        if acc and acc + cnt > budget:
            bands.append((start, y))
            start, acc = y, 0
        acc += cnt
    bands.append((start, height))
    return bands


def _band_pairs(rows, per_g, y_lo: int, y_hi: int, width: int, dt):
    """Composited pairs of the image rows [y_lo, y_hi), sorted by pixel.

    Returns global pixel id, depth-sorted Gaussian position, dx, dy, clamped
    alpha, log T after the pair (float64) and log(1 - alpha) of every pair
    that survives the alpha test and early termination.
    """
    rg, ry, dy, x0, lens = rows
    a, b, c, op, mx = per_g
    dev = ry.device
    P_band = (y_hi - y_lo) * width
    nseg = torch.div(lens + (SEG - 1), SEG, rounding_mode="floor")
    S = int(nseg.sum())
    sr = torch.repeat_interleave(torch.arange(ry.shape[0], device=dev), nseg, output_size=S)
    k = (torch.arange(S, device=dev) - (torch.cumsum(nseg, 0) - nseg).index_select(0, sr)) * SEG
    sx0 = x0.index_select(0, sr) + k
    slen = lens.index_select(0, sr) - k
    spix = ((ry - y_lo) * width).index_select(0, sr) + sx0  # band-local pixel id
    sg = rg.index_select(0, sr)
    sdy = dy.index_select(0, sr)

    # Dense [S, SEG] evaluation of every candidate pair: the same operations in
    # the same order as sigma_of (in place), so the alpha test matches the reference.
    lane = torch.arange(SEG, device=dev)
    dx = (sx0.to(dt) + 0.5)[:, None] + lane.to(dt)
    dx.sub_(mx.index_select(0, sg)[:, None])
    sigma = a.index_select(0, sg)[:, None] * dx
    sigma.mul_(dx).add_((c.index_select(0, sg) * sdy * sdy)[:, None]).mul_(0.5)
    sigma.add_((b.index_select(0, sg) * sdy)[:, None] * dx)
    vis = sigma.neg_().exp_().mul_(op.index_select(0, sg)[:, None])  # reuses sigma
    keep = vis >= ALPHA_THRESHOLD
    keep &= lane < slen[:, None]

    # Stable radix sort by pixel; rejected pairs get key P_band and sink to the end.
    key = spix.to(torch.int32)[:, None] + lane.to(torch.int32)
    key.masked_fill_(~keep, P_band)
    n_keep = int(keep.sum())
    key_sorted, perm = torch.sort(key.reshape(-1), stable=True)
    perm = perm[:n_keep]
    pix = key_sorted[:n_keep].long()
    alpha = vis.reshape(-1).index_select(0, perm).clamp_(max=MAX_ALPHA)

    # Segmented cumsum of log(1 - alpha) -> log transmittance after each pair.
    # The running sum is float64 so that each pixel's offset cancels precisely.
    log1m = torch.log1p(-alpha)
    lta = torch.cumsum(log1m, 0, dtype=torch.float64)
    counts = torch.bincount(pix, minlength=P_band)
    base = _at_segment_ends(lta, torch.cumsum(counts, 0) - counts)
    lta.sub_(torch.repeat_interleave(base, counts, output_size=n_keep))
    used = (lta > _LOG_T_MIN).nonzero().squeeze(1)

    src = perm.index_select(0, used)  # flat index into the [S, SEG] block
    seg = torch.div(src, SEG, rounding_mode="floor")
    return (pix.index_select(0, used).add_(y_lo * width), sg.index_select(0, seg),
            dx.reshape(-1).index_select(0, src), sdy.index_select(0, seg),
            alpha.index_select(0, used), lta.index_select(0, used), log1m.index_select(0, used))


class _Composite(torch.autograd.Function):
    """Front-to-back alpha compositing.

    Inputs are full-size (all N Gaussians); ``order`` lists the visible ones
    front to back.  Gradients come back full-size (zero for culled ones), so
    no [N, C] gather/scatter is needed around the call.
    """

    @staticmethod
    def forward(ctx, means2d, conics, opacities, features, background, order, width, height,
                band_budget):
        P = width * height
        N, C = features.shape
        dt, dev = features.dtype, features.device
        m = means2d.index_select(0, order)
        con = conics.index_select(0, order)
        op = opacities.index_select(0, order)
        rows = _rows(m, con, op, width, height)
        per_g = (con[:, 0], con[:, 1], con[:, 2], op, m[:, 0])
        ry, lens = rows[1], rows[4]
        nseg = torch.div(lens + (SEG - 1), SEG, rounding_mode="floor")
        parts = []
        for y_lo, y_hi in _bands(ry, nseg, height, band_budget):
            if y_lo == 0 and y_hi == height:
                sub = rows
            else:
                sel = ((ry >= y_lo) & (ry < y_hi)).nonzero().squeeze(1)
                sub = tuple(t.index_select(0, sel) for t in rows)
            parts.append(_band_pairs(sub, per_g, y_lo, y_hi, width, dt))
        pix, gpos, dx, dy, alpha, lta, log1m = (
            p[0] if len(parts) == 1 else torch.cat(p) for p in zip(*parts))
        del parts

        t_before = (lta - log1m).exp_().to(dt)
        w = alpha * t_before
        gid = order.index_select(0, gpos)  # original Gaussian id
        counts = torch.bincount(pix, minlength=P)
        # T_final = T after each pixel's last composited pair (1 if none).
        t_final = torch.where(counts > 0, _at_segment_ends(lta, torch.cumsum(counts, 0)).exp_(),
                              1.0).to(dt)

        image = _csr(counts, gid, w, P, N) @ features
        image.addcmul_(t_final[:, None], background[None, :])
        alpha_img = 1.0 - t_final

        ctx.save_for_backward(conics, opacities, features, background, pix, gid, counts, dx,
                              dy, alpha, t_before, w, t_final)
        return image.reshape(height, width, C), alpha_img.reshape(height, width)

    @staticmethod
    def backward(ctx, g_image, g_alpha):
        (conics, opacities, features, background, pix, gid, counts, dx, dy,
         alpha, t_before, w, t_final) = ctx.saved_tensors
        N, C = features.shape
        P = t_final.shape[0]
        dt, dev = features.dtype, features.device
        G = (g_image.reshape(P, C).contiguous() if g_image is not None
             else features.new_zeros(P, C))
        gA = g_alpha.reshape(P) if g_alpha is not None else features.new_zeros(P)

        # c_k = dL/dw_k = <G[pix_k], F[gid_k]>, a sampled dense-dense product.
        c = torch.sparse.sampled_addmm(_csr(counts, gid, w, P, N), G, features.t(),
                                       beta=0.0).values()
        # dL/dF = W^T G, with W^T built Gaussian-major.
        g_features = None
        if ctx.needs_input_grad[3]:
            gperm = torch.sort(gid.to(torch.int32), stable=True).indices
            g_features = _csr(torch.bincount(gid, minlength=N), pix.index_select(0, gperm),
                              w.index_select(0, gperm), N, P) @ G
        g_background = t_final @ G

        # dL/dalpha_k = T_k c_k - (sum_{j>k} w_j c_j + T_final (G.bg - gA)) / (1 - alpha_k)
        vsum = torch.cumsum(w * c, 0, dtype=torch.float64)
        per_pix = _at_segment_ends(vsum, torch.cumsum(counts, 0))
        per_pix += (t_final * (G @ background - gA)).double()
        rest = per_pix.index_select(0, pix).sub_(vsum).to(dt)
        g_alpha_pair = t_before * c - rest / (1.0 - alpha)
        # alpha = min(MAX_ALPHA, vis) with vis = op exp(-sigma); unclamped alpha == vis.
        g_sig = g_alpha_pair.mul_(alpha).masked_fill_(alpha >= MAX_ALPHA, 0.0)  # -dL/dsigma

        def acc(vals: Tensor) -> Tensor:
            return torch.zeros(N, dtype=dt, device=dev).index_add_(0, gid, vals)

        # sigma = 0.5(a dx^2 + c dy^2) + b dx dy with dx = px + 0.5 - mx: the
        # per-Gaussian sums only need moments of g_sig times dx, dy.
        gdx, gdy = g_sig * dx, g_sig * dy
        s_x, s_y = acc(gdx), acc(gdy)
        s_xx, s_xy, s_yy = acc(gdx * dx), acc(gdx * dy), acc(gdy * dy)
        a, b, cc = conics.unbind(1)
        g_means2d = torch.stack([a * s_x + b * s_y, b * s_x + cc * s_y], 1)
        g_conics = torch.stack([-0.5 * s_xx, -s_xy, -0.5 * s_yy], 1)
        g_op = acc(g_sig) / opacities.clamp_min(1e-30)
        return g_means2d, g_conics, g_op, g_features, g_background, None, None, None, None


def composite_cpu(means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor,
                  background: Tensor, order: Tensor, width: int, height: int,
                  band_budget: int = 1 << 20) -> tuple[Tensor, Tensor]:
    """Image [H,W,C] and alpha [H,W]; ``order`` = visible ids, front to back.

    ``band_budget`` caps the candidate pairs held in memory at once (the image
    is processed in bands of rows when a render would exceed it).
    """
    return _Composite.apply(means2d, conics, opacities, features, background, order,
                            width, height, int(band_budget))
