"""Photometric losses for feature maps of any channel count (latents or RGB).

Latent channels have very different scales, so the loss compares maps after a per-channel
standardisation (ChannelNorm) fitted once on the training targets; otherwise L1 and SSIM
would be dominated by the widest channels.

SSIM data range: on standardised maps we use L = 4 (DEFAULT_SSIM_RANGE), i.e. +-2 std. For
RGB in [0,1] with its typical std of ~0.25 this gives the same constants C1 = (0.01 L)^2,
C2 = (0.03 L)^2 as the usual L = 1 on raw colours, so the RGB baseline keeps 3DGS' behaviour
and latents get stabilisers sized to their spread.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

DEFAULT_SSIM_RANGE = 4.0


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float32, device=None) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return (g / g.sum()).to(dtype)


def _band(n: int, g: torch.Tensor) -> torch.Tensor:
    """[n,n] matrix of the 1D window truncated at the borders (= zero padding)."""
    r = (len(g) - 1) // 2
    i = torch.arange(n, device=g.device)
    d = i[None, :] - i[:, None]
    ok = d.abs() <= r
    m = torch.zeros(n, n, dtype=g.dtype, device=g.device)
    m[ok] = g[(d + r)[ok]]
    return m


def _blur(x: torch.Tensor, g: torch.Tensor, matmul: bool) -> torch.Tensor:
    """Separable Gaussian blur of [..., H, W] with zero padding."""
    h, w = x.shape[-2:]
    if matmul:   # small maps: two dense matmuls beat depthwise conv on CPU by ~2x
        return _band(h, g) @ x @ _band(w, g).T
    k = len(g)
    shape = x.shape
    y = x.reshape(1, -1, h, w)                # depthwise (grouped) conv: fast on CPU and CUDA
    n = y.shape[1]
    y = F.conv2d(y, g.view(1, 1, 1, k).expand(n, 1, 1, k), padding=(0, k // 2), groups=n)
    y = F.conv2d(y, g.view(1, 1, k, 1).expand(n, 1, k, 1), padding=(k // 2, 0), groups=n)
    return y.reshape(shape)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5, matmul: bool | None = None) -> torch.Tensor:
    """Mean SSIM of [C,H,W] or [B,C,H,W] maps; separable Gaussian window with zero ("same")
    padding as in the 3DGS loss. On standardised maps zero padding means padding with the
    channel mean, which keeps the border statistics tame. matmul=None picks banded-matrix
    blurs for maps up to H+W <= 512 (latent maps) and convolutions above."""
    g = gaussian_window(window, sigma, a.dtype, a.device)
    if matmul is None:
        matmul = a.shape[-2] + a.shape[-1] <= 512
    x = _blur(torch.stack([a, b, a * a, b * b, a * b]), g, matmul)
    mu_a, mu_b, aa, bb, ab = x.unbind(0)
    s_aa = aa - mu_a ** 2
    s_bb = bb - mu_b ** 2
    s_ab = ab - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    m = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2))
    return m.mean()


def d_ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = 11,
           sigma: float = 1.5, matmul: bool | None = None) -> torch.Tensor:
    """1 - SSIM (differentiable; 0 for identical maps)."""
    return 1.0 - ssim(a, b, data_range, window, sigma, matmul)


@dataclass
class ChannelNorm:
    """Per-channel mean/std of the training targets; x -> (x - mean) / std on the channel axis."""

    mean: torch.Tensor   # [C]
    std: torch.Tensor    # [C]

    @classmethod
    def from_targets(cls, targets: Iterable[torch.Tensor], eps: float = 1e-6) -> "ChannelNorm":
        """Exact pooled statistics over every pixel of every [C,h,w] target (float64 sums)."""
        s = s2 = None
        n = 0
        for t in targets:
            t = t.detach().double().flatten(1)
            s = t.sum(1) if s is None else s + t.sum(1)
            s2 = (t * t).sum(1) if s2 is None else s2 + (t * t).sum(1)
            n += t.shape[1]
        if s is None:
            raise ValueError("no targets to compute channel statistics from")
        mean = s / n
        var = (s2 / n - mean ** 2).clamp_min(0)
        return cls(mean.float().cpu(), var.sqrt().clamp_min(eps).float().cpu())

    @classmethod
    def identity(cls, channels: int) -> "ChannelNorm":
        return cls(torch.zeros(channels), torch.ones(channels))

    def __call__(self, x: torch.Tensor, dim: int = -3) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[dim] = -1
        return (x - self.mean.to(x).view(shape)) / self.std.to(x).view(shape)

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "ChannelNorm":
        return cls(torch.tensor(d["mean"], dtype=torch.float32), torch.tensor(d["std"], dtype=torch.float32))


def field_loss(pred: torch.Tensor, target: torch.Tensor, norm: ChannelNorm | None = None,
               lambda_dssim: float = 0.2, data_range: float = DEFAULT_SSIM_RANGE) -> torch.Tensor:
    """(1-l) * L1 + l * D-SSIM on channel-normalised [C,H,W] (or [B,C,H,W]) maps."""
    if norm is not None:
        pred, target = norm(pred), norm(target)
    l1 = (pred - target).abs().mean()
    if lambda_dssim == 0:
        return l1
    return (1 - lambda_dssim) * l1 + lambda_dssim * d_ssim(pred, target, data_range)
