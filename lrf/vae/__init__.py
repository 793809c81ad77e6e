"""Autoencoders behind one interface: images in [0, 1] <-> 8x-downscaled latents.

Backends: the TAESD family written here (taesd / taef1 / taef2) and diffusers'
AutoencoderKL / AutoencoderTiny (imported lazily).
"""

from .base import KINDS, Autoencoder, WeightsError, build_autoencoder

__all__ = ["Autoencoder", "WeightsError", "build_autoencoder", "KINDS"]
