"""Differentiable CPU rasterizer: a compiled (numba) splatting compositor.

Why this shape: the former pure-PyTorch design spent its time building and
reading large per-pair tensors, not on arithmetic.  Compiled loops touch
each (pixel, Gaussian) pair once per pass and keep no per-pair tensors but
one small record:

* *Forward* (:func:`_forward`).  Visible Gaussians are splatted one by one,
  front to back, onto per-pixel state (transmittance T in float64, channel
  sums), so every pixel sees its Gaussians in depth order as in 3DGS/gsplat.
  A Gaussian covers, per image row, the span of pixels where its alpha can
  reach 1/255 (a quadratic, widened by a rounding margin: a superset).  The
  alpha test evaluates the same operations in the same order and dtype as
  the reference (:func:`sigma_of`), so both agree on which pairs pass it.
  Every composited pair is recorded (pixel, alpha before the clamp),
  Gaussian by Gaussian.
* *Backward* (:func:`_backward`).  The records are replayed in reverse:
  Gaussians back to front, so every pixel walks its pairs back to front from
  its final T, undoing one factor (1 - alpha) per pair and carrying the sum
  of the later pairs' contributions (3DGS' backward).  A Gaussian's
  gradients are complete once its own pairs are done, so they are summed in
  registers and written once.

Gaussian-major order keeps the per-Gaussian data (features, gradients)
streaming in depth order; only the per-pixel state (an image's worth) is
accessed at random.  Everything runs on one thread in a fixed order, so
results are bit-repeatable run to run and independent of the thread count;
the only reassociated sum is the backward's per-pair dot product over
channels, whose order is fixed by the compiled code (so it is repeatable on
a machine, but may differ between CPU types, as BLAS results do).  Kernels are
compiled once per machine and dtype (``cache=True``, a few seconds) and
loaded from numba's cache afterwards; tensors on another device are copied
to the CPU and back.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit
from torch import Tensor

from .project import ALPHA_THRESHOLD, MAX_ALPHA, TRANSMITTANCE_THRESHOLD

_MARGIN = 1e-3  # relative/absolute slack on spans: they must be supersets
_CAP_SCALE = 1.0  # records allocated, relative to the forward's estimate of the pairs
# The former vectorised compositor switched its backward strategy at this many channels;
# the compiled one has a single path.  Kept because tests/test_render.py patches it.
_FEW_CHANNELS = 4


def sigma_of(a: Tensor, dx: Tensor, cdy2: Tensor, bdy: Tensor) -> Tensor:
    """Gaussian exponent 0.5 (a dx^2 + c dy^2) + b dx dy, as the reference evaluates it.

    ``cdy2 = c*dy*dy`` and ``bdy = b*dy``.  The compiled compositor evaluates
    the same operations in the same order and dtype, so both round
    identically and the discrete ``alpha >= 1/255`` decisions agree.
    """
    return 0.5 * (a * dx * dx + cdy2) + bdy * dx


# error_model="numpy": no zero-division checks in the loops.  No array is passed to an
# inlined helper or reassigned inside a loop: numba then emits atomic reference-count
# updates per iteration, which cost more than the arithmetic.
_KW = dict(cache=True, nogil=True, error_model="numpy")


@njit(inline="always", **_KW)
def _row_range(myk, ak, bk, ck, opk, height, log_thr, margin):
    """Rows [y0, y1] where a Gaussian's alpha can reach the threshold, and the
    coefficients (q1, q2f, b/a) of its per-row spans (:func:`_span`).

    alpha >= thr <=> a dx^2 + 2 b dx dy + c dy^2 <= lim2 = 2 ln(op/thr), so
    |dy| <= sqrt(lim2 a / det).  Float64, widened by ``margin``; y1 < y0 when
    no row is reached.
    """
    lim2 = max(2.0 * (math.log(max(opk, 1e-30)) - log_thr), 0.0)
    det = max(ak * ck - bk * bk, 1e-30)
    ey = math.sqrt(lim2 * ak / det) * (1.0 + margin) + margin
    y0 = max(np.ceil(myk - ey - 0.5), 0.0)
    y1 = min(np.floor(myk + ey - 0.5), height - 1.0)
    if not (y0 <= y1 and ak > 0.0):  # also for NaN
        return 0, -1, 0.0, 0.0, 0.0
    return int(y0), int(y1), lim2 / ak, det / (ak * ak), bk / ak


@njit(inline="always", **_KW)
def _span(mxk, myk, y, q1, q2f, boa, width, margin):
    """Columns [x0, x1) of row y where the alpha can reach the threshold:
    dx in -(b/a) dy +- sqrt(lim2/a - (det/a^2) dy^2), widened by ``margin``."""
    dy = (y + 0.5) - myk
    q2 = q2f * dy * dy
    half = math.sqrt(max((q1 - q2) + margin * (q1 + q2), 0.0)) + margin
    centre = mxk - 0.5 - boa * dy
    x0 = max(np.ceil(centre - half), 0.0)
    x1 = min(np.floor(centre + half), width - 1.0) + 1.0
    if x0 < x1:
        return int(x0), int(x1)
    return 0, 0


@njit(**_KW)
def _forward(mx, my, a, b, c, op, order, F, bg, pxs, pys, cst, t_min, log_thr, margin,
             cap_scale, image, t_final):
    """Front-to-back compositing into ``image`` [H,W,C] and ``t_final`` [H,W] (float64).

    Gaussian k (depth order) has id ``order[k]``; ``cst`` = (0.5, alpha
    threshold, max alpha) in the inputs' dtype, so the alpha test rounds as
    the reference's.  Returns the number of records (-1 if ``cap_scale``
    times the estimate was too small: call again with a larger one), the
    records (Gaussian k's are ``rec[off[k]:off[k+1]]``: pixel y << 16 | x, and
    the alpha before the clamp) and the features in depth order.
    """
    height, width, C = image.shape
    n = mx.shape[0]
    half, thr, amax = cst[0], cst[1], cst[2]
    # Rows and span coefficients per Gaussian, and an estimate of the pairs (the
    # clipped ellipse areas plus a pixel per row) to size the records.
    y0s = np.empty(n, np.int64)
    y1s = np.empty(n, np.int64)
    coef = np.empty((n, 3))
    est = 1024.0
    for k in range(n):
        y0, y1, q1, q2f, boa = _row_range(float(my[k]), float(a[k]), float(b[k]),
                                          float(c[k]), float(op[k]), height, log_thr, margin)
        y0s[k], y1s[k] = y0, y1
        coef[k, 0], coef[k, 1], coef[k, 2] = q1, q2f, boa
        if y0 <= y1:
            rows = y1 - y0 + 1.0
            area = math.pi * q1 / math.sqrt(max(q2f, 1e-300))
            est += min(1.1 * area + 2.0 * rows, rows * width)
    cap = int(cap_scale * est)
    Fk = np.empty((n, C), F.dtype)
    for k in range(n):
        g = order[k]
        for ch in range(C):
            Fk[k, ch] = F[g, ch]
    rec = np.empty(cap, np.int32)
    ra = np.empty(cap, cst.dtype)
    off = np.zeros(n + 1, np.int64)
    T = t_final
    T[:] = 1.0
    acc = np.zeros((height, width, C))
    done = np.zeros((height, width), np.bool_)
    f = np.empty(C)
    m = 0
    for k in range(n):
        off[k] = m
        if y1s[k] < y0s[k]:
            continue
        mxk, myk, ak, bk, ck, opk = mx[k], my[k], a[k], b[k], c[k], op[k]
        q1, q2f, boa = coef[k, 0], coef[k, 1], coef[k, 2]
        for ch in range(C):
            f[ch] = Fk[k, ch]
        for y in range(y0s[k], y1s[k] + 1):
            x0, x1 = _span(float(mxk), float(myk), y, q1, q2f, boa, width, margin)
            if m + (x1 - x0) > cap:
                return -1, off, rec, ra, Fk
            dy = pys[y] - myk
            cdy2 = ck * dy * dy
            bdy = bk * dy
            for x in range(x0, x1):
                if done[y, x]:
                    continue
                dx = pxs[x] - mxk
                sigma = half * (ak * dx * dx + cdy2) + bdy * dx  # as sigma_of
                raw = opk * np.exp(-sigma)
                alpha = min(raw, amax)
                if alpha < thr:
                    continue
                Tx = T[y, x]
                t_next = Tx * (1.0 - float(alpha))
                if t_next <= t_min:
                    done[y, x] = True  # this pair and all later ones are excluded
                    continue
                w = float(alpha) * Tx
                for ch in range(C):
                    acc[y, x, ch] += w * f[ch]
                T[y, x] = t_next
                rec[m] = (y << 16) | x
                ra[m] = raw
                m += 1
    off[n] = m
    for y in range(height):
        for x in range(width):
            for ch in range(C):
                image[y, x, ch] = acc[y, x, ch] + T[y, x] * bg[ch]
    return m, off, rec, ra, Fk


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def _dot(u, i, v):
    """<u[i], v>, vectorised (reassociated in an order fixed by the compiled code)."""
    s = 0.0
    for ch in range(v.shape[0]):
        s += u[i, ch] * v[ch]
    return s


@njit(**_KW)
def _backward(mx, my, a, b, c, op, order, Fk, bg, pxs, pys, cst, t_final, off, rec, ra,
              G, gA, g_means2d, g_conics, g_op, g_features, g_bg):
    """Gradients of :func:`_forward`, given cotangents ``G`` [H,W,C] and ``gA`` [H,W].

    Back to front, per pixel: T before a pair = T after / (1 - alpha);
    dL/dalpha = T c - rest / (1 - alpha) with c = <G, f> and rest the
    contributions of the later pairs plus T_final (<G, bg> - gA).  Written
    into the given full-size outputs (id order; culled Gaussians keep zeros).
    """
    height, width, C = G.shape
    n = mx.shape[0]
    amax = cst[2]
    P = height * width
    Gd = np.empty((P, C))  # cotangents in float64
    T = np.empty(P)
    rest = np.empty(P)
    bgd = np.empty(C)
    gb = np.zeros(C)
    for ch in range(C):
        bgd[ch] = bg[ch]
    for y in range(height):
        for x in range(width):
            p = y * width + x
            tf = t_final[y, x]
            for ch in range(C):
                Gd[p, ch] = G[y, x, ch]
                gb[ch] += tf * Gd[p, ch]
            T[p] = tf
            rest[p] = tf * (_dot(Gd, p, bgd) - float(gA[y, x]))
    f = np.empty(C)
    lg = np.empty(C)
    for k in range(n - 1, -1, -1):
        if off[k + 1] == off[k]:
            continue
        mxk, myk = mx[k], my[k]
        for ch in range(C):
            f[ch] = Fk[k, ch]
            lg[ch] = 0.0
        m0 = m1 = m2 = m3 = m4 = m5 = 0.0  # sums of s, s dx, s dy, s dx^2, s dx dy, s dy^2
        for i in range(off[k + 1] - 1, off[k] - 1, -1):
            y = rec[i] >> 16
            x = rec[i] & 0xFFFF
            p = y * width + x
            raw = ra[i]
            alpha = float(min(raw, amax))
            one_minus = 1.0 - alpha
            Tb = T[p] / one_minus
            T[p] = Tb
            w = alpha * Tb
            cdot = _dot(Gd, p, f)
            for ch in range(C):
                lg[ch] += w * Gd[p, ch]
            d_alpha = Tb * cdot - rest[p] / one_minus
            rest[p] += w * cdot
            if raw <= amax:  # a clamped alpha no longer depends on sigma or opacity
                s = -float(raw) * d_alpha  # dL/dsigma
                dx = float(pxs[x] - mxk)  # rounded as in the forward
                dy = float(pys[y] - myk)
                sdx, sdy = s * dx, s * dy
                m0 += s
                m1 += sdx
                m2 += sdy
                m3 += sdx * dx
                m4 += sdx * dy
                m5 += sdy * dy
        # sigma = 0.5 (a dx^2 + c dy^2) + b dx dy, dx = pixel - mean; alpha = op exp(-sigma).
        g = order[k]
        ak, bk, ck = float(a[k]), float(b[k]), float(c[k])
        g_means2d[g, 0] = -(ak * m1 + bk * m2)
        g_means2d[g, 1] = -(bk * m1 + ck * m2)
        g_conics[g, 0] = 0.5 * m3
        g_conics[g, 1] = m4
        g_conics[g, 2] = 0.5 * m5
        g_op[g] = -m0 / max(float(op[k]), 1e-30)
        for ch in range(C):
            g_features[g, ch] = lg[ch]
    for ch in range(C):
        g_bg[ch] = gb[ch]


def _np(t: Tensor, dtype: torch.dtype) -> np.ndarray:
    """Contiguous CPU numpy array in ``dtype`` (a copy only where needed)."""
    return t.detach().to(device="cpu", dtype=dtype).contiguous().numpy()


class _Composite(torch.autograd.Function):
    """Front-to-back alpha compositing with a hand-written backward.

    Inputs are full-size (all N Gaussians); ``order`` lists the visible ones
    front to back.  Gradients come back full-size (zero for culled ones).
    """

    @staticmethod
    def forward(ctx, means2d, conics, opacities, features, background, order, width, height):
        dt, dev = features.dtype, features.device
        N, C = features.shape
        o = order.detach().to("cpu", torch.int64).contiguous()
        # Columns of the visible Gaussians, front to back ([N, k] inputs are read by
        # column: the projection returns them column-major).
        cols = [_np(t.detach().to("cpu", dt).index_select(0, o), dt)
                for t in (*means2d.unbind(1), *conics.unbind(1), opacities)]
        F = _np(features, dt)
        ndt = F.dtype
        pxs = (np.arange(width) + 0.5).astype(ndt)  # pixel centres as the reference rounds them
        pys = (np.arange(height) + 0.5).astype(ndt)
        cst = np.array([0.5, ALPHA_THRESHOLD, MAX_ALPHA], dtype=ndt)
        image = np.empty((height, width, C), ndt)
        t_final = np.empty((height, width))
        scale = _CAP_SCALE
        while True:
            m, off, rec, ra, Fk = _forward(*cols, o.numpy(), F, _np(background, dt), pxs, pys,
                                           cst, TRANSMITTANCE_THRESHOLD,
                                           math.log(float(cst[1])), _MARGIN, scale, image,
                                           t_final)
            if m >= 0:
                break
            scale *= 2.0  # more pairs than estimated (never seen on real scenes)
        ctx.np = (cols, o.numpy(), Fk, _np(background, dt), pxs, pys, cst, t_final, off,
                  rec[:m], ra[:m])
        ctx.meta = (N, C, dev, dt)
        alpha = torch.from_numpy(1.0 - t_final).to(device=dev, dtype=dt)
        return torch.from_numpy(image).to(dev), alpha

    @staticmethod
    def backward(ctx, g_image, g_alpha):
        cols, order, Fk, bg, pxs, pys, cst, t_final, off, rec, ra = ctx.np
        N, C, dev, dt = ctx.meta
        height, width = t_final.shape
        ndt = Fk.dtype
        G = _np(g_image, dt) if g_image is not None else np.zeros((height, width, C), ndt)
        gA = _np(g_alpha, dt) if g_alpha is not None else np.zeros((height, width), ndt)
        outs = (np.zeros((N, 2), ndt), np.zeros((N, 3), ndt), np.zeros(N, ndt),
                np.zeros((N, C), ndt), np.zeros(C, ndt))
        _backward(*cols, order, Fk, bg, pxs, pys, cst, t_final, off, rec, ra, G, gA, *outs)
        return (*(torch.from_numpy(v).to(dev) for v in outs), None, None, None)


def composite_cpu(means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor,
                  background: Tensor, order: Tensor, width: int, height: int,
                  band_budget: int | None = None) -> tuple[Tensor, Tensor]:
    """Image [H,W,C] and alpha [H,W]; ``order`` = visible ids, front to back.

    ``band_budget`` is accepted for callers of the former vectorised
    compositor, which rendered in bands of rows to bound its memory, and is
    ignored: the compiled one holds an image's worth of state and a record
    of 8-12 bytes per composited pair.
    """
    width, height = int(width), int(height)
    if width >= 1 << 16 or height >= 1 << 15:
        raise ValueError(f"composite_cpu: {width}x{height} exceeds 65535x32767 pixels")
    return _Composite.apply(means2d, conics, opacities, features, background, order,
                            width, height)
