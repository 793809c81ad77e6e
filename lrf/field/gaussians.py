"""The Gaussian field: 3D Gaussians carrying C-channel features expanded in real SH.

Features are latents (C=32, no offset) or RGB (C=3, with the 3DGS +0.5 offset and clamp);
`features_dc` holds the degree-0 SH *coefficient*, so the evaluated feature is
SH_C0 * dc (+ 0.5 for RGB) plus the higher bands for the viewing direction.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from lrf.render.project import EPS2D

# Real SH basis constants (the sign convention of the 3DGS / Plenoxels code), degrees 0..3.
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005,
         -1.0925484305920792, 0.5462742152960396)
SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
         -0.4570457994644658, 1.445305721320277, -0.5900435899266435)

PARAM_NAMES = ("means", "scales", "quats", "opacities", "features_dc", "features_rest")


def num_sh_coeffs(degree: int) -> int:
    return (degree + 1) ** 2


def sh_degree_from_coeffs(k: int) -> int:
    d = int(round(math.sqrt(k))) - 1
    if (d + 1) ** 2 != k or not 0 <= d <= 3:
        raise ValueError(f"{k} SH coefficients is not (d+1)^2 for a degree 0..3")
    return d


def eval_sh(degree: int, coeffs: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Evaluate real SH: coeffs [..., K>=(degree+1)^2, C], unit dirs [..., 3] -> [..., C]."""
    out = SH_C0 * coeffs[..., 0, :]
    if degree < 1:
        return out
    x, y, z = (dirs[..., i:i + 1] for i in range(3))
    out = out - SH_C1 * y * coeffs[..., 1, :] + SH_C1 * z * coeffs[..., 2, :] - SH_C1 * x * coeffs[..., 3, :]
    if degree < 2:
        return out
    xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
    out = (out + SH_C2[0] * xy * coeffs[..., 4, :] + SH_C2[1] * yz * coeffs[..., 5, :]
           + SH_C2[2] * (2 * zz - xx - yy) * coeffs[..., 6, :]
           + SH_C2[3] * xz * coeffs[..., 7, :] + SH_C2[4] * (xx - yy) * coeffs[..., 8, :])
    if degree < 3:
        return out
    return (out + SH_C3[0] * y * (3 * xx - yy) * coeffs[..., 9, :]
            + SH_C3[1] * xy * z * coeffs[..., 10, :]
            + SH_C3[2] * y * (4 * zz - xx - yy) * coeffs[..., 11, :]
            + SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy) * coeffs[..., 12, :]
            + SH_C3[4] * x * (4 * zz - xx - yy) * coeffs[..., 13, :]
            + SH_C3[5] * z * (xx - yy) * coeffs[..., 14, :]
            + SH_C3[6] * x * (xx - 3 * yy) * coeffs[..., 15, :])


def quat_to_rotmat(q: torch.Tensor) -> torch.Tensor:
    """wxyz quaternions [..., 4] (any norm) -> rotation matrices [..., 3, 3]."""
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).reshape(q.shape[:-1] + (3, 3))


def knn_scale(xyz: np.ndarray, k: int = 3) -> np.ndarray:
    """RMS distance to the k nearest neighbours (as 3DGS' distCUDA2), floored to stay log-able."""
    from scipy.spatial import cKDTree

    n = len(xyz)
    if n < 2:
        return np.full(n, 0.01)
    kk = min(k + 1, n)
    d, _ = cKDTree(xyz).query(xyz, k=kk)
    d = np.asarray(d).reshape(n, kk)[:, 1:]
    return np.sqrt(np.maximum((d ** 2).mean(1), 1e-14))


def _rasterize(*args, **kwargs):
    """Late import so lrf.field imports even where the renderer is not built."""
    from lrf.render import rasterize

    return rasterize(*args, **kwargs)


def _as_tensor(x, device, dtype=torch.float32) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)


class GaussianField(nn.Module):
    """Parameters live in `self.params` (one row per Gaussian) so densification can swap rows.

    means [N,3], scales [N,3] (log), quats [N,4] (wxyz, unnormalised), opacities [N] (logits),
    features_dc [N,C] (SH coefficient), features_rest [N,(d+1)^2-1,C].
    `eps2d` is the screen-space blur (pixels^2) the field was fitted with; it is part of the model
    (saved with it), so every render of the field matches its training renders.
    """

    def __init__(self, means, scales, quats, opacities, features_dc, features_rest=None,
                 rgb_offset: bool = False, eps2d: float = EPS2D):
        super().__init__()
        n, c = features_dc.shape
        if features_rest is None:
            features_rest = torch.zeros(n, 0, c, dtype=features_dc.dtype, device=features_dc.device)
        sh_degree_from_coeffs(features_rest.shape[1] + 1)
        vals = dict(means=means, scales=scales, quats=quats, opacities=opacities,
                    features_dc=features_dc, features_rest=features_rest)
        for k, v in vals.items():
            if v.shape[0] != n:
                raise ValueError(f"{k} has {v.shape[0]} rows, features_dc has {n}")
        self.params = nn.ParameterDict({k: nn.Parameter(v.detach().clone().float().contiguous())
                                        for k, v in vals.items()})
        self.rgb_offset = bool(rgb_offset)
        self.eps2d = float(eps2d)
        self.active_sh_degree = self.sh_degree

    # ---- shapes and activated views ----
    @property
    def num_gaussians(self) -> int:
        return self.params["means"].shape[0]

    def __len__(self) -> int:
        return self.num_gaussians

    @property
    def channels(self) -> int:
        return self.params["features_dc"].shape[1]

    @property
    def sh_degree(self) -> int:
        return sh_degree_from_coeffs(self.params["features_rest"].shape[1] + 1)

    @property
    def device(self) -> torch.device:
        return self.params["means"].device

    @property
    def means(self) -> torch.Tensor:
        return self.params["means"]

    @property
    def quats(self) -> torch.Tensor:
        return self.params["quats"]

    @property
    def scales(self) -> torch.Tensor:
        return torch.exp(self.params["scales"])

    @property
    def opacities(self) -> torch.Tensor:
        return torch.sigmoid(self.params["opacities"])

    def features_for(self, viewmat) -> torch.Tensor:
        """Per-Gaussian features [N,C] seen from the camera of w2c `viewmat` (active SH degree)."""
        dc = self.params["features_dc"]
        deg = min(self.active_sh_degree, self.sh_degree)
        if deg == 0:
            out = SH_C0 * dc
        else:
            vm = _as_tensor(viewmat, self.device)
            campos = -vm[:3, :3].T @ vm[:3, 3]
            dirs = self.means - campos
            dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            k = num_sh_coeffs(deg)
            coeffs = torch.cat([dc[:, None], self.params["features_rest"][:, :k - 1]], 1)
            out = eval_sh(deg, coeffs, dirs)
        if self.rgb_offset:
            out = torch.clamp_min(out + 0.5, 0.0)
        return out

    def render(self, view_w2c, K, width: int, height: int, background=None, backend: str = "auto"):
        """Rasterise the field into one view; returns lrf.render's RenderOutput ([H,W,C] image)."""
        viewmat = _as_tensor(view_w2c, self.device)
        Kt = _as_tensor(K, self.device)
        if background is not None:
            background = _as_tensor(background, self.device)
        return _rasterize(self.means, self.quats, self.scales, self.opacities, self.features_for(viewmat),
                          viewmat, Kt, int(width), int(height), background=background, backend=backend,
                          eps2d=self.eps2d)

    # ---- construction ----
    @classmethod
    def from_points(cls, xyz, features, sh_degree: int = 0, init_opacity: float = 0.1,
                    init_scale: float = 1.0, rgb_offset: bool = False, device=None,
                    eps2d: float = EPS2D) -> "GaussianField":
        """3DGS init: isotropic scale = RMS distance to the 3 nearest neighbours, identity rotation."""
        xyz = np.asarray(xyz.detach().cpu() if isinstance(xyz, torch.Tensor) else xyz, dtype=np.float64)
        n = len(xyz)
        feats = _as_tensor(features, "cpu").reshape(n, -1)
        c = feats.shape[1]
        dc = (feats - 0.5) / SH_C0 if rgb_offset else feats / SH_C0
        scale = torch.as_tensor(np.log(knn_scale(xyz) * init_scale), dtype=torch.float32)
        quats = torch.zeros(n, 4)
        quats[:, 0] = 1.0
        op = torch.full((n,), math.log(init_opacity / (1 - init_opacity)))
        rest = torch.zeros(n, num_sh_coeffs(sh_degree) - 1, c)
        f = cls(torch.as_tensor(xyz, dtype=torch.float32), scale[:, None].repeat(1, 3), quats, op, dc, rest,
                rgb_offset=rgb_offset, eps2d=eps2d)
        return f.to(device) if device is not None else f

    @classmethod
    def random_init(cls, n: int, channels: int, *, extent: float = 1.0, center: Sequence[float] = (0, 0, 0),
                    bbox: tuple[Sequence[float], Sequence[float]] | None = None, features=None,
                    sh_degree: int = 0, init_opacity: float = 0.1, init_scale: float = 1.0,
                    rgb_offset: bool = False, seed: int = 0, device=None) -> "GaussianField":
        """Uniform points in `bbox` (lo, hi) or the cube center +- extent (the no-SfM fallback)."""
        rng = np.random.default_rng(seed)
        if bbox is None:
            c = np.asarray(center, dtype=np.float64)
            lo, hi = c - extent, c + extent
        else:
            lo, hi = (np.asarray(b, dtype=np.float64) for b in bbox)
        xyz = lo + (hi - lo) * rng.random((n, 3))
        if features is None:
            features = np.full((n, channels), 0.5 if rgb_offset else 0.0, dtype=np.float32)
        return cls.from_points(xyz, features, sh_degree, init_opacity, init_scale, rgb_offset, device)

    # ---- serialisation helpers ----
    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: self.params[k].detach().cpu().contiguous() for k in PARAM_NAMES}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], rgb_offset: bool = False,
                     eps2d: float = EPS2D) -> "GaussianField":
        return cls(*(t[k] for k in PARAM_NAMES), rgb_offset=rgb_offset, eps2d=eps2d)


def _sample_bilinear(target: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """target [C,h,w], xy [P,2] continuous corner-origin pixel coords on that grid -> [P,C]."""
    c, h, w = target.shape
    g = torch.stack([2 * xy[:, 0] / w - 1, 2 * xy[:, 1] / h - 1], -1).to(target.dtype)
    s = torch.nn.functional.grid_sample(target[None], g[None, None], mode="bilinear",
                                        padding_mode="border", align_corners=False)
    return s[0, :, 0].T


def init_features_from_tracks(points, scene, targets: dict[int, torch.Tensor], scale: float | None = None,
                              xyz=None) -> torch.Tensor:
    """Per-point feature = mean of the target maps sampled at its track observations.

    A latent has no per-point "colour", so this samples the latent maps themselves. Observation
    pixels (working resolution) map to the target grid by 1/scale (scale=None: derived per view
    from the target shape, w/cam.width). Points without an observation in `targets` fall back to
    the mean over training views they project into; points seen nowhere get the channel mean.
    `xyz` overrides points.xyz (e.g. random points with no tracks). Returns float32 [P,C].
    """
    use_tracks = xyz is None and points is not None and len(points.track_point) > 0
    xyz = np.asarray(points.xyz if xyz is None else xyz, dtype=np.float64)
    p = len(xyz)
    any_t = next(iter(targets.values()))
    c, dev = any_t.shape[0], any_t.device
    sums = torch.zeros(p, c, dtype=torch.float64, device=dev)
    cnt = torch.zeros(p, dtype=torch.float64, device=dev)

    def grid_scale(i: int, t: torch.Tensor) -> tuple[float, float]:
        if scale is not None:
            return 1.0 / scale, 1.0 / scale
        cam = scene.cameras[i]
        return t.shape[2] / cam.width, t.shape[1] / cam.height

    if use_tracks:
        tp, ti, txy = points.track_point, points.track_image, points.track_xy
        for i, t in targets.items():
            sel = np.nonzero(ti == i)[0]
            if len(sel) == 0:
                continue
            sx, sy = grid_scale(i, t)
            xy = torch.as_tensor(txy[sel] * [sx, sy], dtype=torch.float32, device=dev)
            vals = _sample_bilinear(t.float(), xy).double()
            idx = torch.as_tensor(tp[sel], device=dev)
            sums.index_add_(0, idx, vals)
            cnt.index_add_(0, idx, torch.ones(len(sel), dtype=torch.float64, device=dev))
    missing = (cnt == 0).cpu().numpy()
    if missing.any():
        miss = np.nonzero(missing)[0]
        for i, t in targets.items():
            cam = scene.cameras[i]
            uv, z = cam.project(xyz[miss])
            ok = (z > 1e-6) & (uv[:, 0] >= 0) & (uv[:, 1] >= 0) & (uv[:, 0] < cam.width) & (uv[:, 1] < cam.height)
            if not ok.any():
                continue
            sx, sy = t.shape[2] / cam.width, t.shape[1] / cam.height
            xy = torch.as_tensor(uv[ok] * [sx, sy], dtype=torch.float32, device=dev)
            vals = _sample_bilinear(t.float(), xy).double()
            idx = torch.as_tensor(miss[ok], device=dev)
            sums.index_add_(0, idx, vals)
            cnt.index_add_(0, idx, torch.ones(int(ok.sum()), dtype=torch.float64, device=dev))
    mean = torch.stack([t.double().mean((1, 2)) for t in targets.values()]).mean(0)
    out = torch.where(cnt[:, None] > 0, sums / cnt.clamp_min(1)[:, None], mean[None])
    return out.float()
