"""The error classes: every expected failure is one of these, with a one-line message naming the
scene or file and the reason, which `lrf.cli.run_main` prints as `ERROR <message>`.

Torch-free and import-free (beyond the standard library), so any step can raise or catch them.
"""
from __future__ import annotations

from pathlib import Path


class InputError(RuntimeError):
    """Any bad input whose message already names the scene, the file and the reason."""


class SceneError(RuntimeError):
    """Bad input for one scene. The message is one line naming the scene, the file and why."""

    def __init__(self, scene: str, path: str | Path | None, reason: str):
        self.scene, self.path, self.reason = scene, path, reason
        where = f"{scene}: {path}: " if path is not None else f"{scene}: "
        super().__init__(where + reason)


class WeightsError(ValueError):
    """A weight file/folder is missing, unreadable or does not fit the architecture.

    The message is always one line, ``"<kind>: <path>: <reason>"``, so that a CLI can print
    it as is instead of a stack of torch internals.
    """

    def __init__(self, kind: str, path: str | Path, reason: str):
        self.kind = kind
        self.path = Path(path)
        self.reason = " ".join(str(reason).split())  # force a single line
        super().__init__(f"{kind}: {path}: {self.reason}")


class GsplatError(InputError):
    """gsplat is required (CUDA tensors, backend auto or gsplat) but cannot be used.

    The message starts with ``gsplat: `` and fits one line; steps prefix the scene, so a run
    prints ``ERROR <dataset>/<scene>: gsplat: <reason>``.
    """


class DownloadError(RuntimeError):
    pass


# The errors a step reports as one line (exit 1) instead of a traceback.
EXPECTED = (SceneError, InputError, WeightsError)


def describe_error(exc: BaseException, limit: int = 160) -> str:
    """Exception type plus its first sentence, short enough for a one-line WeightsError."""
    lines = str(exc).strip().splitlines()
    text = (lines[0] if lines else "").split(". ")[0]
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
