"""Tests for lrf.vae: TAESD-family loading/quality, diffusers wrappers, weight errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lrf.metrics import psnr
from lrf.vae import Autoencoder, WeightsError, build_autoencoder
from lrf.vae.taesd import TinyAutoencoder


def shared_dir() -> Path:
    """Shared data folder: $LRF_SHARED, default <repo>/../shared."""
    default = Path(__file__).resolve().parents[1].parent / "shared"
    return Path(os.environ.get("LRF_SHARED") or default)


SHARED = shared_dir()
TAEF2_DIR = SHARED / "weights" / "taef2"
needs_taef2 = pytest.mark.skipif(
    not (TAEF2_DIR / "taef2_encoder.pth").is_file(),
    reason=f"TAEF2 weights not found in {TAEF2_DIR} (set LRF_SHARED)",
)


def _load_rgb(path: Path, background: float = 1.0) -> torch.Tensor:
    from PIL import Image

    a = np.asarray(Image.open(path)).astype(np.float32) / 255.0
    if a.ndim == 3 and a.shape[2] == 4:  # composite RGBA on a constant background
        a = a[..., :3] * a[..., 3:] + background * (1.0 - a[..., 3:])
    return torch.from_numpy(np.ascontiguousarray(a[..., :3])).permute(2, 0, 1)[None]


def _centre_crop(x: torch.Tensor, w: int, h: int) -> torch.Tensor:
    H, W = x.shape[-2:]
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top : top + h, left : left + w]


@pytest.fixture(scope="module")
def taef2() -> Autoencoder:
    return build_autoencoder("taef2", TAEF2_DIR)


# ---------------------------------------------------------------------------------------
# TAEF2 with the real checkpoint
# ---------------------------------------------------------------------------------------
@needs_taef2
def test_taef2_lego_roundtrip(taef2):
    path = SHARED / "data" / "nerf_synthetic" / "lego" / "train" / "r_0.png"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    x = _load_rgb(path)
    assert x.shape == (1, 3, 400, 400)
    with torch.no_grad():
        z = taef2.encode(x)
        y = taef2.decode(z)
    assert z.shape == (1, 32, 50, 50)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    value = psnr(y, x)
    print(f"TAEF2 lego r_0 PSNR {value:.2f} dB")
    assert value >= 31.5


@needs_taef2
def test_taef2_fern_roundtrip(taef2):
    path = SHARED / "data" / "llff" / "fern" / "images_8" / "image000.png"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    x = _centre_crop(_load_rgb(path), 504, 376)
    with torch.no_grad():
        z = taef2.encode(x)
        y = taef2.decode(z)
    assert z.shape == (1, 32, 47, 63)
    value = psnr(y, x)
    print(f"TAEF2 fern image000 PSNR {value:.2f} dB")
    assert value >= 24.5


@needs_taef2
def test_taef2_structure(taef2):
    """The mid (1x1/GroupNorm) branch sits only at the lowest resolution; all frozen."""
    assert taef2.latent_channels == 32 and taef2.downscale == 8
    enc_mid = [i for i, m in enumerate(taef2.encoder) if getattr(m, "pool", None) is not None]
    dec_mid = [i for i, m in enumerate(taef2.decoder) if getattr(m, "pool", None) is not None]
    assert enc_mid == [11, 12, 13]
    assert dec_mid == [3, 4, 5]
    assert all(p.dtype == torch.float32 for p in taef2.parameters())
    assert not any(p.requires_grad for p in taef2.parameters())
    assert not taef2.training
    # no latent scaling: encode is the raw encoder output on [0,1] images
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(taef2.encode(x), taef2.encoder(x))
    mean, logvar = taef2.encode_distribution(x)
    assert logvar is None and mean.shape == (1, 32, 4, 4)


# ---------------------------------------------------------------------------------------
# TAESD / TAEF1 layouts with random weights (no checkpoint needed)
# ---------------------------------------------------------------------------------------
def _save_fake(folder: Path, kind: str, model: TinyAutoencoder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() for k, v in model.encoder.state_dict().items()}, folder / f"{kind}_encoder.pth")
    torch.save({k: v.half() for k, v in model.decoder.state_dict().items()}, folder / f"{kind}_decoder.pth")


@pytest.mark.parametrize("kind,channels", [("taesd", 4), ("taef1", 16)])
def test_taesd_variants_load(tmp_path, kind, channels):
    torch.manual_seed(0)
    ref = TinyAutoencoder(kind)
    _save_fake(tmp_path, kind, ref)
    ae = build_autoencoder(kind, tmp_path)
    assert ae.latent_channels == channels
    assert not any(getattr(m, "pool", None) is not None for m in ae.modules())
    ref_sd = ref.encoder.state_dict()
    for name, t in ae.encoder.state_dict().items():
        assert torch.equal(t, ref_sd[name].half().float())
    x = torch.rand(2, 3, 16, 24)
    with torch.no_grad():
        z = ae.encode(x)
        y = ae.decode(z)
        assert torch.equal(ae.encode(x), z)  # deterministic
    assert z.shape == (2, channels, 2, 3)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    assert ae.encode(x[0]).shape == (channels, 2, 3)  # unbatched input
    with pytest.raises(ValueError, match="multiple of 8"):
        ae.encode(torch.rand(1, 3, 12, 16))


def test_encoder_decoder_trainable_separately(tmp_path):
    torch.manual_seed(0)
    _save_fake(tmp_path, "taesd", TinyAutoencoder("taesd"))
    ae = build_autoencoder("taesd", tmp_path)
    ae.encoder.requires_grad_(True)
    loss = ae.decode(ae.encode(torch.rand(1, 3, 16, 16)), clamp=False).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in ae.encoder.parameters())
    assert all(p.grad is None for p in ae.decoder.parameters())


# ---------------------------------------------------------------------------------------
# weight errors: one line, naming the kind and the file
# ---------------------------------------------------------------------------------------
def _expect_one_line(kind: str, path: Path, folder: Path, match: str) -> None:
    with pytest.raises(WeightsError) as info:
        build_autoencoder(kind, folder)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{kind}: {path}: "), msg
    assert match in msg, msg
    assert isinstance(info.value, ValueError)


def test_missing_weights(tmp_path):
    torch.manual_seed(0)
    _save_fake(tmp_path, "taef2", TinyAutoencoder("taef2", encoder_mid=[11, 12, 13], decoder_mid=[3, 4, 5]))
    (tmp_path / "taef2_decoder.pth").unlink()
    _expect_one_line("taef2", tmp_path / "taef2_decoder.pth", tmp_path, "file not found")
    _expect_one_line("taef2", tmp_path / "nowhere", tmp_path / "nowhere", "folder not found")


def test_truncated_and_garbage_weights(tmp_path):
    torch.manual_seed(0)
    _save_fake(tmp_path, "taef2", TinyAutoencoder("taef2"))
    enc = tmp_path / "taef2_encoder.pth"
    data = enc.read_bytes()
    enc.write_bytes(data[: len(data) // 2])
    _expect_one_line("taef2", enc, tmp_path, "cannot be read")
    enc.write_bytes(b"definitely not a checkpoint")
    _expect_one_line("taef2", enc, tmp_path, "cannot be read")
    torch.save([1, 2, 3], enc)
    _expect_one_line("taef2", enc, tmp_path, "state dict")


def test_wrong_shaped_weights(tmp_path):
    torch.manual_seed(0)
    # a taef1 checkpoint (16 latent channels) under taef2 names
    _save_fake(tmp_path, "taef2", TinyAutoencoder("taef1"))
    _expect_one_line("taef2", tmp_path / "taef2_encoder.pth", tmp_path, "has 16 latent channels")

    _save_fake(tmp_path, "taef2", TinyAutoencoder("taef2", encoder_mid=[11]))
    dec = tmp_path / "taef2_decoder.pth"
    sd = torch.load(dec, weights_only=True)
    sd["8.conv.2.weight"] = torch.zeros(64, 64, 1, 1, dtype=torch.float16)
    torch.save(sd, dec)
    _expect_one_line("taef2", dec, tmp_path, "wrong shapes: 8.conv.2.weight (64, 64, 1, 1)")

    enc = tmp_path / "taef2_encoder.pth"
    sd = torch.load(enc, weights_only=True)
    del sd["11.pool.1.weight"], sd["3.conv.0.bias"]
    torch.save(sd, enc)
    _expect_one_line("taef2", enc, tmp_path, "missing keys")


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown autoencoder kind"):
        build_autoencoder("sdxl", "/nowhere")


# ---------------------------------------------------------------------------------------
# diffusers backends, from tiny randomly initialised models saved locally (no download)
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diffusers_dirs(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("diffusers")
    torch.manual_seed(0)
    kl_args = dict(
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
    )
    diffusers.AutoencoderKL(**kl_args, scaling_factor=0.18215).save_pretrained(root / "kl")
    diffusers.AutoencoderKL(**kl_args, scaling_factor=0.5, shift_factor=0.1).save_pretrained(root / "kl_shift")
    diffusers.AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    ).save_pretrained(root / "tiny")
    return root


@pytest.mark.parametrize("name,scale,shift", [("kl", 0.18215, 0.0), ("kl_shift", 0.5, 0.1)])
def test_diffusers_kl(diffusers_dirs, name, scale, shift):
    ae = build_autoencoder("diffusers-kl", diffusers_dirs / name)
    raw = ae.model  # the wrapped diffusers.AutoencoderKL
    assert type(raw).__name__ == "AutoencoderKL"
    assert ae.latent_channels == 4 and ae.downscale == 8
    assert ae.scaling_factor == pytest.approx(scale) and ae.shift_factor == pytest.approx(shift)
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 40)
    with torch.no_grad():
        z = ae.encode(x)
        dist = raw.encode(x * 2 - 1).latent_dist
        assert z.shape == (2, 4, 4, 5)
        torch.testing.assert_close(z, (dist.mean - shift) * scale)
        assert torch.equal(ae.encode(x), z)  # posterior mean: deterministic
        mean, logvar = ae.encode_distribution(x)
        torch.testing.assert_close(mean, z)
        torch.testing.assert_close(logvar, dist.logvar + 2 * np.log(scale))
        raw_mean, raw_logvar = ae.raw_posterior(x)
        torch.testing.assert_close(raw_mean, dist.mean)
        y = ae.decode(z)
        ref = ((raw.decode(dist.mean).sample + 1) / 2).clamp(0, 1)
        torch.testing.assert_close(y, ref)
    assert y.shape == x.shape
    # encoder/decoder parts cover the whole model, without overlap
    n_enc = sum(p.numel() for p in ae.encoder.parameters())
    n_dec = sum(p.numel() for p in ae.decoder.parameters())
    assert n_enc + n_dec == sum(p.numel() for p in ae.parameters())


def test_diffusers_tiny(diffusers_dirs):
    ae = build_autoencoder("diffusers-tiny", diffusers_dirs / "tiny")
    raw = ae.model
    assert type(raw).__name__ == "AutoencoderTiny"
    assert ae.latent_channels == 4 and ae.downscale == 8 and ae.scaling_factor == 1.0
    x = torch.rand(1, 3, 24, 16)
    with torch.no_grad():
        z = ae.encode(x)
        torch.testing.assert_close(z, raw.encode(x * 2 - 1).latents)
        y = ae.decode(z)
        torch.testing.assert_close(y, ((raw.decode(z).sample + 1) / 2).clamp(0, 1))
    assert z.shape == (1, 4, 3, 2) and y.shape == x.shape
    assert ae.encode_distribution(x)[1] is None


def test_diffusers_missing(tmp_path):
    pytest.importorskip("diffusers")
    _expect_one_line("diffusers-kl", tmp_path / "nope", tmp_path / "nope", "folder not found")
    _expect_one_line("diffusers-tiny", tmp_path, tmp_path, "config.json")
