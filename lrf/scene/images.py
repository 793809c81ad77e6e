"""Image reading with one-line errors, resizing and the multiple-of-8 centre crop."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lrf.errors import SceneError
from lrf.io import atomic_path


def read_rgb(path: str | Path, scene: str = "?") -> np.ndarray:
    """float32 [H, W, 3] in [0, 1]; RGBA is composited on white (the NeRF-synthetic habit)."""
    path = Path(path)
    if not path.exists():
        raise SceneError(scene, path, "image file is missing")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
                return rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:])
            return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SceneError(scene, path, f"cannot decode image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'})") from None


def image_size(path: str | Path, scene: str = "?") -> tuple[int, int]:
    """(width, height) from the header, with the same one-line error as read_rgb."""
    path = Path(path)
    if not path.exists():
        raise SceneError(scene, path, "image file is missing")
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SceneError(scene, path, f"cannot decode image ({type(e).__name__})") from None


def working_size(width: int, height: int, max_side: int | None = None, downscale: float | None = None,
                 multiple: int = 8) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Resized size and the centre crop (left, top, w, h) that makes both sides multiples of 8.

    Resizing keeps the aspect ratio; cropping rather than padding keeps every pixel real.
    """
    s = 1.0
    if downscale:
        s = 1.0 / float(downscale)
    if max_side:
        s = min(s, max_side / max(width, height))
    rw, rh = max(multiple, int(round(width * s))), max(multiple, int(round(height * s)))
    cw, ch = rw - rw % multiple, rh - rh % multiple
    return (rw, rh), ((rw - cw) // 2, (rh - ch) // 2, cw, ch)


def save_png(path: str | Path, rgb: np.ndarray) -> None:
    arr = np.clip(np.round(np.asarray(rgb) * 255.0), 0, 255).astype(np.uint8)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
