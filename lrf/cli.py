"""Shared command-line plumbing: logging, and one line per bad input instead of a traceback."""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable


class InputError(RuntimeError):
    """Any bad input whose message already names the scene, the file and the reason."""


def setup_logging() -> None:
    level = os.environ.get("LRF_LOG", "INFO").upper()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)


def expected_errors() -> tuple[type[BaseException], ...]:
    from lrf.scene.model import SceneError

    errs: list[type[BaseException]] = [SceneError, InputError]
    # A WeightsError can only have been raised if its module was imported: look it up instead of
    # importing lrf.vae (and with it torch, seconds) on every failing prepare/sfm step.
    vae_base = sys.modules.get("lrf.vae.base")
    if vae_base is not None and hasattr(vae_base, "WeightsError"):
        errs.append(vae_base.WeightsError)
    return tuple(errs)


def run_main(fn: Callable[[], str | None]) -> int:
    """Run a step; print its one-line summary, or one line naming what was wrong (exit 1)."""
    setup_logging()
    try:
        summary = fn()
    except expected_errors() as e:
        print(f"ERROR {e}", file=sys.stderr)
        return 1
    if summary:
        print(summary, file=sys.stderr)
    return 0
