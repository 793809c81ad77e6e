"""Fast differentiable CPU rasterizer over sparse (pixel, gaussian) pairs.

Why this shape: autograd over per-pair tensors records dozens of large
intermediates and was what made an earlier prototype slow, so compositing is
one ``torch.autograd.Function`` with a hand-written backward, and every step
is a handful of flat, vectorised (mostly in-place) passes.  On a small CPU
each pass over the ~10^5-10^6 pairs costs about the same, so the design
counts passes and avoids sorting pairs, int64 divisions and boolean
``where``/``masked_fill``/``nonzero`` (numpy's compare and nonzero are ~10x
faster):

1. *Scanline spans.*  For each Gaussian (front to back) and each image row
   it reaches, a quadratic gives the exact pixel span where its alpha can
   reach 1/255 (plus a rounding margin), so nearly every generated pair
   passes the alpha test (a tile rasterizer evaluates whole tiles).
2. *Cells.*  Each row is cut into cells of ``SEG`` columns on a fixed grid;
   a span becomes one segment per cell it touches.  A stable (radix) sort of
   the segments by cell -- a few segments per Gaussian, not one key per
   pair -- lists, per cell, the Gaussians that touch it front to back.
3. *Lane-major candidates.*  The pairs of all segments are evaluated as one
   dense [SEG, segments] block by broadcasting, with the very same
   operations as the reference (so both agree bit for bit on which pairs
   pass the alpha test).  Flattened, lane j of the segments of cell c is a
   contiguous run: the pixel (c, j)'s pairs, front to back.  Pixels are
   therefore kept in this "q order" (lane-major) internally; no per-pair
   sort is ever needed.  Only the pairs that pass the alpha test go on.
4. *Transmittance.*  log T is a running sum of log(1 - alpha) in exact
   int64 fixed point, reset at every pixel; T <= 1e-4 early termination
   becomes a threshold, and only surviving pairs go further.  Exact sums
   make every pixel independent of where its pairs sit in the flat list
   (rendering in bands changes no transmittance).
5. *Channels.*  The image is ``W @ F`` with W the [P, N] CSR matrix of
   blending weights.  The backward needs ``c = (dI @ F^T)[pairs]`` and the
   per-Gaussian sums ``W^T @ dI`` and moments of dL/dsigma: with many
   channels as a sampled product and sparse products with a Gaussian-major
   CSR (the pairs' generation order, found by counting, not sorting); with
   few (RGB) as per-channel gathers and scatter-adds, cheaper there.
6. *Backward.*  dL/dalpha per pair from per-pixel suffix sums (exact fixed
   point again), then the per-Gaussian sums above.

Steps 3-4 run per band of image rows holding at most ``band_budget``
candidate pairs (pixels in different rows never interact), which bounds
memory for full-resolution RGB renders; latent-sized images are one band.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

from .project import ALPHA_THRESHOLD, MAX_ALPHA, TRANSMITTANCE_THRESHOLD

_LOG_T_MIN = math.log(TRANSMITTANCE_THRESHOLD)
_LOG_ALPHA_THRESHOLD = math.log(ALPHA_THRESHOLD)
SEG = 4  # columns per cell: a power of two <= 8 (lane masks are packed in a byte)
_SHIFT = SEG.bit_length() - 1
_MARGIN = 1e-4  # relative/absolute slack on spans: they must be supersets
_FEW_CHANNELS = 4  # up to this many channels, the backward uses scatter-adds
_I32 = torch.int32


def sigma_of(a: Tensor, dx: Tensor, cdy2: Tensor, bdy: Tensor) -> Tensor:
    """Gaussian exponent 0.5 (a dx^2 + c dy^2) + b dx dy, shared by both CPU paths.

    ``cdy2 = c*dy*dy`` and ``bdy = b*dy``.  The fast path evaluates the same
    operations in the same order (in place), so both round identically and
    the discrete ``alpha >= 1/255`` decisions agree even in float32.
    """
    return 0.5 * (a * dx * dx + cdy2) + bdy * dx


# --- small helpers: numpy where it is several times faster on CPU -----------------

def _on_cpu(*ts: Tensor) -> bool:
    return all(t.device.type == "cpu" for t in ts)


def _where_above(x: Tensor, lim: float) -> Tensor:
    """Int64 indices of the entries of contiguous ``x`` above ``lim``, flattened
    (numpy's compare and nonzero are ~10x faster than torch's on CPU)."""
    if _on_cpu(x):
        return torch.from_numpy(np.flatnonzero(x.numpy() > lim))
    return (x.reshape(-1) > lim).nonzero().squeeze(1)


def _to_long(x: Tensor) -> Tensor:
    """Truncation to int64 (numpy's conversion is ~3x faster on CPU)."""
    if _on_cpu(x):
        return torch.from_numpy(x.numpy().astype(np.int64))
    return x.long()


def _repeat(values: Tensor, counts: Tensor, total: int) -> Tensor:
    """``values[i]`` repeated ``counts[i]`` times."""
    if _on_cpu(values, counts):
        return torch.from_numpy(np.repeat(values.numpy(), counts.numpy()))
    return torch.repeat_interleave(values, counts, output_size=total)


def _stable_argsort(keys: Tensor, bound: int) -> Tensor:
    """Permutation that stably sorts int32 keys in [0, bound).

    numpy's stable sort of 16-bit keys is a radix sort (~3x faster than
    torch's); larger keys or non-CPU tensors use torch.sort.
    """
    if _on_cpu(keys) and bound <= 1 << 16:
        return torch.from_numpy(np.argsort(keys.numpy().astype(np.uint16), kind="stable"))
    return torch.sort(keys, stable=True).indices


def _below(x: float, dt: torch.dtype) -> float:
    """The largest value of dtype ``dt`` below ``x`` as ``dt`` rounds it."""
    t = torch.tensor(x, dtype=dt)
    return float(torch.nextafter(t, torch.tensor(-math.inf, dtype=dt)))


def _fixed_point_bits(n: int, bound: float) -> int:
    """Bits after the binary point for exact int64 running sums of ``n`` values
    of magnitude <= ``bound`` (no overflow: n * bound * 2^bits < 2^62).

    Fixed-point sums are exact, so every pixel's prefix sums are independent
    of where its pairs sit in the flat list, and log(1 - alpha) of float32
    alphas (multiples of 2^-32 since alpha >= 1/255) is summed without any
    rounding at all.  Capped at 100 so that 2^+-bits is a normal float32.
    """
    return int(min(100, math.floor(62 - math.log2(max(n, 1) * max(bound, 1e-30)))))


def _cat(parts):
    """torch.cat of per-band results (also of tuples of tensors)."""
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def _at_segment_ends(values: Tensor, ends: Tensor) -> Tensor:
    """``values[ends - 1]``, with 0 where ``ends == 0``.

    With ``ends = cumsum(counts)`` this reads each pixel's last pair.
    """
    if values.numel() == 0:
        return values.new_zeros(ends.shape)
    idx = ends - 1
    return values.index_select(0, idx.clamp(min=0)).masked_fill_(idx < 0, 0)


def _csr(row_counts: Tensor, col: Tensor, values: Tensor, rows: int, cols: int) -> Tensor:
    """CSR matrix with int32 indices (when they fit): ~20% faster products than int64."""
    it = _I32 if max(values.shape[0], cols) < 1 << 31 else torch.long
    crow = torch.zeros(rows + 1, dtype=it, device=col.device)
    torch.cumsum(row_counts, 0, out=crow[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, col.to(it), values, size=(rows, cols),
                                       check_invariants=False)


# --- steps 1-2: spans and sorted cell segments -------------------------------------

def _rows(mx: Tensor, my: Tensor, a: Tensor, b: Tensor, c: Tensor, op: Tensor, width: int,
          height: int):
    """Scanline spans of depth-sorted Gaussians, in Gaussian-major order.

    Row y of a Gaussian spans dx in centre(dy) +- half(dy) with
    centre = -(b/a) dy and half^2 = 2 ln(255 op)/a - (det/a^2) dy^2
    (the alpha = 1/255 level set).  Returns per row (int32): Gaussian
    position, image row, first pixel x, end x (exclusive; x1 <= x0 for empty
    rows); and dy.
    """
    dev, dt = mx.device, mx.dtype
    n = mx.shape[0]
    lim2 = 2.0 * (torch.log(op.clamp_min(ALPHA_THRESHOLD)) - _LOG_ALPHA_THRESHOLD)
    det = (a * c - b * b).clamp_min(1e-30)
    ey = (lim2 * a / det).sqrt() * (1 + _MARGIN) + _MARGIN
    y0 = torch.ceil(my - ey - 0.5).clamp_(0, height).to(_I32)
    bh = (torch.floor(my + ey - 0.5).clamp_(-1, height - 1).to(_I32) - y0 + 1).clamp_(min=0)
    R = int(bh.sum())
    rg = _repeat(torch.arange(n, dtype=_I32, device=dev), bh, R)
    ry = torch.arange(R, dtype=_I32, device=dev).sub_(
        (torch.cumsum(bh, 0, dtype=_I32) - bh - y0).index_select(0, rg))
    # Same rounding as the reference's (i + 0.5) - my.
    dy = (ry.to(dt) + 0.5).sub_(my.index_select(0, rg))
    q1 = (lim2 / a).index_select(0, rg)  # half^2 at dy = 0
    q2 = (det / (a * a)).index_select(0, rg).mul_(dy * dy)
    half = ((q1 - q2) + _MARGIN * (q1 + q2)).clamp_(min=0).sqrt_() + _MARGIN
    centre = (mx - 0.5).index_select(0, rg).sub_((b / a).index_select(0, rg).mul_(dy))
    x0 = torch.ceil(centre - half).clamp_(0, width).to(_I32)
    x1 = torch.floor(centre.add_(half)).clamp_(-1, width - 1).to(_I32) + 1
    return rg, ry, x0, x1, dy


class _Segments:
    """Cell segments of all spans, sorted by cell (row-major), depth order kept.

    A cell is SEG adjacent pixels of one row; its id is row * cells_per_row +
    column // SEG.  Per sorted segment: Gaussian position ``g``, ``dy`` and
    the operands of the alpha test (first pixel centre ``xc``, ``mx``, ``a``,
    ``bdy`` = b dy, ``cdy2`` = c dy dy, ``op``); per cell: ``cnt`` segments,
    the first at ``start``; ``perm`` maps a sorted segment to its
    Gaussian-major (generation) index.
    """

    def __init__(self, mx: Tensor, my: Tensor, a: Tensor, b: Tensor, c: Tensor, op: Tensor,
                 width: int, height: int):
        dev, dt = mx.device, mx.dtype
        self.nb = nb = (width + SEG - 1) >> _SHIFT  # cells per row
        ncell = height * nb
        rg, ry, x0, x1, dy = _rows(mx, my, a, b, c, op, width, height)
        b0 = x0 >> _SHIFT
        nseg = ((x1 + (SEG - 1)) >> _SHIFT).sub_(b0).mul_(x1 > x0)
        S = self.S = int(nseg.sum())
        first = torch.cumsum(nseg, 0, dtype=_I32).sub_(nseg)
        # Row of each segment: the last row whose first segment is at or before it
        # (empty rows share their successor's first: the successor is counted last).
        r = torch.cumsum(torch.bincount(first, minlength=S + 1)[:S], 0, dtype=_I32).sub_(1)
        key = ry.mul_(nb).add_(b0).sub_(first).index_select(0, r).add_(
            torch.arange(S, dtype=_I32, device=dev))
        self.perm = _stable_argsort(key, ncell)
        r = r.index_select(0, self.perm)
        self.cnt = torch.bincount(key, minlength=ncell)
        self.start = torch.cumsum(self.cnt, 0) - self.cnt
        self.cell = _repeat(torch.arange(ncell, dtype=_I32, device=dev), self.cnt, S)
        # Per-segment operands of the alpha test, rounded as the reference's.
        self.g = g = rg.index_select(0, r)
        self.dy = sdy = dy.index_select(0, r)
        self.mx = mx.index_select(0, g)
        self.a = a.index_select(0, g)
        self.bdy = b.index_select(0, g).mul_(sdy)
        self.cdy2 = c.index_select(0, g).mul_(sdy).mul_(sdy)
        self.op = op.index_select(0, g)
        cx = ((torch.arange(nb, device=dev) << _SHIFT).to(dt) + 0.5).repeat(height)
        self.xc = cx.index_select(0, self.cell)

    def bands(self, budget: int) -> list[tuple[int, int]]:
        """Cell ranges [c_lo, c_hi) of bands of whole rows holding at most
        ``budget`` candidate pairs (at least one row each)."""
        nb = self.nb
        height = self.cnt.shape[0] // nb
        if self.S * SEG <= budget:
            return [(0, height * nb)]
        row_start = torch.cat([self.start[::nb], self.start.new_tensor([self.S])]).tolist()
        out, y_lo = [], 0
        for y in range(1, height + 1):
            if y == height or (row_start[y + 1] - row_start[y_lo]) * SEG > budget:
                out.append((y_lo * nb, y * nb))
                y_lo = y
        return out


# --- steps 3-4: candidates, transmittance, surviving pairs -------------------------

def _band_pairs(sg: _Segments, c_lo: int, c_hi: int, dt, bits: int, want_dx: bool):
    """Composited pairs of the cells [c_lo, c_hi) (whole rows).

    Candidates are a dense [SEG, segments] block, lane-major: flattened, it
    lists the pairs of pixel (cell c, lane j) contiguously and front to back;
    the band's pixel order is q = j * (c_hi - c_lo) + (c - c_lo).  Returns,
    in q order, the pixels' pair counts; and for every pair that passes the
    alpha test and early termination: its segment, clamped alpha and log T
    after it (int64, units of 2^-bits); then either the pairs' dx (if
    ``want_dx``) or (the pairs' ranks among their segment's pairs, each
    segment's number of pairs), both uint8.
    """
    dev = sg.g.device
    s_lo = int(sg.start[c_lo]) if c_lo < sg.cnt.shape[0] else sg.S
    s_hi = int(sg.start[c_hi - 1] + sg.cnt[c_hi - 1])
    Sb, nc = s_hi - s_lo, c_hi - c_lo
    if Sb == 0:
        z = torch.zeros(0, dtype=torch.long, device=dev)
        return (torch.zeros(SEG * nc, dtype=torch.long, device=dev), z, sg.xc[:0], z,
                sg.xc[:0] if want_dx else (z.to(torch.uint8), z.to(torch.uint8)))
    sl = slice(s_lo, s_hi)
    lane = torch.arange(SEG, device=dev)

    # Dense [SEG, Sb] evaluation of every candidate pair: the same operations in
    # the same order as sigma_of (in place; -sigma is built directly, negation
    # being exact), so the alpha test matches the reference.  Spans are
    # supersets of the alpha >= 1/255 region, so whole cells can be tested;
    # lanes past the image's right edge become pixels that are cropped.
    dx = (sg.xc[sl][None, :] + lane.to(dt)[:, None]).sub_(sg.mx[sl])
    nsigma = sg.a[sl] * dx
    nsigma.mul_(dx).add_(sg.cdy2[sl]).mul_(-0.5)
    nsigma.sub_(sg.bdy[sl] * dx if want_dx else dx.mul_(sg.bdy[sl]))  # dx: kept if wanted
    vis = nsigma.exp_().mul_(sg.op[sl])  # reuses nsigma

    # Kept candidates (alpha >= 1/255), in block order; pixel (c, j)'s run of the
    # block, [j*Sb + start[c], + cnt[c]), is found in that list by bisection.
    start = sg.start[c_lo:c_hi] - s_lo
    kept = _where_above(vis, _below(ALPHA_THRESHOLD, dt))
    bounds = torch.cat([(start[None, :] + lane[:, None] * Sb).view(-1),
                        start.new_tensor([SEG * Sb])])
    kb = torch.searchsorted(kept, bounds)
    a_k = vis.view(-1).index_select(0, kept).clamp_(max=MAX_ALPHA)

    # log T after each pair in exact fixed point (2^-bits units): one running
    # sum, reset at each pixel by subtracting the previous pixel's total from its
    # first entry (put back afterwards).
    li = torch.neg(a_k)
    li = _to_long(torch.log1p(li, out=li).mul_(2.0 ** bits))
    firsts = kb[:-1].masked_select(kb[1:] > kb[:-1])
    run = torch.cumsum(li, 0)
    base = _at_segment_ends(run, firsts)  # running sum before each pixel
    step = torch.diff(base, prepend=base[:1] * 0)
    li.index_add_(0, firsts, step.neg())
    lta = torch.cumsum(li, 0, out=run)
    li.index_add_(0, firsts, step)

    # Used: T after the pair stays above the threshold.
    u = _where_above(lta, math.floor(_LOG_T_MIN * 2.0 ** bits))
    e = kept.index_select(0, u)
    pos = torch.searchsorted(u, kb)
    counts = pos[1:] - pos[:-1]
    s = e.clone()
    for j in range(1, SEG):  # e = j * Sb + s, one slice per lane
        s[int(pos[j * nc]):int(pos[(j + 1) * nc])] -= j * Sb
    s.add_(s_lo)
    lt_after = lta.index_select(0, u)
    if want_dx:  # the scatter-add backward works with dx, dy
        return counts, s, a_k.index_select(0, u), lt_after, dx.view(-1).index_select(0, e)
    # The sparse backward needs each pair's rank among its segment's used lanes
    # (an exclusive prefix over lanes) and each segment's number of pairs.
    u8 = torch.zeros(SEG, Sb, dtype=torch.uint8, device=dev)
    u8.view(-1).index_fill_(0, e, 1)
    ex = torch.zeros(SEG + 1, Sb, dtype=torch.uint8, device=dev)
    for j in range(SEG):
        torch.add(ex[j], u8[j], out=ex[j + 1])
    return counts, s, a_k.index_select(0, u), lt_after, (ex.view(-1).index_select(0, e), ex[SEG])


# --- steps 5-6: compositing and its backward ---------------------------------------

class _Composite(torch.autograd.Function):
    """Front-to-back alpha compositing.

    Inputs are full-size (all N Gaussians); ``order`` lists the visible ones
    front to back.  Gradients come back full-size (zero for culled ones), so
    no [N, C] gather/scatter is needed around the call.  Internally pixels
    are in the bands' q order (``qpix`` maps q to the pixel of an image
    padded to whole cells).
    """

    @staticmethod
    def forward(ctx, means2d, conics, opacities, features, background, order, width, height,
                band_budget):
        N, C = features.shape
        dt, dev = features.dtype, features.device
        # Columns of the visible Gaussians, front to back ([N, k] inputs are read by
        # column: the projection returns them column-major).
        cols = [t.index_select(0, order) for t in (*means2d.unbind(1), *conics.unbind(1))]
        op = opacities.index_select(0, order)
        sg = _Segments(*cols, op, width, height)
        nb = sg.nb
        bits = _fixed_point_bits(sg.S * SEG, -math.log1p(-MAX_ALPHA))
        # Few channels: per-pair dot products and per-Gaussian sums by scatter-adds
        # into [N] rows (cache-resident) beat the sparse kernels, whose per-pair
        # overhead and Gaussian-major permutation dominate then.
        scatter = C <= _FEW_CHANNELS
        parts, qpix = [], []
        lane = torch.arange(SEG, device=dev)[:, None]
        for c_lo, c_hi in sg.bands(band_budget):
            parts.append(_band_pairs(sg, c_lo, c_hi, dt, bits, scatter))
            qpix.append((torch.arange(c_lo, c_hi, device=dev) * SEG + lane).view(-1))
        counts, s, alpha, lta, extra = (
            p[0] if len(parts) == 1 else _cat(p) for p in zip(*parts))
        dx, (rank, nu) = (extra, (None, None)) if scatter else (None, extra)
        qpix = qpix[0] if len(qpix) == 1 else torch.cat(qpix)
        del parts
        Pq = counts.shape[0]  # = height * nb * SEG

        gpos = sg.g.index_select(0, s)
        dy = sg.dy.index_select(0, s) if scatter else None
        unit = 2.0 ** -bits
        # T after each pair: exp in the features' dtype (in float32, converting
        # log T (|log T| < 10) costs < 1e-6 relative, below the reference's own
        # cumprod error); T before it is that over (1 - alpha).
        one_minus = 1.0 - alpha
        w = lta.to(dt).mul_(unit).exp_().div_(one_minus).mul_(alpha)
        gid = order.index_select(0, gpos)  # original Gaussian id
        # T_final = T after each pixel's last composited pair (1 if none).
        ends = torch.cumsum(counts, 0)
        t_final = torch.where(counts > 0, _at_segment_ends(lta, ends).double().mul_(unit).exp_(),
                              1.0).to(dt)

        # For the backward: -dL/dsigma = alpha dL/dalpha = w c - rest * alpha / (1 - alpha),
        # and 0 where alpha is clamped (it then no longer depends on sigma).
        clamped = _where_above(alpha, _below(MAX_ALPHA, dt))
        ratio = alpha.div_(one_minus)

        W = _csr(counts, gid, w, Pq, N)
        image = W @ features
        image.addcmul_(t_final[:, None], background[None, :])
        wp = nb * SEG
        image = image.new_empty(Pq, C).index_copy_(0, qpix, image).view(height, wp, C)
        t_final_img = t_final.new_empty(Pq).index_copy_(0, qpix, t_final).view(height, wp)
        t_final_img = t_final_img[:, :width].contiguous()

        ctx.shape = (height, width, wp)
        ctx.scatter = scatter
        ctx.W = W
        ctx.save_for_backward(*cols, op, features, background, order, qpix, gid, gpos, s,
                              rank, nu, sg.perm, counts, ratio, clamped, w, t_final,
                              t_final_img, dx, dy)
        return image[:, :width].contiguous(), 1.0 - t_final_img

    @staticmethod
    def backward(ctx, g_image, g_alpha):
        (mx, my, a, b, cc, op, features, background, order, qpix, gid, gpos, s, rank, nu, perm,
         counts, ratio, clamped, w, t_final, t_final_img, dx, dy) = ctx.saved_tensors
        N, C = features.shape
        height, width, wp = ctx.shape
        Pq = t_final.shape[0]
        dt, dev = features.dtype, features.device
        n_pairs = w.shape[0]
        # Cotangents in q order (zero on the padding columns).
        G = features.new_zeros(height, wp, C)
        if g_image is not None:
            G[:, :width] = g_image
        G = G.view(Pq, C).index_select(0, qpix)
        gA = features.new_zeros(height, wp)
        if g_alpha is not None:
            gA[:, :width] = g_alpha
        gA = gA.view(Pq).index_select(0, qpix)
        q = _repeat(torch.arange(Pq, device=dev), counts, n_pairs)

        # c_k = dL/dw_k = <G[q_k], F[gid_k]>, a sampled dense-dense product.
        if ctx.scatter:
            Gt, Ft = G.t().contiguous(), features.t().contiguous()
            c = Gt[0].index_select(0, q).mul_(Ft[0].index_select(0, gid))
            for k in range(1, C):
                c.addcmul_(Gt[k].index_select(0, q), Ft[k].index_select(0, gid))
        else:
            c = torch.sparse.sampled_addmm(ctx.W, G, features.t(), beta=0.0).values()

        # dL/dalpha_k = T_k c_k - rest_k / (1 - alpha_k) with rest_k = sum_{j>k} w_j c_j
        # + T_final (G.bg - gA) over the pixel's pairs: suffix sums in exact fixed
        # point (see _fixed_point_bits).
        v = w * c
        tail = t_final * (G @ background - gA)  # per pixel
        vmax = max(-float(v.min()), float(v.max())) if n_pairs else 0.0
        vb = _fixed_point_bits(n_pairs + 1, max(vmax, float(tail.abs().max())))
        vsum = torch.cumsum(_to_long(v * 2.0 ** vb), 0)
        total = _at_segment_ends(vsum, torch.cumsum(counts, 0)).add_(_to_long(tail * 2.0 ** vb))
        rest = total.index_select(0, q).sub_(vsum).to(dt)
        # -dL/dsigma = alpha dL/dalpha = v - rest * alpha / (1 - alpha); 0 where clamped.
        g_sig = v.addcmul_(rest, ratio, value=-(2.0 ** -vb)).index_fill_(0, clamped, 0.0)

        g_background = (t_final_img.view(-1) @ g_image.reshape(-1, C) if g_image is not None
                        else torch.zeros_like(background))
        want_f = ctx.needs_input_grad[3]
        if ctx.scatter:
            g_features, g_rows = _gaussian_sums_scatter(g_sig, w, dx, dy, gid, q, Gt, N,
                                                        (a, b, cc, op), order, want_f)
        else:
            g_features, g_rows = _gaussian_sums_sparse(
                g_sig, w, gpos, s, rank, nu, perm, q, G, qpix, (mx, my, a, b, cc, op), order,
                N, width, height, wp, want_f)
        # [N, k] gradients as views of [k, N] rows, matching the projection's layout.
        return (g_rows[:2].t(), g_rows[2:5].t(), g_rows[5], g_features, g_background, None,
                None, None, None)


def _grad_rows(s_1, s_x, s_y, s_xx, s_xy, s_yy, a, b, c, op) -> list[Tensor]:
    """Gradients (means2d x, y; conic a, b, c; opacity) of visible Gaussians from
    the sums of g = -dL/dsigma times 1, dx, dy, dx^2, dx dy, dy^2 over their
    pairs: sigma = 0.5 (a dx^2 + c dy^2) + b dx dy, dx = pixel centre - mean."""
    return [a * s_x + b * s_y, b * s_x + c * s_y, -0.5 * s_xx, -s_xy, -0.5 * s_yy,
            s_1 / op.clamp_min(1e-30)]


def _gaussian_sums_scatter(g_sig, w, dx, dy, gid, q, Gt, N, abco, order, want_f):
    """Per-Gaussian sums by scatter-adds in pair order (few channels)."""
    dt, dev = g_sig.dtype, g_sig.device
    C = Gt.shape[0]

    def acc(vals: Tensor) -> Tensor:
        return torch.zeros(N, dtype=dt, device=dev).index_add_(0, gid, vals)

    g_features = None
    if want_f:  # dL/dF = W^T G, one channel at a time
        g_features = torch.stack([acc(Gt[k].index_select(0, q).mul_(w)) for k in range(C)], 1)
    gdx, gdy = g_sig * dx, g_sig * dy
    sums = [acc(g_sig), acc(gdx), acc(gdy), acc(gdx.mul_(dx)), acc(gdy * dx),
            acc(gdy.mul_(dy))]
    # Per-Gaussian operands, full size (culled ones have zero sums).
    full = [torch.zeros(N, dtype=dt, device=dev).index_copy_(0, order, t) for t in abco]
    return g_features, torch.stack(_grad_rows(*sums, *full))


def _gaussian_sums_sparse(g_sig, w, gpos, s, rank, nu, perm, q, G, qpix, cols, order, N,
                          width, height, wp, want_f):
    """Per-Gaussian sums as sparse products with a Gaussian-major CSR (many channels).

    The pairs' generation order (Gaussian, row, cell) is Gaussian-major: a pair's
    place in it is the number of pairs of earlier unsorted segments plus its rank
    in its own.  Rows are then put in Gaussian-id order (culled ones empty), so
    the products come out full-size.
    """
    dt, dev = g_sig.dtype, g_sig.device
    n, Pq, S = order.shape[0], G.shape[0], nu.shape[0]
    # Pairs before each segment in generation order.  Only segments with pairs
    # count, which keeps the random accesses through perm to those.
    nz = _where_above(nu, 0)
    nu_nz = nu.index_select(0, nz).long()
    gen = perm.index_select(0, nz)
    run = torch.cumsum(torch.zeros(S, dtype=torch.long, device=dev).index_copy_(0, gen, nu_nz), 0)
    seg_start = torch.empty(S, dtype=torch.long, device=dev)
    seg_start.index_copy_(0, nz, run.index_select(0, gen).sub_(nu_nz))
    # Depth-major place, then shifted per Gaussian to Gaussian-id-major.
    cnt = torch.bincount(gpos, minlength=n)
    cnt_id = torch.zeros(N, dtype=torch.long, device=dev).index_copy_(0, order, cnt)
    crow = torch.zeros(N + 1, dtype=torch.long, device=dev)
    torch.cumsum(cnt_id, 0, out=crow[1:])
    shift = crow.index_select(0, order).sub_(torch.cumsum(cnt, 0).sub_(cnt))
    gm = seg_start.index_select(0, s).add_(rank).add_(shift.index_select(0, gpos))
    it = _I32 if max(q.shape[0], Pq) < 1 << 31 else torch.long
    crow, col = crow.to(it), torch.empty(q.shape, dtype=it, device=dev).index_copy_(0, gm, q.to(it))

    def gaussian_sums(vals: Tensor, dense: Tensor) -> Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            mat = torch.sparse_csr_tensor(crow, col, torch.empty_like(vals).index_copy_(
                0, gm, vals), size=(N, Pq), check_invariants=False)
        return mat @ dense

    g_features = gaussian_sums(w, G) if want_f else None
    # The moments of g_sig times dx, dy come from raw moments of the pixel
    # coordinates (float64: they are combined with the means below, relative to
    # the image centre to limit cancellation).
    x0, y0 = 0.5 * width, 0.5 * height
    pix = qpix.double()
    py = torch.div(pix, wp, rounding_mode="floor")
    px = pix - py * wp + (0.5 - x0)
    py += 0.5 - y0
    X = torch.stack([torch.ones_like(px), px, py, px * px, px * py, py * py], 1)
    u, sx, sy, sxx, sxy, syy = gaussian_sums(g_sig.double(), X).unbind(1)
    # Per-Gaussian operands, full size (culled ones have zero sums).
    mx, my = (torch.full((N,), -ref, dtype=torch.float64, device=dev).index_add_(
        0, order, t.double()) for t, ref in zip(cols[:2], (x0, y0)))
    s_x, s_y = sx - mx * u, sy - my * u  # central moments from raw ones
    mom = torch.stack([u, s_x, s_y, sxx - mx * (sx + s_x), sxy - mx * sy - my * s_x,
                       syy - my * (sy + s_y)]).to(dt)
    a, b, c, op = (torch.zeros(N, dtype=dt, device=dev).index_copy_(0, order, t)
                   for t in cols[2:])
    return g_features, torch.stack(_grad_rows(*mom, a, b, c, op))


def composite_cpu(means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor,
                  background: Tensor, order: Tensor, width: int, height: int,
                  band_budget: int = 1 << 20) -> tuple[Tensor, Tensor]:
    """Image [H,W,C] and alpha [H,W]; ``order`` = visible ids, front to back.

    ``band_budget`` caps the candidate pairs held in memory at once (the image
    is processed in bands of rows when a render would exceed it).
    """
    return _Composite.apply(means2d, conics, opacities, features, background, order,
                            width, height, int(band_budget))
