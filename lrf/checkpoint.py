"""Checkpoints that a killed run can resume from exactly, and that are never half-trusted.

One safetensors file holds the tensors (weights, optimizer moments, RNG states) with the
rest as JSON metadata; its SHA-256 is written beside it. Both writes are atomic; a kill
between them leaves a hash that no longer matches, which `load_checkpoint` treats as corrupt
(the run restarts rather than guess). A checkpoint written with other settings or data (its
`fingerprint`) is ignored too. Used by field fitting and by both fine-tuning stages.

Beside them: the content hashes that pin what a checkpoint was made from, and the float32
safetensors a trainer ships its tuned module as.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Iterable

import torch

from lrf.io import atomic_write_bytes, atomic_write_json

CKPT_NAME, CKPT_META, CKPT_VERSION = "ckpt.safetensors", "ckpt.json", 1


def safetensors_header(raw: bytes) -> dict:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n].decode("utf-8"))


def save_checkpoint(out_dir: str | Path, tensors: dict[str, torch.Tensor], meta: dict, side: dict | None = None) -> None:
    """Write ckpt.safetensors (tensors + `meta` as JSON metadata), then ckpt.json with its hash."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    meta = dict(meta, version=CKPT_VERSION)
    raw = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
               metadata={"lrf": json.dumps(meta)})
    atomic_write_bytes(out_dir / CKPT_NAME, raw)
    atomic_write_json(out_dir / CKPT_META, {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw),
                                            "step": meta.get("step"), "version": CKPT_VERSION, **(side or {})})


def load_checkpoint(out_dir: str | Path, fingerprint: dict) -> tuple[dict, dict] | None:
    """(tensors, meta) of a valid checkpoint written with the same settings, else None + a warning."""
    from safetensors.torch import load

    out_dir = Path(out_dir)
    path, side_path = out_dir / CKPT_NAME, out_dir / CKPT_META
    if not path.exists():
        return None

    def bad(why: str):
        warnings.warn(f"{path}: ignoring checkpoint ({why}); starting fresh", RuntimeWarning, stacklevel=3)
        return None

    try:
        side = json.loads(side_path.read_text())
    except (OSError, ValueError) as e:
        return bad(f"{side_path.name} unreadable: {type(e).__name__}")
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != side.get("sha256"):
        return bad(f"SHA-256 does not match {side_path.name} (truncated or corrupt)")
    try:
        tensors = load(raw)
        meta = json.loads(safetensors_header(raw)["__metadata__"]["lrf"])
    except Exception as e:  # noqa: BLE001 - any parse failure means an unusable file
        return bad(f"cannot parse: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
    if meta.get("version") != CKPT_VERSION:
        return bad(f"version {meta.get('version')} != {CKPT_VERSION}")
    fp = json.loads(json.dumps(fingerprint))  # the form it has after the JSON round trip
    if meta.get("fingerprint") != fp:
        old = meta.get("fingerprint") or {}
        diff = sorted(k for k in set(fp) | set(old) if fp.get(k) != old.get(k))
        return bad(f"written with different settings or data ({', '.join(diff)})")
    return tensors, meta


def remove_checkpoint(out_dir: str | Path) -> None:
    for name in (CKPT_NAME, CKPT_META):
        (Path(out_dir) / name).unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensors_sha256(tensors: Iterable[torch.Tensor]) -> str:
    """Hash of tensor contents: pins the exact data/weights a checkpoint was made from."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return h.hexdigest()


def save_module(path: str | Path, module: torch.nn.Module, meta: dict | None = None) -> None:
    """A module's state_dict as float32 safetensors (what lrf.vae.factory.load_vae swaps in)."""
    from safetensors.torch import save

    sd = {k: v.detach().cpu().float().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
          for k, v in module.state_dict().items()}
    atomic_write_bytes(path, save(sd, metadata={"lrf": json.dumps(meta or {})}))
