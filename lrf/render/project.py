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

    The camera is a constant (no gradient to viewmat or K).
    """
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
    lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
    lim_x_neg = cx / fx + 0.3 * tan_fovx
    lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
    lim_y_neg = cy / fy + 0.3 * tan_fovy
    txz = (x * rz).clamp(-lim_x_neg, lim_x_pos)  # = tx / z
    tyz = (y * rz).clamp(-lim_y_neg, lim_y_pos)

    # Sigma_2d = T T^T with T = J Rv R(q) diag(s) (2x3), J = [[fx/z, 0, -fx tx/z^2],
    # [0, fy/z, -fy ty/z^2]], all as elementwise ops on [N] columns.
    j00, j02 = fx * rz, -fx * txz * rz
    j11, j12 = fy * rz, -fy * tyz * rz
    A0 = [j00 * V[0][k] + j02 * V[2][k] for k in range(3)]  # row 0 of J Rv
    A1 = [j11 * V[1][k] + j12 * V[2][k] for k in range(3)]  # row 1 of J Rv
    r = _rotmat_columns(quats)
    sc = scales.unbind(-1)
    T0 = [(A0[0] * r[0][j] + A0[1] * r[1][j] + A0[2] * r[2][j]) * sc[j] for j in range(3)]
    T1 = [(A1[0] * r[0][j] + A1[1] * r[1][j] + A1[2] * r[2][j]) * sc[j] for j in range(3)]
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
    return Projected(means2d=means2d, conics=conics, depths=z, radii=radii, visible=ok)
