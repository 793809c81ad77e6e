"""lrf.vae.shift: sub-cell shifts of images and latents and the shift-averaged ceiling (issue 18)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrf.vae import Autoencoder
from lrf.vae.shift import (GRID_2X2, GRID_4X4, average_shifted, grid_shifts, shift_averaged_latent,
                           shift_ceiling, shift_ceiling_view, shift_image, shift_latent)


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest


class PoolAE(Autoencoder):
    """Encoder: 8x8 average pooling; decoder: bilinear upsampling, times `gain` (so the plain
    ceiling is finite). On affine images (ramps) pooling commutes exactly with sub-cell shifts and
    bilinear latent shifts: a perfectly shift-equivariant autoencoder away from the borders."""

    kind = "pool"

    def __init__(self, gain: float = 0.98):
        super().__init__()
        self.latent_channels, self.gain = 3, gain
        self.encoder, self.decoder = nn.Identity(), nn.Identity()

    def _encode(self, x):
        return F.avg_pool2d(x, 8)

    def _decode(self, z):
        return self.gain * F.interpolate(z, scale_factor=8, mode="bilinear", align_corners=False)


class SubsampleAE(PoolAE):
    """Aliasing encoder: every 8th pixel (what a strided network without low-pass filters does)."""

    def _encode(self, x):
        return x[..., 4::8, 4::8]


class UnshuffleAE(PoolAE):
    """Lossless but not equivariant: each 8x8 cell's 192 pixels as its channels (pixel unshuffle),
    decoded by the inverse (times `gain`). Its plain ceiling is near perfect; averaging cells of
    different sub-cell offsets mixes unrelated pixels."""

    def __init__(self, gain: float = 0.98):
        super().__init__(gain)
        self.latent_channels = 192

    def _encode(self, x):
        return F.pixel_unshuffle(x, 8)

    def _decode(self, z):
        return self.gain * F.pixel_shuffle(z, 8)


def ramp(h: int = 64, w: int = 80) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.stack([0.1 + 0.008 * xx + 0.002 * yy, 0.8 - 0.004 * xx + 0.003 * yy, 0.3 + 0.005 * yy])[None]


def texture(h: int = 64, w: int = 80, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    img = sum(F.interpolate(torch.rand(1, 3, h // c + 2, w // c + 2, generator=g), size=(h, w), mode="bilinear",
                            align_corners=False) for c in (2, 4, 8)) / 3
    return img


def test_shift_image_moves_the_window_with_replicate_padding():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    s = shift_image(x, 2, 1)                                   # the crop at origin (2, 1)
    assert torch.equal(s[..., :-1, :-2], x[..., 1:, 2:])
    assert torch.equal(s[..., -1, :-2], x[..., -1, 2:])        # bottom row replicated
    assert torch.equal(s[..., :-1, -1], x[..., 1:, -1])        # right column replicated
    assert torch.equal(shift_image(x, 0, 0), x)
    assert torch.equal(shift_image(x[0], 2, 1), s[0])          # [C, H, W] too
    with pytest.raises(ValueError):
        shift_image(x, -1, 0)


def test_shift_latent_integer_and_fractional():
    z = torch.randn(2, 4, 6, 7, generator=torch.Generator().manual_seed(0))
    s = shift_latent(z, 1, 2)
    torch.testing.assert_close(s[..., 2:, 1:], z[..., :-2, :-1])
    torch.testing.assert_close(s[..., :2, 1:], z[..., :1, :-1].expand_as(s[..., :2, 1:]))  # border padding
    half = shift_latent(z, 0.5, 0)
    torch.testing.assert_close(half[..., 1:], 0.5 * (z[..., :-1] + z[..., 1:]))
    rt = shift_latent(shift_latent(z, 0.25, 0), -0.25, 0)      # a fractional round trip blurs ...
    assert float((rt - z)[..., 1:-1].abs().max()) > 0.1
    lin = torch.arange(7.0).expand(1, 1, 6, 7)                  # ... except a linear ramp, inside
    torch.testing.assert_close(shift_latent(shift_latent(lin, 0.25, 0), -0.25, 0)[..., 1:-1], lin[..., 1:-1])
    assert torch.equal(shift_latent(z, 0, 0), z)
    # differentiable
    zz = z.clone().requires_grad_(True)
    shift_latent(zz, 0.3, -0.6).sum().backward()
    assert zz.grad is not None and float(zz.grad.abs().sum()) > 0


def test_grid_and_average():
    assert len(grid_shifts(GRID_4X4)) == 16 and grid_shifts(GRID_2X2) == [(0, 0), (4, 0), (0, 4), (4, 4)]
    z = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(average_shifted([z], [(0, 0)]), z)
    torch.testing.assert_close(average_shifted([z, z], [(0, 0), (8, 0)]),
                               0.5 * (z + shift_latent(z, 1, 0)))


def test_one_shift_grid_equals_plain_ceiling():
    """A 1x1 grid (no shift) is decode(encode(x)): the measure reduces to the plain ceiling."""
    vae = SubsampleAE()
    x = texture()
    r = shift_ceiling_view(vae, x, grid=(0,))
    assert r["shift"] == pytest.approx(r["plain"], abs=1e-9)
    torch.testing.assert_close(shift_averaged_latent(vae.encode, x, (0,)), vae.encode(x))


def test_shift_equivariant_autoencoder_scores_its_plain_ceiling():
    """Pooling on a ramp is exactly shift-equivariant (away from two latent cells of border, where
    replicate padding breaks the ramp): the shift-averaged ceiling equals the plain one on both
    grids; a lossless but non-equivariant one (pixel unshuffle) on a texture loses many dB."""
    vae, x = PoolAE(), ramp()
    for grid in (GRID_2X2, GRID_4X4):
        r = shift_ceiling_view(vae, x, grid, border=16)
        assert np.isfinite(r["plain"]) and r["plain"] > 30
        assert r["shift"] == pytest.approx(r["plain"], abs=1e-3), (grid, r)
    lossless = shift_ceiling_view(UnshuffleAE(), texture(), GRID_4X4, border=16)
    assert lossless["shift"] < lossless["plain"] - 5.0, lossless


def test_shift_ceiling_over_scene_views(tmp_path):
    from PIL import Image

    from lrf.scene.model import Camera, Scene

    cams = []
    for k, split in enumerate(("train", "test", "test")):
        img = (texture(48, 64, seed=k)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(img).save(tmp_path / f"{k}.png")
        K = np.array([[64.0, 0, 32], [0, 64.0, 24], [0, 0, 1]])
        cams.append(Camera(f"{k}.png", str(tmp_path / f"{k}.png"), 64, 48, K, np.eye(4), split))
    scene = Scene("synthetic", "s", cams, root=tmp_path)
    r = shift_ceiling(UnshuffleAE(), scene)
    assert r["views"] == 2 and [v["view"] for v in r["per_view"]] == ["1.png", "2.png"]
    assert r["shift"] == pytest.approx(np.mean([v["shift"] for v in r["per_view"]]))
    assert r["shift"] < r["plain"]
    assert shift_ceiling(UnshuffleAE(), scene, ids=[0], grid=(0,))["shift"] == pytest.approx(
        shift_ceiling(UnshuffleAE(), scene, ids=[0])["plain"])
    # lrf.evaluate's ceiling kind reports the same numbers per held-out view (the report reads them)
    from lrf.evaluate import evaluate

    metrics, _ = evaluate(scene, "ceiling", tmp_path / "eval", UnshuffleAE(), save_renders=False)
    assert [v["psnr_shift"] for v in metrics["per_view"]] == pytest.approx([v["shift"] for v in r["per_view"]])
    assert metrics["mean"]["psnr_shift"] == pytest.approx(r["shift"])
    assert metrics["mean"]["psnr"] == pytest.approx(r["plain"])
