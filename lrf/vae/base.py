"""Backend-independent autoencoder interface.

Every stage of the pipeline talks to the VAE through :class:`Autoencoder`: images are
always ``[B, 3, H, W]`` in ``[0, 1]`` and latents are whatever space the backend's
diffusion-facing latents live in (already scaled, so a model trained on them needs no
further normalisation).  Backends differ only in how they map to and from that space.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


TAESD_KINDS = ("taesd", "taef1", "taef2")
DIFFUSERS_KINDS = ("diffusers-kl", "diffusers-tiny")
KINDS = TAESD_KINDS + DIFFUSERS_KINDS


class Autoencoder(nn.Module):
    """Image <-> latent autoencoder with a fixed 8x (by default) spatial downscale.

    Subclasses set ``latent_channels``, ``downscale`` and expose ``encoder`` / ``decoder``
    modules (so stage 1 can fine-tune only the encoder and stage 3 only the decoder) and
    implement :meth:`_encode` / :meth:`_decode`.
    """

    kind: str = "abstract"
    latent_channels: int
    downscale: int = 8
    encoder: nn.Module
    decoder: nn.Module

    # --- to implement -------------------------------------------------------------------
    def _encode(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def _decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError

    # --- public API ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def encode(self, images: Tensor) -> Tensor:
        """[B,3,H,W] images in [0,1] (H, W multiples of ``downscale``) -> [B,C,H/8,W/8]."""
        images, squeeze = self._check_images(images)
        z = self._encode(images.to(device=self.device, dtype=self.dtype))
        return z[0] if squeeze else z

    def decode(self, latents: Tensor, clamp: bool = True) -> Tensor:
        """[B,C,h,w] latents -> [B,3,h*8,w*8] images, clamped to [0,1] unless ``clamp=False``.

        ``clamp=False`` keeps gradients alive for out-of-range pixels (decoder fine-tuning).
        """
        latents, squeeze = self._check_latents(latents)
        x = self._decode(latents.to(device=self.device, dtype=self.dtype))
        if clamp:
            x = x.clamp(0.0, 1.0)
        return x[0] if squeeze else x

    def encode_distribution(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """(mean, logvar) of the posterior in the space :meth:`encode` returns.

        Deterministic encoders have no posterior: they return ``(latent, None)``, so callers
        simply skip the KL term.
        """
        return self.encode(images), None

    def forward(self, images: Tensor) -> Tensor:
        """Round trip, mostly for quick reconstruction checks."""
        return self.decode(self.encode(images))

    # --- helpers ------------------------------------------------------------------------
    def _check_images(self, images: Tensor) -> tuple[Tensor, bool]:
        squeeze = images.dim() == 3
        if squeeze:
            images = images.unsqueeze(0)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.kind}: expected images [B,3,H,W], got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.downscale or w % self.downscale:
            raise ValueError(
                f"{self.kind}: image size {h}x{w} is not a multiple of {self.downscale}"
            )
        return images, squeeze

    def _check_latents(self, latents: Tensor) -> tuple[Tensor, bool]:
        squeeze = latents.dim() == 3
        if squeeze:
            latents = latents.unsqueeze(0)
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"{self.kind}: expected latents [B,{self.latent_channels},h,w], "
                f"got {tuple(latents.shape)}"
            )
        return latents, squeeze
