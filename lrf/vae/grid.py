"""Where latent cells sit in a photo: the 1/8 grid that encoders, fields and decoders share.

Pixel (row i, col j) is centred at (j + 0.5, i + 0.5) and latent cell u covers pixels
[8u, 8u + 8), so its centre is pixel 8u + 4. A photo trimmed at its bottom/right to multiples of
8 keeps every pixel coordinate; a latent crop at cell (top, left) covers the photo crop at
pixel (8 top, 8 left).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lrf.settings import DOWNSCALE


def image_tensor(scene, i: int) -> torch.Tensor:
    """View i as [3, H, W] float32 in [0, 1]."""
    return torch.from_numpy(scene.load_image(i)).permute(2, 0, 1).contiguous()


def trim8(x: torch.Tensor) -> torch.Tensor:
    """Top-left crop to multiples of 8: pixel coordinates stay valid (corner origin)."""
    h, w = x.shape[-2:]
    return x[..., : h - h % DOWNSCALE, : w - w % DOWNSCALE]


def sample_latents(z: torch.Tensor, xy: torch.Tensor, downscale: int = DOWNSCALE) -> torch.Tensor:
    """Bilinear latents [M, C] of the grid z [C, h, w] at continuous pixel coords xy [M, 2] of the
    image (or crop) it encodes, which is (h*8) x (w*8) pixels. grid_sample with
    align_corners=False and normalised coordinate 2*x/W - 1 puts latent cell u's centre at
    pixel 8u + 4, i.e. latent coordinate x/8 - 0.5, the same corner-origin convention as the
    scene's pixels; border padding keeps samples near the edge finite."""
    c, h, w = z.shape
    size = torch.tensor([w * downscale, h * downscale], dtype=torch.float64)
    g = 2.0 * xy.to(torch.float64) / size - 1.0
    # float64 so that a cell centre hits its cell exactly (float32 leaves ~1e-5 of the neighbour
    # on grids whose size is not a power of two); gradients flow back to z's dtype.
    s = F.grid_sample(z[None].double(), g[None, None], mode="bilinear", padding_mode="border",
                      align_corners=False)
    return s[0, :, 0].T.to(z.dtype)


def latent_crop(rng: np.random.Generator, h: int, w: int, cells: int) -> tuple[int, int, int, int]:
    """(top, left, ch, cw) of a random crop of `cells` latent cells (clipped to the grid)."""
    ch, cw = min(cells, h), min(cells, w)
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    return top, left, ch, cw
