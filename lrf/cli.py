"""Shared command-line plumbing: the flags every step shares, the one start-up every step runs
(threads, JSON settings, device and rasteriser), logging, and one line per bad input instead of
a traceback."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from lrf.errors import EXPECTED, InputError  # noqa: F401 - InputError re-exported

if TYPE_CHECKING:  # torch loads lazily: `--help` and the error lines stay fast
    import torch


def setup_logging() -> None:
    level = os.environ.get("LRF_LOG", "INFO").upper()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)


def run_main(fn: Callable[[], str | None]) -> int:
    """Run a step; print its one-line summary, or one line naming what was wrong (exit 1)."""
    setup_logging()
    try:
        summary = fn()
    except EXPECTED as e:
        print(f"ERROR {e}", file=sys.stderr)
        return 1
    if summary:
        print(summary, file=sys.stderr)
    return 0


def step_parser(doc: str, *, scene: bool = True, vae: str | None = None, cfg: str | None = None,
                renders: bool = False, threads: int = 1) -> argparse.ArgumentParser:
    """The flags steps share, each defined once here.

    scene: a single `--scene scene.json` (the stages take several and add their own);
    vae: None (no VAE), "required" or "optional" (`--vae` JSON spec and `--weights-dir`);
    cfg: the settings class that `--cfg` JSON overrides (with `--seed`), named in the help;
    renders: the step renders fields, so it takes `--backend`.
    `--device` and `--backend` default to the --cfg value, else `auto` (lrf.device, lrf.render)."""
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    if scene:
        ap.add_argument("--scene", required=True, type=Path, help="prepared scene.json")
    if vae:
        ap.add_argument("--vae", required=vae == "required", default=None,
                        help="JSON spec: kind, source[, encoder, decoder] ('{weights}' = --weights-dir)")
        ap.add_argument("--weights-dir", required=vae == "required", type=Path, default=None)
    if cfg:
        ap.add_argument("--cfg", default="{}", help=f"JSON overrides of {cfg}")
        ap.add_argument("--seed", type=int, default=None, help="overrides the --cfg seed")
    ap.add_argument("--device", default=None, help="auto | cpu | cuda[:N] (cuda: a GPU job that fails without one)")
    if renders:
        ap.add_argument("--backend", default=None, help="rasteriser: auto (gsplat on CUDA, ours on the CPU) | cpu | "
                                                        "gsplat | reference")
    ap.add_argument("--threads", type=int, default=threads,
                    help="torch threads; on a busy 2-core machine 1 is several times faster")
    ap.add_argument("--out", required=True, type=Path)
    return ap


@dataclass
class Step:
    """What a step resolved before any work: where it computes and with what settings."""

    device: torch.device
    backend: str | None     # None for steps that do not render
    spec: dict | None       # --vae
    overrides: dict         # --cfg with --seed folded in

    def config(self, cls, **fixed):
        """`cls` built from the overrides (checked: one-line errors), with the resolved device and
        backend written into the fields it has, so a trainer never decides them again."""
        names = {f.name for f in fields(cls)}
        over = dict(self.overrides, **fixed)
        for k, v in (("device", str(self.device)), ("backend", self.backend)):
            if k in names and v is not None:
                over[k] = v
        return cls.from_overrides(over)


def _json(text: str | None, flag: str) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{flag}: not JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise InputError(f"{flag}: expected a JSON object, got {type(value).__name__}")
    return value


def start_step(args, who: str = "", renders: bool = False) -> Step:
    """Threads, --vae/--cfg/--seed, the device (lrf.device) and the rasteriser (lrf.render), once.

    `who` (a scene key, or the stage) starts any error line."""
    import torch

    from lrf.device import resolve_device
    from lrf.render import resolve_backend

    torch.set_num_threads(args.threads)
    spec = _json(getattr(args, "vae", None), "--vae")
    over = _json(getattr(args, "cfg", None), "--cfg") or {}
    if getattr(args, "seed", None) is not None:
        over["seed"] = args.seed
    dev = resolve_device(args.device or over.get("device") or "auto", who, renders)
    backend = None
    if renders:
        backend = resolve_backend(getattr(args, "backend", None) or over.get("backend") or "auto", dev, who)
    return Step(dev, backend, spec, over)
