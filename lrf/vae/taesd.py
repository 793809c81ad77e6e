"""TAESD-family tiny autoencoders (taesd / taef1 / taef2), state-dict compatible with the
``<kind>_encoder.pth`` / ``<kind>_decoder.pth`` checkpoints of madebyollin/taesd.

Layout (Sequential indices matter: they are the checkpoint keys):

- encoder: conv(3,64), Block, [stride-2 conv, Block x3] x3, conv(64, C)
- decoder: soft clamp, conv(C,64), ReLU, [Block x3, 2x upsample, conv] x3, Block, conv(64,3)

TAEF2 adds a "mid" branch to the blocks at the lowest resolution (1x1 conv to 4c, GroupNorm,
ReLU, 1x1 conv back); which blocks carry it is read from the checkpoint itself, so the same
code serves taesd/taef1 (plain blocks) and taef2.  Images are in [0, 1] on both ends and the
latents carry no scaling (roughly in [-3, 3]).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from lrf.errors import WeightsError, describe_error
from lrf.vae.base import TAESD_KINDS, Autoencoder

LATENT_CHANNELS = {"taesd": 4, "taef1": 16, "taef2": 32}
WIDTH = 64

# Sequential indices of the residual blocks (where a "mid" branch may live).
ENCODER_BLOCKS = (1, 3, 4, 5, 7, 8, 9, 11, 12, 13)
DECODER_BLOCKS = (3, 4, 5, 8, 9, 10, 13, 14, 15, 18)


def _conv(c_in: int, c_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, **kwargs)


class SoftClamp(nn.Module):
    """tanh(x/3)*3: keeps out-of-range latents (e.g. from a radiance field) bounded."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """conv-ReLU-conv-ReLU-conv + identity, ReLU; optionally preceded by the TAEF2 mid branch
    ``x + pool(x)`` with ``pool`` = 1x1 conv (c->4c) -> GroupNorm(4) -> ReLU -> 1x1 conv (4c->c).
    """

    def __init__(self, channels: int, mid: bool = False):
        super().__init__()
        c = channels
        self.conv = nn.Sequential(_conv(c, c), nn.ReLU(), _conv(c, c), nn.ReLU(), _conv(c, c))
        self.pool = (
            nn.Sequential(
                nn.Conv2d(c, 4 * c, 1, bias=False),
                nn.GroupNorm(4, 4 * c),
                nn.ReLU(),
                nn.Conv2d(4 * c, c, 1, bias=False),
            )
            if mid
            else None
        )
        self.fuse = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + x)


def make_encoder(latent_channels: int, mid_blocks: Iterable[int] = ()) -> nn.Sequential:
    """Build the 8x-downscaling encoder; ``mid_blocks`` are Sequential indices of mid blocks."""
    mid = set(mid_blocks)
    layers: list[nn.Module] = []
    for i in range(15):
        if i == 0:
            layers.append(_conv(3, WIDTH))
        elif i == 14:
            layers.append(_conv(WIDTH, latent_channels))
        elif i in ENCODER_BLOCKS:
            layers.append(Block(WIDTH, mid=i in mid))
        else:  # 2, 6, 10
            layers.append(_conv(WIDTH, WIDTH, stride=2, bias=False))
    return nn.Sequential(*layers)


def make_decoder(latent_channels: int, mid_blocks: Iterable[int] = ()) -> nn.Sequential:
    """Build the 8x-upscaling decoder; ``mid_blocks`` are Sequential indices of mid blocks."""
    mid = set(mid_blocks)
    layers: list[nn.Module] = [SoftClamp(), _conv(latent_channels, WIDTH), nn.ReLU()]
    for i in range(3, 20):
        if i in DECODER_BLOCKS:
            layers.append(Block(WIDTH, mid=i in mid))
        elif i in (6, 11, 16):
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        elif i in (7, 12, 17):
            layers.append(_conv(WIDTH, WIDTH, bias=False))
        else:  # 19
            layers.append(_conv(WIDTH, 3))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------
# checkpoint reading
# --------------------------------------------------------------------------------------
def read_state_dict(kind: str, path: str | Path) -> dict[str, Tensor]:
    """Load a plain (fp16) state dict as float32, turning every failure into one WeightsError."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(kind, path, "file not found")
    if not path.is_file():
        raise WeightsError(kind, path, "not a file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle garbage, ...: all mean "unusable file"
        raise WeightsError(
            kind, path, f"cannot be read as a torch checkpoint ({describe_error(exc)})"
        ) from None
    if not isinstance(sd, Mapping) or not sd:
        raise WeightsError(kind, path, f"expected a non-empty state dict, got {type(sd).__name__}")
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(kind, path, f"entry {bad[0]!r} is not a tensor")
    return {str(k): v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _mid_indices(sd: Mapping[str, Tensor]) -> set[int]:
    out = set()
    for k in sd:
        head, _, rest = k.partition(".")
        if rest.startswith("pool.") and head.isdigit():
            out.add(int(head))
    return out


def load_into(kind: str, path: Path, module: nn.Module, sd: Mapping[str, Tensor]) -> None:
    """Strictly load ``sd`` into ``module``; mismatches become a one-line WeightsError."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("wrong shapes", wrong)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{label}: {', '.join(items[:3])}{more}")
    if problems:
        raise WeightsError(kind, path, f"does not match the {kind} architecture: " + "; ".join(problems))
    module.load_state_dict(sd, strict=True)


def _latent_channels_in(kind: str, path: Path, tensor: Tensor | None, dim: int) -> int:
    expected = LATENT_CHANNELS[kind]
    if tensor is None or tensor.dim() != 4:
        raise WeightsError(kind, path, "does not look like a TAESD-family checkpoint "
                           "(no 4-d latent convolution weight)")
    found = int(tensor.shape[dim])
    if found != expected:
        raise WeightsError(kind, path, f"has {found} latent channels, {kind} expects {expected}")
    return found


class TinyAutoencoder(Autoencoder):
    """TAESD / TAEF1 / TAEF2: [0,1] images in, [0,1] images out, unscaled latents."""

    def __init__(
        self,
        kind: str = "taef2",
        latent_channels: int | None = None,
        encoder_mid: Iterable[int] = (),
        decoder_mid: Iterable[int] = (),
    ):
        super().__init__()
        if kind not in TAESD_KINDS:
            raise ValueError(f"unknown TAESD kind {kind!r}; expected one of {TAESD_KINDS}")
        self.kind = kind
        self.latent_channels = latent_channels or LATENT_CHANNELS[kind]
        self.downscale = 8
        self.encoder = make_encoder(self.latent_channels, encoder_mid)
        self.decoder = make_decoder(self.latent_channels, decoder_mid)

    @classmethod
    def from_folder(cls, kind: str, folder: str | Path) -> "TinyAutoencoder":
        """Load ``<folder>/<kind>_encoder.pth`` and ``<kind>_decoder.pth``."""
        if kind not in TAESD_KINDS:
            raise ValueError(f"unknown TAESD kind {kind!r}; expected one of {TAESD_KINDS}")
        folder = Path(folder)
        if not folder.is_dir():
            raise WeightsError(kind, folder, "weights folder not found")
        enc_path = folder / f"{kind}_encoder.pth"
        dec_path = folder / f"{kind}_decoder.pth"
        # Validate the encoder file completely before touching the decoder file, so the
        # error names the first bad file.
        enc_sd = read_state_dict(kind, enc_path)
        c = _latent_channels_in(kind, enc_path, enc_sd.get("14.weight"), 0)
        encoder = make_encoder(c, _mid_indices(enc_sd))
        load_into(kind, enc_path, encoder, enc_sd)
        dec_sd = read_state_dict(kind, dec_path)
        _latent_channels_in(kind, dec_path, dec_sd.get("1.weight"), 1)
        decoder = make_decoder(c, _mid_indices(dec_sd))
        load_into(kind, dec_path, decoder, dec_sd)
        model = cls(kind, c)
        model.encoder, model.decoder = encoder, decoder
        return model

    def _encode(self, images: Tensor) -> Tensor:
        return self.encoder(images)

    def _decode(self, latents: Tensor) -> Tensor:
        return self.decoder(latents)
