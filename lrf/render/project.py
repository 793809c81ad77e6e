"""EWA projection of 3D Gaussians to screen space, shared by the CPU backends.

Both the brute-force reference and the tile-binned rasterizer call
:func:`project_gaussians`, so they can only differ in how they composite.
The projection is plain differentiable PyTorch: it is O(N) and cheap next to
rasterization, so autograd through it is fine.

Conventions (same as gsplat / COLMAP / OpenCV):

* ``viewmat`` is world-to-camera, camera axes x right, y down, z forward.
* pixel (row i, col j) has its centre at continuous (j + 0.5, i + 0.5);
  the projected mean is (fx x/z + cx, fy y/z + cy).

Visibility follows gsplat >= 1.5 (``fully_fused_projection`` with opacities):
a Gaussian is culled when its depth is outside (near, far), its 2D covariance
is degenerate, its opacity is below the 1/255 alpha threshold, or the
rectangle that holds every pixel where its alpha can reach 1/255 misses the
image.  Such a Gaussian can never touch a pixel, so culling never changes the
image; it only decides ``radii == 0``.  The reported ``radii`` are the
conventional ``ceil(3 sqrt(lambda_max))`` of the blurred 2D covariance (the
number densification/pruning heuristics expect).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Constants shared by every backend (values of gsplat / 3DGS).
EPS2D = 0.3  # screen-space blur added to the 2D covariance (non-antialiased)
ALPHA_THRESHOLD = 1.0 / 255.0  # pairs with alpha below this are skipped
MAX_ALPHA = 0.99  # alpha clamp
TRANSMITTANCE_THRESHOLD = 1e-4  # stop once T would drop to or below this
EXTEND_CAP = 3.33  # gsplat's cap on the opacity-aware extent, in sigmas


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


def _quat_basis(dtype, device) -> Tensor:
    """[16, 9] map from the outer product q q^T to |q|^2 * R(q), row-major R.

    Every entry of the rotation matrix of a unit quaternion is a homogeneous
    quadratic in (w, x, y, z), so R(q) = (q q^T : B) / |q|^2 is one small GEMM
    (CPU batched 3x3 matmuls are slow) and needs no separate normalisation.
    """
    B = torch.zeros(4, 4, 9, dtype=dtype, device=device)
    w, x, y, z = range(4)

    def put(e, terms):
        for coef, i, j in terms:
            B[i, j, e] += coef

    put(0, [(1, w, w), (1, x, x), (-1, y, y), (-1, z, z)])
    put(1, [(2, x, y), (-2, w, z)])
    put(2, [(2, x, z), (2, w, y)])
    put(3, [(2, x, y), (2, w, z)])
    put(4, [(1, w, w), (-1, x, x), (1, y, y), (-1, z, z)])
    put(5, [(2, y, z), (-2, w, x)])
    put(6, [(2, x, z), (-2, w, y)])
    put(7, [(2, y, z), (2, w, x)])
    put(8, [(1, w, w), (-1, x, x), (-1, y, y), (1, z, z)])
    return B.reshape(16, 9)


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices [N,3,3] from (w,x,y,z) quaternions of any norm."""
    qq = (quats[:, :, None] * quats[:, None, :]).reshape(-1, 16)
    R = qq @ _quat_basis(quats.dtype, quats.device)
    return (R / (quats * quats).sum(-1, keepdim=True).clamp_min(1e-24)).reshape(-1, 3, 3)


def covariance_3d(quats: Tensor, scales: Tensor) -> Tensor:
    """World covariance R S S^T R^T, [N,3,3]."""
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
    """Project Gaussians with the EWA (local affine) approximation."""
    R = viewmat[:3, :3]
    t = viewmat[:3, 3]
    p = means @ R.T + t
    x, y, z = p.unbind(-1)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]

    in_depth = (z > near) & (z < far)
    # Substitute a harmless depth for culled Gaussians so nothing is inf/NaN.
    zs = torch.where(in_depth, z, torch.ones_like(z))
    rz = 1.0 / zs

    # Clamp x/z, y/z to 1.3x the field of view for the Jacobian only.
    tan_fovx = 0.5 * width / fx
    tan_fovy = 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
    lim_x_neg = cx / fx + 0.3 * tan_fovx
    lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
    lim_y_neg = cy / fy + 0.3 * tan_fovy
    tx = zs * torch.minimum(torch.maximum(x * rz, -lim_x_neg), lim_x_pos)
    ty = zs * torch.minimum(torch.maximum(y * rz, -lim_y_neg), lim_y_pos)

    # Sigma_2d = J Rv M M^T Rv^T J^T with M = R(q) diag(s): build T = J Rv M
    # ([N,2,3]) with one GEMM and broadcasting instead of batched matmuls.
    MT = quat_to_rotmat(quats).transpose(1, 2).contiguous() * scales[:, :, None]  # M^T
    McT = MT @ R.T  # (Rv M)^T; contiguous [N,3,3] @ [3,3] folds into one GEMM
    Mc0, Mc1, Mc2 = McT[:, :, 0], McT[:, :, 1], McT[:, :, 2]  # rows of Rv M
    j02 = (-fx * tx * rz * rz)[:, None]
    j12 = (-fy * ty * rz * rz)[:, None]
    T0 = (fx * rz)[:, None] * Mc0 + j02 * Mc2
    T1 = (fy * rz)[:, None] * Mc1 + j12 * Mc2
    s_xx = (T0 * T0).sum(-1) + eps2d
    s_xy = (T0 * T1).sum(-1)
    s_yy = (T1 * T1).sum(-1) + eps2d
    det = s_xx * s_yy - s_xy * s_xy

    mx = fx * x * rz + cx
    my = fy * y * rz + cy

    with torch.no_grad():
        ok = in_depth & (det > 0) & (opacities >= ALPHA_THRESHOLD)
        ok &= torch.isfinite(mx) & torch.isfinite(my) & torch.isfinite(det)
        # Opacity-aware extent (sigmas) at which alpha falls to 1/255.
        q = 2.0 * torch.log(opacities.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD)
        extend = q.sqrt().clamp_max(EXTEND_CAP)
        rx = torch.ceil(extend * s_xx.clamp_min(0).sqrt())
        ry = torch.ceil(extend * s_yy.clamp_min(0).sqrt())
        ok &= ~((mx + rx <= 0) | (mx - rx >= width) | (my + ry <= 0) | (my - ry >= height))
        half_tr = 0.5 * (s_xx + s_yy)
        lam_max = half_tr + (half_tr * half_tr - det).clamp_min(0).sqrt()
        radii = torch.ceil(3.0 * lam_max.clamp_min(0).sqrt())
        radii = torch.where(ok, radii, torch.zeros_like(radii)).to(torch.int32)

    det_s = torch.where(ok, det, torch.ones_like(det))
    conics = torch.stack([s_yy / det_s, -s_xy / det_s, s_xx / det_s], dim=-1)
    okf = ok[:, None]
    conics = torch.where(okf, conics, torch.zeros_like(conics))
    means2d = torch.where(okf, torch.stack([mx, my], dim=-1), torch.zeros_like(p[:, :2]))
    return Projected(means2d=means2d, conics=conics, depths=z, radii=radii, visible=ok)
