"""The VAE factory: which autoencoder a run uses, from a small spec (kind, source, optional
fine-tuned parts), built by its backend.

`source` may contain `{weights}`, filled from the configured weights folder, so configs stay
portable between a laptop with `../shared` and a cluster with its own weights store.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lrf.device import resolve_device
from lrf.errors import WeightsError
from lrf.vae.base import DIFFUSERS_KINDS, KINDS, TAESD_KINDS, Autoencoder
from lrf.vae.diffusers_backend import DiffusersAutoencoder
from lrf.vae.taesd import TinyAutoencoder


def build_autoencoder(
    kind: str,
    source: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Autoencoder:
    """Build a pretrained autoencoder of ``kind`` from ``source``.

    ``source`` is a folder with ``<kind>_encoder.pth``/``<kind>_decoder.pth`` for the TAESD
    family, or a hub id / local folder for ``diffusers.from_pretrained`` otherwise.  The model
    is returned in eval mode with all parameters frozen; stages unfreeze what they train.
    """
    if kind in TAESD_KINDS:
        model: Autoencoder = TinyAutoencoder.from_folder(kind, source)
    elif kind in DIFFUSERS_KINDS:
        model = DiffusersAutoencoder.from_pretrained(kind, source)
    else:
        raise ValueError(f"unknown autoencoder kind {kind!r}; expected one of {', '.join(KINDS)}")
    model = model.to(device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    return model


def resolve_source(source: str, weights_dir: str | Path) -> str:
    return source.replace("{weights}", str(weights_dir))


def load_vae(spec: dict, weights_dir: str | Path, device: str = "cpu"):
    """Build the autoencoder; swap in fine-tuned encoder/decoder weights (safetensors) if given.

    A GPU step without a GPU stops here with one line, not a traceback or a CPU run."""
    device = resolve_device(device, who=f"vae {spec['kind']}")
    vae = build_autoencoder(spec["kind"], resolve_source(spec["source"], weights_dir), device=device)
    for part in ("encoder", "decoder"):
        path = spec.get(part)
        if path:
            from safetensors.torch import load_file

            try:
                sd = load_file(path)
                getattr(vae, part).load_state_dict(sd)
            except Exception as e:  # noqa: BLE001 - any failure is a bad weight file
                raise WeightsError(spec["kind"], path, f"cannot load fine-tuned {part}: {str(e).splitlines()[0][:160]}") from None
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    return vae
