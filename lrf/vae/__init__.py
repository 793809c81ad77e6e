"""Autoencoders behind one interface: images in [0, 1] <-> 8x-downscaled latents.

Backends: the TAESD family written here (taesd / taef1 / taef2) and diffusers'
AutoencoderKL / AutoencoderTiny (imported lazily); `factory` builds one from a spec.
"""

from lrf.errors import WeightsError
from lrf.vae.base import KINDS, Autoencoder
from lrf.vae.factory import build_autoencoder, load_vae

__all__ = ["Autoencoder", "WeightsError", "build_autoencoder", "load_vae", "KINDS"]
