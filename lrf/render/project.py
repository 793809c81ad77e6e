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

import torch
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
    w, x, y, z = quats.unbind(-1)
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
    computes the very same values with a hand-written backward.
    """
    return _project(means, quats, scales, opacities, viewmat, K, width, height, near, far,
                    eps2d)[0]


def _project(means, quats, scales, opacities, viewmat, K, width, height, near, far, eps2d):
    """The projection, plus the intermediates that _FusedProjection.backward reuses."""
    V = viewmat.detach().double().cpu().tolist()  # constants: no grad to the camera
    fx, fy, cx, cy = (float(v) for v in (K[0, 0], K[1, 1], K[0, 2], K[1, 2]))
    m0, m1, m2 = means.unbind(-1)
    x, y, z = (m0 * V[i][0] + m1 * V[i][1] + m2 * V[i][2] + V[i][3] for i in range(3))

    in_depth = (z > near) & (z < far)
    # Substitute a harmless depth for culled Gaussians so nothing is inf/NaN.
    zs = torch.where(in_depth, z, torch.ones_like(z))
    rz = 1.0 / zs

    # Clamp x/z, y/z to 1.3x the field of view for the Jacobian only (as gsplat).
    tan_fovx = 0.5 * width / fx
    tan_fovy = 0.5 * height / fy
    lim_x = (-(cx / fx + 0.3 * tan_fovx), (width - cx) / fx + 0.3 * tan_fovx)
    lim_y = (-(cy / fy + 0.3 * tan_fovy), (height - cy) / fy + 0.3 * tan_fovy)
    ux, uy = x * rz, y * rz
    txz = ux.clamp(*lim_x)  # = tx / z
    tyz = uy.clamp(*lim_y)

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
        ok &= torch.isfinite(mx) & torch.isfinite(my) & torch.isfinite(det)
        # Opacity-aware extent (in sigmas) at which alpha falls to 1/255.
        q = 2.0 * torch.log(opacities.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD)
        extend = q.sqrt().clamp_max(EXTEND_CAP)
        rx = torch.ceil(extend * s_xx.clamp_min(0).sqrt())
        ry = torch.ceil(extend * s_yy.clamp_min(0).sqrt())
        ok &= ~((mx + rx <= 0) | (mx - rx >= width) | (my + ry <= 0) | (my - ry >= height))
        half_tr = 0.5 * (s_xx + s_yy)
        lam_max = half_tr + (half_tr * half_tr - det).clamp_min(0).sqrt()
        radii = torch.ceil(3.0 * lam_max.clamp_min(0).sqrt())
        radii = torch.where(ok, radii, torch.zeros_like(radii)).to(torch.int32)

    inv_det = 1.0 / torch.where(ok, det, torch.ones_like(det))
    okf = ok[:, None]
    conics = torch.where(okf, torch.stack([s_yy, -s_xy, s_xx], -1) * inv_det[:, None], 0.0)
    means2d = torch.where(okf, torch.stack([mx, my], -1), 0.0)
    proj = Projected(means2d=means2d, conics=conics, depths=z, radii=radii, visible=ok)
    saved = dict(V=V, f=(fx, fy), lim=(lim_x, lim_y), x=x, y=y, rz=rz, in_depth=in_depth,
                 u=(ux, uy), t=(txz, tyz), A=(A0, A1), r=r, M=(M0, M1), T=(T0, T1),
                 s=(s_xx, s_xy, s_yy), inv_det=inv_det, ok=ok)
    return proj, saved


class _FusedProjection(torch.autograd.Function):
    """:func:`project_gaussians` with a hand-written backward.

    Autograd through the ~100 elementwise [N] ops of the projection records a
    node per op; on a CPU that bookkeeping costs more than the arithmetic.
    The forward runs the same code (so values are bit-identical); the
    backward is the chain rule written out on [N] columns.
    """

    @staticmethod
    def forward(ctx, means, quats, scales, opacities, viewmat, K, width, height, near, far,
                eps2d):
        proj, sv = _project(means, quats, scales, opacities, viewmat, K, width, height, near,
                            far, eps2d)
        ctx.sv = sv
        ctx.save_for_backward(quats, scales)
        ctx.mark_non_differentiable(proj.radii, proj.visible)
        return proj.means2d, proj.conics, proj.depths, proj.radii, proj.visible

    @staticmethod
    def backward(ctx, g_means2d, g_conics, g_depths, _g_radii, _g_visible):
        quats, scales = ctx.saved_tensors
        sv = ctx.sv
        V, (fx, fy), ok = sv["V"], sv["f"], sv["ok"]
        x, y, rz = sv["x"], sv["y"], sv["rz"]
        zero = torch.zeros_like(rz)
        g_mx, g_my = (g_means2d.unbind(1) if g_means2d is not None else (zero, zero))
        g_ca, g_cb, g_cc = (g_conics.unbind(1) if g_conics is not None else (zero,) * 3)
        g_mx, g_my = torch.where(ok, g_mx, 0.0), torch.where(ok, g_my, 0.0)
        g_ca, g_cb, g_cc = (torch.where(ok, g, 0.0) for g in (g_ca, g_cb, g_cc))

        # conic = (s_yy, -s_xy, s_xx) / det, det = s_xx s_yy - s_xy^2.
        s_xx, s_xy, s_yy = sv["s"]
        idet = sv["inv_det"]
        g_det = -(idet * idet) * (g_ca * s_yy - g_cb * s_xy + g_cc * s_xx)
        g_sxx = g_cc * idet + g_det * s_yy
        g_syy = g_ca * idet + g_det * s_xx
        g_sxy = -(g_cb * idet) - 2.0 * g_det * s_xy
        # s = T T^T + eps2d I, T = M diag(scales), M = (J Rv) R.
        T0, T1 = sv["T"]
        M0, M1 = sv["M"]
        sc = scales.unbind(-1)
        g_sc, g_M0, g_M1 = [], [], []
        for j in range(3):
            g_t0 = 2.0 * g_sxx * T0[j] + g_sxy * T1[j]
            g_t1 = 2.0 * g_syy * T1[j] + g_sxy * T0[j]
            g_sc.append(g_t0 * M0[j] + g_t1 * M1[j])
            g_M0.append(g_t0 * sc[j])
            g_M1.append(g_t1 * sc[j])
        A0, A1 = sv["A"]
        r = sv["r"]
        g_A0 = [g_M0[0] * r[k][0] + g_M0[1] * r[k][1] + g_M0[2] * r[k][2] for k in range(3)]
        g_A1 = [g_M1[0] * r[k][0] + g_M1[1] * r[k][1] + g_M1[2] * r[k][2] for k in range(3)]
        g_r = [[g_M0[j] * A0[k] + g_M1[j] * A1[k] for j in range(3)] for k in range(3)]
        # A0 = j00 Rv0 + j02 Rv2, A1 = j11 Rv1 + j12 Rv2.
        g_j00 = g_A0[0] * V[0][0] + g_A0[1] * V[0][1] + g_A0[2] * V[0][2]
        g_j02 = g_A0[0] * V[2][0] + g_A0[1] * V[2][1] + g_A0[2] * V[2][2]
        g_j11 = g_A1[0] * V[1][0] + g_A1[1] * V[1][1] + g_A1[2] * V[1][2]
        g_j12 = g_A1[0] * V[2][0] + g_A1[1] * V[2][1] + g_A1[2] * V[2][2]
        # j00 = fx rz, j02 = -fx txz rz (same for y); mx = fx x rz + cx (same for y).
        txz, tyz = sv["t"]
        g_rz = (fx * g_j00 - fx * txz * g_j02 + fy * g_j11 - fy * tyz * g_j12
                + fx * x * g_mx + fy * y * g_my)
        g_x = fx * rz * g_mx
        g_y = fy * rz * g_my
        # txz = clamp(x rz) passes its gradient inside the limits (as autograd's clamp).
        (ux, uy), (lim_x, lim_y) = sv["u"], sv["lim"]
        g_u = torch.where((ux >= lim_x[0]) & (ux <= lim_x[1]), -fx * rz * g_j02, 0.0)
        g_v = torch.where((uy >= lim_y[0]) & (uy <= lim_y[1]), -fy * rz * g_j12, 0.0)
        g_x = g_x + rz * g_u
        g_y = g_y + rz * g_v
        g_rz = g_rz + x * g_u + y * g_v
        # rz = 1 / z where in depth (z is replaced by 1 elsewhere).
        g_z = torch.where(sv["in_depth"], -(rz * rz) * g_rz, 0.0)
        if g_depths is not None:
            g_z = g_z + g_depths
        g_means = torch.stack([g_x * V[0][k] + g_y * V[1][k] + g_z * V[2][k] for k in range(3)],
                              -1)
        g_quats = _rotmat_backward(quats, g_r)
        return (g_means, g_quats, torch.stack(g_sc, -1), None, None, None, None, None, None,
                None, None)


def _rotmat_backward(quats: Tensor, g_r: list[list[Tensor]]) -> Tensor:
    """Gradient of _rotmat_columns: R = Q(q) / |q|^2 with Q quadratic in q."""
    w, x, y, z = quats.unbind(-1)
    n2 = w * w + x * x + y * y + z * z
    inv = 1.0 / n2.clamp_min(1e-24)
    G = [[g * inv for g in row] for row in g_r]  # dL/dQ
    q00, q11, q22 = w * w + x * x - y * y - z * z, w * w - x * x + y * y - z * z, \
        w * w - x * x - y * y + z * z
    q01, q10 = 2.0 * (x * y - w * z), 2.0 * (x * y + w * z)
    q02, q20 = 2.0 * (x * z + w * y), 2.0 * (x * z - w * y)
    q12, q21 = 2.0 * (y * z - w * x), 2.0 * (y * z + w * x)
    # dL/d(1/|q|^2) = sum g_r Q; the clamp stops it below 1e-24.
    g_inv = (g_r[0][0] * q00 + g_r[0][1] * q01 + g_r[0][2] * q02 + g_r[1][0] * q10
             + g_r[1][1] * q11 + g_r[1][2] * q12 + g_r[2][0] * q20 + g_r[2][1] * q21
             + g_r[2][2] * q22)
    g_n2 = torch.where(n2 >= 1e-24, -(inv * inv) * g_inv, 0.0)
    d = G[0][0] + G[1][1] + G[2][2]
    g_w = 2.0 * (w * (d + g_n2) - z * G[0][1] + y * G[0][2] + z * G[1][0] - x * G[1][2]
                 - y * G[2][0] + x * G[2][1])
    g_x = 2.0 * (x * (G[0][0] - G[1][1] - G[2][2] + g_n2) + y * G[0][1] + z * G[0][2]
                 + y * G[1][0] - w * G[1][2] + z * G[2][0] + w * G[2][1])
    g_y = 2.0 * (y * (G[1][1] - G[0][0] - G[2][2] + g_n2) + x * G[0][1] + w * G[0][2]
                 + x * G[1][0] + z * G[1][2] - w * G[2][0] + z * G[2][1])
    g_z = 2.0 * (z * (G[2][2] - G[0][0] - G[1][1] + g_n2) - w * G[0][1] + x * G[0][2]
                 + w * G[1][0] + y * G[1][2] + x * G[2][0] + y * G[2][1])
    return torch.stack([g_w, g_x, g_y, g_z], -1)


def project_gaussians_fused(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor,
                            viewmat: Tensor, K: Tensor, width: int, height: int,
                            near: float = 0.01, far: float = 1e10,
                            eps2d: float = EPS2D) -> Projected:
    """:func:`project_gaussians` (same values) with a hand-written backward
    (no gradient to opacities, which only cull here)."""
    if not torch.is_grad_enabled() or not any(
            t.requires_grad for t in (means, quats, scales)):
        return project_gaussians(means, quats, scales, opacities, viewmat, K, width, height,
                                 near, far, eps2d)
    means2d, conics, depths, radii, visible = _FusedProjection.apply(
        means, quats, scales, opacities, viewmat, K, width, height, near, far, eps2d)
    return Projected(means2d=means2d, conics=conics, depths=depths, radii=radii,
                     visible=visible)
