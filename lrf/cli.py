"""Shared command-line plumbing: logging, and one line per bad input instead of a traceback."""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from lrf.errors import EXPECTED, InputError  # noqa: F401 - InputError re-exported


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
