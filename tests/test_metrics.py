"""Tests for lrf.metrics: PSNR/SSIM against hand-computed values, offline LPIPS."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lrf.metrics import LPIPS, psnr, ssim
from lrf.vae import WeightsError


def shared_dir() -> Path:
    """Shared data folder: $LRF_SHARED, default <repo>/../shared."""
    default = Path(__file__).resolve().parents[1].parent / "shared"
    return Path(os.environ.get("LRF_SHARED") or default)


SHARED = shared_dir()
LPIPS_DIR = SHARED / "weights" / "lpips"
needs_alex = pytest.mark.skipif(
    not (LPIPS_DIR / "alexnet_features.safetensors").is_file(),
    reason=f"LPIPS backbone weights not found in {LPIPS_DIR} (set LRF_SHARED)",
)


# ---------------------------------------------------------------------------------------
# PSNR / SSIM
# ---------------------------------------------------------------------------------------
def test_psnr_hand_values():
    target = torch.zeros(3, 8, 8)
    assert psnr(target + 0.1, target) == pytest.approx(20.0)  # mse 1e-2
    pred = torch.stack([target + 0.1, target + 0.01])  # 20 dB and 40 dB
    assert psnr(pred, torch.zeros_like(pred)) == pytest.approx(30.0)  # mean of per-image PSNR
    # half the pixels off by 0.2: mse = 0.02 -> 10*log10(50)
    pred = target.clone()
    pred[:, :4] = 0.2
    assert psnr(pred, target) == pytest.approx(10 * math.log10(50))
    assert psnr(target, target) == math.inf
    with pytest.raises(ValueError):
        psnr(torch.zeros(3, 8, 8), torch.zeros(3, 8, 4))


def test_ssim_hand_values():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-5)
    # constant images a, b: no variance, SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = 0.01^2
    a, b, c1 = 0.2, 0.4, 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    got = ssim(torch.full((3, 32, 32), a), torch.full((3, 32, 32), b))
    assert got == pytest.approx(expected, abs=1e-4)
    assert ssim(x, (x + 0.3 * torch.randn_like(x)).clamp(0, 1)) < 0.9


# ---------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def alex() -> LPIPS:
    return LPIPS("alex", weights_dir=LPIPS_DIR)


@needs_alex
def test_lpips_backbone_weights_loaded(alex):
    from safetensors.torch import load_file

    ref = load_file(str(LPIPS_DIR / "alexnet_features.safetensors"))
    net = alex.model.net  # lpips keeps torchvision's feature indices as child names
    assert torch.equal(getattr(net.slice1, "0").weight, ref["0.weight"])
    assert torch.equal(getattr(net.slice2, "3").bias, ref["3.bias"])
    assert torch.equal(getattr(net.slice5, "10").weight, ref["10.weight"])
    # the linear heads come from the lpips wheel (not random init)
    import lpips

    heads = torch.load(
        Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth", map_location="cpu", weights_only=True
    )
    assert torch.equal(alex.model.lin0.model[1].weight, heads["lin0.model.1.weight"])
    assert not any(p.requires_grad for p in alex.parameters())
    alex.train()
    assert not alex.training and not alex.model.training


@needs_alex
def test_lpips_identical_is_zero_and_differentiable(alex):
    torch.manual_seed(0)
    target = torch.rand(2, 3, 64, 64)
    assert alex(target, target).abs().max() < 1e-6
    pred = (target + 0.1 * torch.randn_like(target)).clamp(0, 1).requires_grad_(True)
    d = alex(pred, target)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert all(p.grad is None for p in alex.parameters())
    assert alex(target[0], target[0]).dim() == 0  # unbatched input -> scalar


@needs_alex
def test_lpips_blur_closer_than_noise(alex):
    path = SHARED / "data" / "llff" / "fern" / "images_8" / "image000.png"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    from PIL import Image
    from torchvision.transforms.functional import gaussian_blur

    a = np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255.0
    x = torch.from_numpy(a).permute(2, 0, 1)[None, :, 61:317, 124:380]  # 256x256 centre
    torch.manual_seed(0)
    blurred = gaussian_blur(x, kernel_size=5, sigma=1.0)
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    with torch.no_grad():
        d_blur, d_noise = alex(blurred, x).item(), alex(noisy, x).item()
    assert 0 < d_blur < d_noise


def test_lpips_missing_weights(tmp_path):
    with pytest.raises(WeightsError) as info:
        LPIPS("alex", weights_dir=tmp_path)
    msg = str(info.value)
    assert msg == f"lpips-alex: {tmp_path / 'alexnet_features.safetensors'}: file not found"
    (tmp_path / "vgg16_features.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(WeightsError, match="vgg16_features.safetensors: cannot be read") as info:
        LPIPS("vgg", weights_dir=tmp_path)
    assert "\n" not in str(info.value)


def test_lpips_wrong_backbone_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"0.weight": torch.zeros(64, 3, 3, 3)}, str(tmp_path / "alexnet_features.safetensors"))
    with pytest.raises(WeightsError, match="lpips-alex: .*does not match") as info:
        LPIPS("alex", weights_dir=tmp_path)
    assert "\n" not in str(info.value)
