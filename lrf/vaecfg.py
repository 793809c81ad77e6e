"""Which autoencoder a run uses: a small spec (kind, source, optional fine-tuned parts).

`source` may contain `{weights}`, filled from the configured weights folder, so configs stay
portable between a laptop with `../shared` and a cluster with its own weights store.
"""
from __future__ import annotations

import json
from pathlib import Path


def resolve_source(source: str, weights_dir: str | Path) -> str:
    return source.replace("{weights}", str(weights_dir))


def load_vae(spec: dict, weights_dir: str | Path, device: str = "cpu"):
    """Build the autoencoder; swap in fine-tuned encoder/decoder weights (safetensors) if given."""
    from lrf.vae import WeightsError, build_autoencoder

    if str(device).startswith("cuda"):  # a GPU step without a GPU: one line, not a traceback or a CPU run
        from lrf.gpu import select

        select("cpu", str(device), who=f"vae {spec['kind']}", renders=False)
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


def parse(text: str) -> dict:
    return json.loads(text)
