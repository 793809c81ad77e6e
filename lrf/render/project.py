"""EWA projection of 3D Gaussians to screen space, shared by the CPU backends, and
:class:`RenderOutput`, what every backend returns (gsplat's adapter included).

Both the brute-force reference and the fast rasterizer call
:func:`project_gaussians`, so they can only differ in how they composite.
The projection is differentiable PyTorch on [N] columns: it is O(N) and cheap
next to rasterization, so autograd through it is fine.

Conventions (same as gsplat / COLMAP / OpenCV):

* ``viewmat`` is world-to-camera, camera axes x right, y down, z forward.
* pixel (row i, col j) has its centre at continuous (j + 0.5, i + 0.5);
  the projected mean is (fx x/z + cx, fy y/z + cy).
* 2D covariance J Rv R S S^T R^T Rv^T J^T + 0.3 I (x/z, y/z clamped to 1.3x
  the field of view inside J), conic = its inverse.

Compositing (both CPU backends, as gsplat "classic"): alpha =
min(0.99, opacity exp(-0.5 d^T conic d)); pairs with alpha < 1/255 are
skipped; Gaussians are blended front to back by camera depth and a pixel
stops at the first pair that would bring its transmittance to <= 1e-4 (that
pair is excluded).  A Gaussian therefore touches exactly the pixels where its
alpha reaches 1/255, with no dependence on tile size (as gsplat >= 1.5, whose
tiles are chosen by that same opacity-aware extent).

Visibility also follows gsplat >= 1.5: a Gaussian is culled when its depth
is outside (near, far) (depth <= near is culled), its 2D covariance is
degenerate, its opacity is below 1/255, or the rectangle holding every pixel
where its alpha can reach 1/255 misses the image.  Such a Gaussian can never
touch a pixel, so culling never changes the image; it only decides
``radii == 0``.  The reported ``radii`` are the conventional
``ceil(3 sqrt(lambda_max))`` of the blurred 2D covariance (the number
densification/pruning heuristics expect).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numba import njit
from torch import Tensor

from lrf.settings import EPS2D  # the screen-space blur added to the 2D covariance (non-antialiased)

# Constants shared by every backend (values of gsplat / 3DGS).
ALPHA_THRESHOLD = 1.0 / 255.0  # pairs with alpha below this are skipped
MAX_ALPHA = 0.99  # alpha clamp
TRANSMITTANCE_THRESHOLD = 1e-4  # stop once T would drop to or below this
EXTEND_CAP = 3.33  # gsplat's cap on the opacity-aware extent, in sigmas


@dataclass
class RenderOutput:
    """One rendered view, with the same fields whatever the backend (training code is backend-agnostic)."""

    image: Tensor  # [H, W, C]
    alpha: Tensor  # [H, W] accumulated opacity
    means2d: Tensor  # [N, 2] projected centres (pixels); .grad feeds densification
    radii: Tensor  # [N] int pixel radius, 0 where culled
    depths: Tensor  # [N] camera-space z


@dataclass
class Projected:
    """Per-Gaussian screen-space quantities (all of length N).

    ``means2d``, ``conics`` and ``depths`` carry autograd history back to
    means/quats/scales.  Entries of culled Gaussians are finite (zeros for
    means2d/conics) so that zero gradients stay zero instead of NaN.
    """

    means2d: Tensor  # [N, 2] pixels
    conics: Tensor  # [N, 3] (a, b, c) of the inverse blurred 2D covariance
    depths: Tensor  # [N] camera-space z
    radii: Tensor  # [N] int32, 0 where culled
    visible: Tensor  # [N] bool


def _rotmat_columns(quats: Tensor) -> list[list[Tensor]]:
    """R(q) of (w,x,y,z) quaternions of any norm, as a 3x3 nest of [N] tensors.

    Elementwise ops on [N] columns only: on CPU, batched 3x3 products, GEMMs
    with an inner size of 3 and broadcasts over [N,3,3] are all far slower.
    """
    return _rotmat(*quats.unbind(-1))


def _rotmat(w: Tensor, x: Tensor, y: Tensor, z: Tensor) -> list[list[Tensor]]:
    ww, xx, yy, zz = w * w, x * x, y * y, z * z
    inv = 1.0 / (ww + xx + yy + zz).clamp_min(1e-24)
    inv2 = 2.0 * inv
    xy, wz, xz, wy, yz, wx = x * y, w * z, x * z, w * y, y * z, w * x
    return [
        [(ww + xx - yy - zz) * inv, (xy - wz) * inv2, (xz + wy) * inv2],
        [(xy + wz) * inv2, (ww - xx + yy - zz) * inv, (yz - wx) * inv2],
        [(xz - wy) * inv2, (yz + wx) * inv2, (ww - xx - yy + zz) * inv],
    ]


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices [N,3,3] from (w,x,y,z) quaternions of any norm."""
    r = _rotmat_columns(quats)
    return torch.stack([torch.stack(row, -1) for row in r], -2)


def covariance_3d(quats: Tensor, scales: Tensor) -> Tensor:
    """World covariance R S S^T R^T, [N,3,3] (for tests and callers)."""
    M = quat_to_rotmat(quats) * scales[..., None, :]
    return M @ M.transpose(-1, -2)


def project_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    near: float = 0.01,
    far: float = 1e10,
    eps2d: float = EPS2D,
) -> Projected:
    """Project Gaussians with the EWA (local affine) approximation.

    The camera is a constant (no gradient to viewmat or K).  Gradients go
    through autograd (the reference's path); :func:`project_gaussians_fused`
    computes the very same values in compiled loops with a hand-written backward.
    """
    V = viewmat.detach().double().cpu().tolist()  # constants: no grad to the camera
    fx, fy, cx, cy = (float(v) for v in (K[0, 0], K[1, 1], K[0, 2], K[1, 2]))
    m0, m1, m2 = means.unbind(-1)
    x, y, z = (m0 * V[i][0] + m1 * V[i][1] + m2 * V[i][2] + V[i][3] for i in range(3))

    in_depth = (z > near) & (z < far)
    # Clamp the depth of culled Gaussians (same values otherwise) so nothing is inf/NaN.
    rz = z.clamp(near, far).reciprocal()

    # Clamp x/z, y/z to 1.3x the field of view for the Jacobian only (as gsplat).
    lim_x, lim_y = _fov_limits(width, height, fx, fy, cx, cy)
    txz = (x * rz).clamp(*lim_x)  # = tx / z
    tyz = (y * rz).clamp(*lim_y)

    # Sigma_2d = T T^T with T = J Rv R(q) diag(s) (2x3), J = [[fx/z, 0, -fx tx/z^2],
    # [0, fy/z, -fy ty/z^2]], all as elementwise ops on [N] columns.
    j00, j02 = fx * rz, -fx * txz * rz
    j11, j12 = fy * rz, -fy * tyz * rz
    A0 = [j00 * V[0][k] + j02 * V[2][k] for k in range(3)]  # row 0 of J Rv
    A1 = [j11 * V[1][k] + j12 * V[2][k] for k in range(3)]  # row 1 of J Rv
    r = _rotmat_columns(quats)
    sc = scales.unbind(-1)
    M0 = [A0[0] * r[0][j] + A0[1] * r[1][j] + A0[2] * r[2][j] for j in range(3)]  # J Rv R
    M1 = [A1[0] * r[0][j] + A1[1] * r[1][j] + A1[2] * r[2][j] for j in range(3)]
    T0 = [M0[j] * sc[j] for j in range(3)]
    T1 = [M1[j] * sc[j] for j in range(3)]
    s_xx = T0[0] * T0[0] + T0[1] * T0[1] + T0[2] * T0[2] + eps2d
    s_xy = T0[0] * T1[0] + T0[1] * T1[1] + T0[2] * T1[2]
    s_yy = T1[0] * T1[0] + T1[1] * T1[1] + T1[2] * T1[2] + eps2d
    det = s_xx * s_yy - s_xy * s_xy

    mx = fx * x * rz + cx
    my = fy * y * rz + cy

    with torch.no_grad():
        ok = in_depth & (det > 0) & (opacities >= ALPHA_THRESHOLD)
        finite = torch.isfinite(mx) & torch.isfinite(my) & torch.isfinite(det)
        ok &= finite
        extend = _extent(opacities)
        rx = torch.ceil(extend * s_xx.clamp_min(0).sqrt())
        ry = torch.ceil(extend * s_yy.clamp_min(0).sqrt())
        ok &= ~((mx + rx <= 0) | (mx - rx >= width) | (my + ry <= 0) | (my - ry >= height))
        half_tr = 0.5 * (s_xx + s_yy)
        lam_max = half_tr + (half_tr * half_tr - det).clamp_min(0).sqrt()
        radii = torch.ceil(3.0 * lam_max.clamp_min(0).sqrt())
        radii = torch.where(ok, radii, torch.zeros_like(radii)).to(torch.int32)

    # Culled entries are zeroed by a product with the 0/1 mask; only non-finite
    # values need the where().
    inv_det = torch.where(ok, det, torch.ones_like(det)).reciprocal()
    okf = ok.to(det.dtype)
    conics = torch.stack([s_yy, -s_xy, s_xx], -1) * (inv_det * okf)[:, None]
    means2d = torch.stack([mx, my], -1) * okf[:, None]
    if not bool(finite.all()):
        conics = torch.where(ok[:, None], conics, 0.0)
        means2d = torch.where(ok[:, None], means2d, 0.0)
    return Projected(means2d=means2d, conics=conics, depths=z, radii=radii, visible=ok)


def _fov_limits(width, height, fx, fy, cx, cy):
    """Bounds of x/z and y/z in the Jacobian: 1.3x the field of view (as gsplat)."""
    tan_fovx = 0.5 * width / fx
    tan_fovy = 0.5 * height / fy
    return ((-(cx / fx + 0.3 * tan_fovx), (width - cx) / fx + 0.3 * tan_fovx),
            (-(cy / fy + 0.3 * tan_fovy), (height - cy) / fy + 0.3 * tan_fovy))


def _extent(opacities: Tensor) -> Tensor:
    """Opacity-aware extent (in sigmas) at which alpha falls to 1/255, capped."""
    q = 2.0 * torch.log(opacities.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD)
    return q.sqrt().clamp_max(EXTEND_CAP)


# --- the compiled projection (the cpu backend's) ----------------------------------------
#
# Per Gaussian, the same operations in the same order and dtype as project_gaussians
# (Python scalars rounded to the dtype first, as torch does; no fused multiply-adds), so
# means2d, conics, depths and radii are bit-identical to it; only the log of the extent is
# left to torch (libm and torch may differ in its last bit).  The backward is the chain rule
# in float64.

_NKW = dict(cache=True, nogil=True, error_model="numpy")


def _constants(viewmat, K, width, height, near, far, eps2d, dtype) -> tuple:
    """The projection's scalars in ``dtype`` (a tuple: no array reaches the per-Gaussian
    helper, whose array arguments would cost reference counting per call)."""
    V = viewmat.detach().double().cpu().tolist()
    fx, fy, cx, cy = (float(v) for v in (K[0, 0], K[1, 1], K[0, 2], K[1, 2]))
    (lx0, lx1), (ly0, ly1) = _fov_limits(width, height, fx, fy, cx, cy)
    vals = ([V[i][j] for i in range(3) for j in range(4)]
            + [fx, fy, cx, cy, -fx, -fy, near, far, lx0, lx1, ly0, ly1, eps2d,
               ALPHA_THRESHOLD, width, height, 1e-24, 1.0, 2.0, 0.5, 3.0, 0.0])
    return tuple(np.array(vals, dtype=torch.empty(0, dtype=dtype).numpy().dtype))


@njit(**_NKW)
def _project_one(m0, m1, m2, qw, qx, qy, qz, s0, s1, s2, cs):
    """One Gaussian through project_gaussians' operations (see above); returns
    the intermediates the backward needs, in the inputs' dtype."""
    x = m0 * cs[0] + m1 * cs[1] + m2 * cs[2] + cs[3]
    y = m0 * cs[4] + m1 * cs[5] + m2 * cs[6] + cs[7]
    z = m0 * cs[8] + m1 * cs[9] + m2 * cs[10] + cs[11]
    fx, fy, cx, cy, nfx, nfy = cs[12], cs[13], cs[14], cs[15], cs[16], cs[17]
    one, two = cs[29], cs[30]
    rz = one / min(max(z, cs[18]), cs[19])
    ux = x * rz
    uy = y * rz
    txz = min(max(ux, cs[20]), cs[21])
    tyz = min(max(uy, cs[22]), cs[23])
    j00 = fx * rz
    j02 = nfx * txz * rz
    j11 = fy * rz
    j12 = nfy * tyz * rz
    a00 = j00 * cs[0] + j02 * cs[8]
    a01 = j00 * cs[1] + j02 * cs[9]
    a02 = j00 * cs[2] + j02 * cs[10]
    a10 = j11 * cs[4] + j12 * cs[8]
    a11 = j11 * cs[5] + j12 * cs[9]
    a12 = j11 * cs[6] + j12 * cs[10]
    # R(q) as _rotmat.
    ww, xx, yy, zz = qw * qw, qx * qx, qy * qy, qz * qz
    inv = one / max(ww + xx + yy + zz, cs[28])
    inv2 = two * inv
    xy, wz, xz, wy, yz, wx = qx * qy, qw * qz, qx * qz, qw * qy, qy * qz, qw * qx
    r00 = (ww + xx - yy - zz) * inv
    r01 = (xy - wz) * inv2
    r02 = (xz + wy) * inv2
    r10 = (xy + wz) * inv2
    r11 = (ww - xx + yy - zz) * inv
    r12 = (yz - wx) * inv2
    r20 = (xz - wy) * inv2
    r21 = (yz + wx) * inv2
    r22 = (ww - xx - yy + zz) * inv
    m00 = a00 * r00 + a01 * r10 + a02 * r20
    m01 = a00 * r01 + a01 * r11 + a02 * r21
    m02 = a00 * r02 + a01 * r12 + a02 * r22
    m10 = a10 * r00 + a11 * r10 + a12 * r20
    m11 = a10 * r01 + a11 * r11 + a12 * r21
    m12 = a10 * r02 + a11 * r12 + a12 * r22
    t00, t01, t02 = m00 * s0, m01 * s1, m02 * s2
    t10, t11, t12 = m10 * s0, m11 * s1, m12 * s2
    s_xx = t00 * t00 + t01 * t01 + t02 * t02 + cs[24]
    s_xy = t00 * t10 + t01 * t11 + t02 * t12
    s_yy = t10 * t10 + t11 * t11 + t12 * t12 + cs[24]
    det = s_xx * s_yy - s_xy * s_xy
    mx = fx * x * rz + cx
    my = fy * y * rz + cy
    return ((x, y, z, rz, ux, uy, txz, tyz), (a00, a01, a02, a10, a11, a12),
            (r00, r01, r02, r10, r11, r12, r20, r21, r22),
            (m00, m01, m02, m10, m11, m12), (t00, t01, t02, t10, t11, t12),
            (s_xx, s_xy, s_yy, det, mx, my))


@njit(**_NKW)
def _project_kernel(means, quats, scales, opacities, extend, cs, means2d, conics, radii,
                    visible, depths):
    """Projection of every Gaussian into [2,N] means2d, [3,N] conics, radii, visible, depths."""
    near, far, thr, width, height = cs[18], cs[19], cs[25], cs[26], cs[27]
    half, three, one, zero = cs[31], cs[32], cs[29], cs[33]
    for i in range(means.shape[0]):
        xyz, _, _, _, _, sd = _project_one(
            means[i, 0], means[i, 1], means[i, 2], quats[i, 0], quats[i, 1], quats[i, 2],
            quats[i, 3], scales[i, 0], scales[i, 1], scales[i, 2], cs)
        z = xyz[2]
        s_xx, s_xy, s_yy, det, mx, my = sd
        depths[i] = z
        ok = (z > near and z < far and det > 0 and opacities[i] >= thr
              and np.isfinite(mx) and np.isfinite(my) and np.isfinite(det))
        if ok:
            rx = np.ceil(extend[i] * np.sqrt(max(s_xx, zero)))
            ry = np.ceil(extend[i] * np.sqrt(max(s_yy, zero)))
            ok = not (mx + rx <= 0 or mx - rx >= width or my + ry <= 0 or my - ry >= height)
        visible[i] = ok
        if not ok:
            radii[i] = 0
            means2d[0, i] = means2d[1, i] = 0
            conics[0, i] = conics[1, i] = conics[2, i] = 0
            continue
        half_tr = half * (s_xx + s_yy)
        lam_max = half_tr + np.sqrt(max(half_tr * half_tr - det, zero))
        radii[i] = np.int32(np.ceil(three * np.sqrt(max(lam_max, zero))))
        inv_det = one / det
        means2d[0, i] = mx
        means2d[1, i] = my
        conics[0, i] = s_yy * inv_det
        conics[1, i] = -s_xy * inv_det
        conics[2, i] = s_xx * inv_det


@njit(**_NKW)
def _project_backward_kernel(means, quats, scales, visible, cs, g_means2d, g_conics, g_depths,
                             g_means, g_quats, g_scales):
    """Chain rule of the projection (float64) from cotangents of means2d [N,2], conics
    [N,3] and depths [N]; culled Gaussians only pass the depth cotangent."""
    v = cs
    fx, fy = float(cs[12]), float(cs[13])
    g_m0, g_m1, g_a0, g_a1 = np.empty(3), np.empty(3), np.empty(3), np.empty(3)
    g_r = np.empty((3, 3))
    for i in range(means.shape[0]):
        g_z = float(g_depths[i])
        if not visible[i]:
            for k in range(3):
                g_means[i, k] = g_z * float(v[8 + k])
                g_scales[i, k] = 0
            for k in range(4):
                g_quats[i, k] = 0
            continue
        qw, qx, qy, qz = quats[i, 0], quats[i, 1], quats[i, 2], quats[i, 3]
        sc = (float(scales[i, 0]), float(scales[i, 1]), float(scales[i, 2]))
        xyz, A, R, M, T, sd = _project_one(means[i, 0], means[i, 1], means[i, 2], qw, qx, qy,
                                           qz, scales[i, 0], scales[i, 1], scales[i, 2], cs)
        x, y, rz = float(xyz[0]), float(xyz[1]), float(xyz[3])
        txz, tyz = float(xyz[6]), float(xyz[7])
        pass_x = xyz[6] == xyz[4]  # the clamp of x/z passes its gradient
        pass_y = xyz[7] == xyz[5]
        s_xx, s_xy, s_yy = float(sd[0]), float(sd[1]), float(sd[2])
        idet = 1.0 / float(sd[3])
        g_mx, g_my = float(g_means2d[i, 0]), float(g_means2d[i, 1])
        g_ca, g_cb, g_cc = float(g_conics[i, 0]), float(g_conics[i, 1]), float(g_conics[i, 2])
        # conic = (s_yy, -s_xy, s_xx) / det, det = s_xx s_yy - s_xy^2.
        g_det = -(idet * idet) * (g_ca * s_yy - g_cb * s_xy + g_cc * s_xx)
        g_sxx = g_cc * idet + g_det * s_yy
        g_syy = g_ca * idet + g_det * s_xx
        g_sxy = -(g_cb * idet) - 2.0 * g_det * s_xy
        # s = T T^T + eps2d I, T = M diag(scales), M = A R.
        for j in range(3):
            t0, t1 = float(T[j]), float(T[3 + j])
            g_t0 = 2.0 * g_sxx * t0 + g_sxy * t1
            g_t1 = 2.0 * g_syy * t1 + g_sxy * t0
            g_scales[i, j] = g_t0 * float(M[j]) + g_t1 * float(M[3 + j])
            g_m0[j] = g_t0 * sc[j]
            g_m1[j] = g_t1 * sc[j]
        for k in range(3):
            g_a0[k] = (g_m0[0] * float(R[3 * k]) + g_m0[1] * float(R[3 * k + 1])
                       + g_m0[2] * float(R[3 * k + 2]))
            g_a1[k] = (g_m1[0] * float(R[3 * k]) + g_m1[1] * float(R[3 * k + 1])
                       + g_m1[2] * float(R[3 * k + 2]))
            for j in range(3):
                g_r[k, j] = g_m0[j] * float(A[k]) + g_m1[j] * float(A[3 + k])
        # A0 = j00 Rv0 + j02 Rv2, A1 = j11 Rv1 + j12 Rv2.
        g_j00 = g_j02 = g_j11 = g_j12 = 0.0
        for k in range(3):
            g_j00 += g_a0[k] * float(v[k])
            g_j02 += g_a0[k] * float(v[8 + k])
            g_j11 += g_a1[k] * float(v[4 + k])
            g_j12 += g_a1[k] * float(v[8 + k])
        # j00 = fx rz, j02 = -fx txz rz (same for y); mx = fx x rz + cx (same for y).
        g_rz = (fx * g_j00 - fx * txz * g_j02 + fy * g_j11 - fy * tyz * g_j12
                + fx * x * g_mx + fy * y * g_my)
        g_u = -fx * rz * g_j02 if pass_x else 0.0
        g_v = -fy * rz * g_j12 if pass_y else 0.0
        g_x = (fx * g_mx + g_u) * rz
        g_y = (fy * g_my + g_v) * rz
        g_rz += x * g_u + y * g_v
        g_z += -(rz * rz) * g_rz  # visible: z in (near, far), not clamped
        for k in range(3):
            g_means[i, k] = g_x * float(v[k]) + g_y * float(v[4 + k]) + g_z * float(v[8 + k])
        gq = _rotmat_backward(float(qw), float(qx), float(qy), float(qz), R,
                              (g_r[0, 0], g_r[0, 1], g_r[0, 2], g_r[1, 0], g_r[1, 1], g_r[1, 2],
                               g_r[2, 0], g_r[2, 1], g_r[2, 2]))
        for k in range(4):
            g_quats[i, k] = gq[k]


@njit(**_NKW)
def _rotmat_backward(w, x, y, z, R, g_r):
    """Gradient of _rotmat (R and g_R as row-major 9-tuples), as (dL/dw, dL/dx, dL/dy, dL/dz).

    R = Q / n2 with n2 = |q|^2 (clamped at 1e-24) and, for q = (w, v),
    Q = (w^2 - v.v) I + 2 v v^T + 2 w [v]x.  With G = dL/dQ = g_R / n2:
    dL/dw = 2 w tr G + 2 v.a and dL/dv = 2 (G + G^T) v - 2 tr(G) v + 2 w a,
    a = (G21 - G12, G02 - G20, G10 - G01); plus 2 q dL/dn2, dL/dn2 = -sum(g_R R) / n2.
    """
    n2 = w * w + x * x + y * y + z * z
    inv = 1.0 / max(n2, 1e-24)
    g_n2 = 0.0
    for k in range(9):
        g_n2 -= g_r[k] * float(R[k])
    g_n2 = g_n2 * inv if n2 >= 1e-24 else 0.0
    G00, G01, G02 = g_r[0] * inv, g_r[1] * inv, g_r[2] * inv
    G10, G11, G12 = g_r[3] * inv, g_r[4] * inv, g_r[5] * inv
    G20, G21, G22 = g_r[6] * inv, g_r[7] * inv, g_r[8] * inv
    tr = G00 + G11 + G22
    a0, a1, a2 = G21 - G12, G02 - G20, G10 - G01
    d = g_n2 - tr  # common factor of v: -tr G + dL/dn2
    g_w = 2.0 * (w * (tr + g_n2) + x * a0 + y * a1 + z * a2)
    g_x = 2.0 * (2.0 * G00 * x + (G01 + G10) * y + (G02 + G20) * z + x * d + w * a0)
    g_y = 2.0 * ((G10 + G01) * x + 2.0 * G11 * y + (G12 + G21) * z + y * d + w * a1)
    g_z = 2.0 * ((G20 + G02) * x + (G21 + G12) * y + 2.0 * G22 * z + z * d + w * a2)
    return g_w, g_x, g_y, g_z


def _np(t: Tensor, dtype: torch.dtype) -> np.ndarray:
    """Contiguous CPU numpy array in ``dtype`` (a copy only where needed)."""
    return t.detach().to(device="cpu", dtype=dtype).contiguous().numpy()


class _FusedProjection(torch.autograd.Function):
    """:func:`project_gaussians` in compiled loops, with a hand-written backward.

    Autograd through the ~100 elementwise [N] ops of the projection records a
    node per op; on a CPU that bookkeeping costs more than the arithmetic.
    The forward computes bit-identical values (see above), the backward
    recomputes the per-Gaussian intermediates and applies the chain rule.
    """

    @staticmethod
    def forward(ctx, means, quats, scales, opacities, viewmat, K, width, height, near, far,
                eps2d):
        dt, dev = means.dtype, means.device
        N = means.shape[0]
        cs = _constants(viewmat, K, width, height, near, far, eps2d, dt)
        arrays = [_np(t, dt) for t in (means, quats, scales)]
        ndt = arrays[0].dtype
        means2d, conics = np.empty((2, N), ndt), np.empty((3, N), ndt)
        radii, visible, depths = np.empty(N, np.int32), np.empty(N, np.bool_), np.empty(N, ndt)
        _project_kernel(*arrays, _np(opacities, dt), _np(_extent(opacities.detach()), dt), cs,
                        means2d, conics, radii, visible, depths)
        ctx.np = (arrays, visible, cs)
        ctx.meta = (dev, dt)
        out = [torch.from_numpy(v).to(dev) for v in (means2d, conics, depths, radii, visible)]
        ctx.mark_non_differentiable(out[3], out[4])
        # [N, k] views of [k, N] rows: the compositor reads them by column.
        return out[0].t(), out[1].t(), out[2], out[3], out[4]

    @staticmethod
    def backward(ctx, g_means2d, g_conics, g_depths, _g_radii, _g_visible):
        (means, quats, scales), visible, cs = ctx.np
        dev, dt = ctx.meta
        N, ndt = means.shape[0], means.dtype
        g2 = _np(g_means2d, dt) if g_means2d is not None else np.zeros((N, 2), ndt)
        gc = _np(g_conics, dt) if g_conics is not None else np.zeros((N, 3), ndt)
        gd = _np(g_depths, dt) if g_depths is not None else np.zeros(N, ndt)
        outs = np.empty((N, 3), ndt), np.empty((N, 4), ndt), np.empty((N, 3), ndt)
        _project_backward_kernel(means, quats, scales, visible, cs, g2, gc, gd, *outs)
        g_means, g_quats, g_scales = (torch.from_numpy(v).to(dev) for v in outs)
        return (g_means, g_quats, g_scales, None, None, None, None, None, None, None, None)


def project_gaussians_fused(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor,
                            viewmat: Tensor, K: Tensor, width: int, height: int,
                            near: float = 0.01, far: float = 1e10,
                            eps2d: float = EPS2D) -> Projected:
    """:func:`project_gaussians` (same values) in compiled loops with a hand-written
    backward (no gradient to opacities, which only cull here)."""
    means2d, conics, depths, radii, visible = _FusedProjection.apply(
        means, quats, scales, opacities, viewmat, K, int(width), int(height), float(near),
        float(far), float(eps2d))
    return Projected(means2d=means2d, conics=conics, depths=depths, radii=radii,
                     visible=visible)
