"""diffusers backends: ``AutoencoderKL`` (e.g. the Stable Diffusion VAE) and ``AutoencoderTiny``.

diffusers models take and return images in [-1, 1]; the wrapper maps from/to [0, 1] and
returns latents in the space a diffusion model sees, ``(z - shift_factor) * scaling_factor``,
so all backends hand the radiance field comparably normalised latents.  For KL models the
latent is the posterior mean (deterministic); :meth:`encode_distribution` exposes the
posterior for the stage-1 KL term.  diffusers is imported lazily (it is slow to import).
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import Tensor, nn

from lrf.errors import WeightsError, describe_error
from lrf.vae.base import DIFFUSERS_KINDS, Autoencoder


def _model_class(kind: str):
    import diffusers

    if kind == "diffusers-kl":
        return diffusers.AutoencoderKL
    if kind == "diffusers-tiny":
        return diffusers.AutoencoderTiny
    raise ValueError(f"unknown diffusers kind {kind!r}; expected one of {DIFFUSERS_KINDS}")


class DiffusersAutoencoder(Autoencoder):
    """Wraps a diffusers ``AutoencoderKL`` or ``AutoencoderTiny`` instance."""

    def __init__(self, kind: str, model: nn.Module):
        super().__init__()
        _model_class(kind)  # validates kind
        self.kind = kind
        self.model = model
        cfg = model.config
        self.latent_channels = int(cfg.latent_channels)
        self.scaling_factor = float(getattr(cfg, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        if kind == "diffusers-kl":
            self.downscale = 2 ** (len(cfg.block_out_channels) - 1)
        else:
            self.downscale = int(cfg.upsampling_scaling_factor) ** (len(cfg.num_encoder_blocks) - 1)

    @classmethod
    def from_pretrained(cls, kind: str, source: str | Path) -> "DiffusersAutoencoder":
        """``Model.from_pretrained(source)`` with failures reduced to one-line WeightsErrors."""
        model_cls = _model_class(kind)
        src = str(source)
        looks_local = Path(src).is_absolute() or src.startswith((".", "~")) or src.count("/") != 1
        if looks_local and not Path(src).expanduser().exists():
            raise WeightsError(kind, src, "folder not found")
        if Path(src).expanduser().exists():
            src = str(Path(src).expanduser())
        try:
            # low_cpu_mem_usage=False: a VAE is small, and it avoids the `accelerate` nag.
            model = model_cls.from_pretrained(src, low_cpu_mem_usage=False)
        except Exception as exc:  # missing config/weights, offline hub, shape mismatch, ...
            raise WeightsError(
                kind, src, f"cannot load {model_cls.__name__} ({describe_error(exc)})"
            ) from None
        return cls(kind, model.float())

    # Only the parts each stage trains.  Properties (not submodules) so the parameters are
    # registered once, under ``model``.
    @property
    def encoder(self) -> nn.Module:  # type: ignore[override]
        parts = [self.model.encoder]
        if getattr(self.model, "quant_conv", None) is not None:
            parts.append(self.model.quant_conv)
        return parts[0] if len(parts) == 1 else nn.ModuleList(parts)

    @property
    def decoder(self) -> nn.Module:  # type: ignore[override]
        parts = []
        if getattr(self.model, "post_quant_conv", None) is not None:
            parts.append(self.model.post_quant_conv)
        parts.append(self.model.decoder)
        return parts[0] if len(parts) == 1 else nn.ModuleList(parts)

    # --- latent space conversion ----------------------------------------------------------
    def _to_latent(self, z: Tensor) -> Tensor:
        return (z - self.shift_factor) * self.scaling_factor

    def _from_latent(self, z: Tensor) -> Tensor:
        return z / self.scaling_factor + self.shift_factor

    def _posterior(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        x = images.to(device=self.device, dtype=self.dtype) * 2 - 1
        if self.kind == "diffusers-kl":
            dist = self.model.encode(x).latent_dist
            return dist.mean, dist.logvar
        return self.model.encode(x).latents, None

    def raw_posterior(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Unscaled (mean, logvar) straight from the model; logvar is None for the tiny AE."""
        images4, squeeze = self._check_images(images)
        mean, logvar = self._posterior(images4)
        if squeeze:
            return mean[0], None if logvar is None else logvar[0]
        return mean, logvar

    def encode_distribution(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Posterior (mean, logvar) in the scaled space :meth:`encode` returns.

        Scaling by s shifts logvar by 2*log|s|, so a KL against N(0, I) is taken in the
        unit-variance space the field is trained in.  Use :meth:`raw_posterior` for the
        model's own space.
        """
        mean, logvar = self.raw_posterior(images)
        if logvar is not None:
            logvar = logvar + 2 * math.log(abs(self.scaling_factor))
        return self._to_latent(mean), logvar

    def _encode(self, images: Tensor) -> Tensor:
        return self._to_latent(self._posterior(images)[0])

    def _decode(self, latents: Tensor) -> Tensor:
        x = self.model.decode(self._from_latent(latents)).sample
        return (x + 1) / 2
