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
    # Clamp the depth of culled Gaussians (same values otherwise) so nothing is inf/NaN.
    rz = z.clamp(near, far).reciprocal()

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
    qrows = quats.t().contiguous().unbind(0)  # contiguous w, x, y, z (strided ops: ~3x slower)
    r = _rotmat(*qrows)
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

    # Culled entries are zeroed by a product with the 0/1 mask (a where() is ~20x
    # slower on CPU); only non-finite values need the where().  The [k, N] rows
    # are returned transposed: [N, k] views whose columns are contiguous.
    inv_det = torch.where(ok, det, torch.ones_like(det)).reciprocal()
    okf = ok.to(det.dtype)
    conics = torch.stack([s_yy, -s_xy, s_xx]) * (inv_det * okf)
    means2d = torch.stack([mx, my]) * okf
    if not bool(finite.all()):
        conics = torch.where(ok, conics, 0.0)
        means2d = torch.where(ok, means2d, 0.0)
    proj = Projected(means2d=means2d.t(), conics=conics.t(), depths=z, radii=radii, visible=ok)
    saved = dict(V=V, f=(fx, fy), lim=(lim_x, lim_y), x=x, y=y, rz=rz, in_depth=in_depth,
                 u=(ux, uy), t=(txz, tyz), A=(A0, A1), q=qrows, r=r, M=(M0, M1), T=(T0, T1),
                 s=(s_xx, s_xy, s_yy), inv_det=inv_det, okf=okf)
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
        V, (fx, fy), okf = sv["V"], sv["f"], sv["okf"]
        x, y, rz = sv["x"], sv["y"], sv["rz"]
        zero = torch.zeros_like(rz)
        # Culled entries were zeroed in the forward: their gradients are 0 (a product
        # with the mask; [N, k] cotangents are read by column).
        g_mx, g_my = ((g * okf for g in g_means2d.unbind(1)) if g_means2d is not None
                      else (zero, zero))
        g_ca, g_cb, g_cc = ((g * okf for g in g_conics.unbind(1)) if g_conics is not None
                            else (zero,) * 3)

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
        g_scales = torch.empty_like(scales)
        g_M0, g_M1 = [], []
        g_sxx2, g_syy2 = 2.0 * g_sxx, 2.0 * g_syy
        for j in range(3):
            g_t0 = g_sxx2 * T0[j] + g_sxy * T1[j]
            g_t1 = g_syy2 * T1[j] + g_sxy * T0[j]
            torch.add(g_t0 * M0[j], g_t1 * M1[j], out=g_scales[:, j])
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
        # txz = clamp(x rz) passes its gradient where it did not clamp (as autograd's).
        ux, uy = sv["u"]
        g_u = (-fx * rz * g_j02).mul_(torch.eq(txz, ux))
        g_v = (-fy * rz * g_j12).mul_(torch.eq(tyz, uy))
        g_x = (fx * g_mx + g_u) * rz
        g_y = (fy * g_my + g_v) * rz
        g_rz = g_rz + x * g_u + y * g_v
        # rz = 1 / clamp(z): culled Gaussians (the only clamped ones) have g_rz == 0.
        g_z = -(rz * rz) * g_rz
        if g_depths is not None:
            g_z = g_z + g_depths
        g_means = scales.new_empty(scales.shape)
        for k in range(3):
            torch.add(g_x * V[0][k] + g_y * V[1][k], g_z * V[2][k], out=g_means[:, k])
        g_quats = _rotmat_backward(sv["q"], sv["r"], g_r, torch.empty_like(quats))
        return (g_means, g_quats, g_scales, None, None, None, None, None, None, None, None)


def _rotmat_backward(q, R: list[list[Tensor]], g_r: list[list[Tensor]], out: Tensor) -> Tensor:
    """Gradient of _rotmat into ``out`` [N, 4].

    R = Q / n2 with n2 = |q|^2 (clamped at 1e-24) and, for q = (w, v),
    Q = (w^2 - v.v) I + 2 v v^T + 2 w [v]x.  With G = dL/dQ = g_R / n2:
    dL/dw = 2 w tr G + 2 v.a and dL/dv = 2 (G + G^T) v - 2 tr(G) v + 2 w a,
    a = (G21 - G12, G02 - G20, G10 - G01); plus 2 q dL/dn2, dL/dn2 = -sum(g_R R) / n2.
    """
    w, x, y, z = q
    n2 = w * w + x * x + y * y + z * z
    inv = n2.clamp_min(1e-24).reciprocal()
    G = [[g * inv for g in row] for row in g_r]
    g_n2 = -(sum(g_r[k][j] * R[k][j] for k in range(3) for j in range(3)) * inv)
    g_n2.mul_(n2 >= 1e-24)
    tr = G[0][0] + G[1][1] + G[2][2]
    a = (G[2][1] - G[1][2], G[0][2] - G[2][0], G[1][0] - G[0][1])
    v = (x, y, z)
    S = [[G[k][j] + G[j][k] for j in range(3)] for k in range(3)]
    d = g_n2 - tr  # common factor of v: -tr G + dL/dn2
    torch.mul(w * (tr + g_n2) + x * a[0] + y * a[1] + z * a[2], 2.0, out=out[:, 0])
    for k in range(3):
        sv_k = S[k][0] * x + S[k][1] * y + S[k][2] * z
        torch.mul(sv_k + v[k] * d + w * a[k], 2.0, out=out[:, k + 1])
    return out


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
