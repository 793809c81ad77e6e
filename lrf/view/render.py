"""Rendering for the viewer: camera conversions, live frames (fast decode), exact frames (scored).

Two decode paths share one set of weights:
- live frames decode with a bfloat16, channels-last copy of the decoder where the CPU has native
  bf16 (oneDNN; AMX/AVX512-BF16): about 4x faster than float32 and within ~50 dB PSNR of it;
- exact frames (a held-out view and its PSNR) follow lrf.evaluate step for step in float32, so
  the number shown is the one the workflow reports for that view.
"""
from __future__ import annotations

import copy
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lrf.field.io import render_at
from lrf.view.sources import MethodSource


# ---------------------------------------------------------------------------- cameras
def w2c_to_pose(w2c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV world-to-camera -> (wxyz of the camera-to-world rotation, camera centre); viser's
    cameras use the same axes (x right, y down, z forward)."""
    import viser.transforms as vtf

    c2w = np.linalg.inv(np.asarray(w2c, dtype=np.float64))
    return vtf.SO3.from_matrix(c2w[:3, :3]).wxyz, c2w[:3, 3]


def pose_to_w2c(wxyz, position) -> np.ndarray:
    import viser.transforms as vtf

    c2w = np.eye(4)
    c2w[:3, :3] = vtf.SO3(np.asarray(wxyz, dtype=np.float64)).as_matrix()
    c2w[:3, 3] = np.asarray(position, dtype=np.float64)
    return np.linalg.inv(c2w)


def vertical_fov(K: np.ndarray, height: int) -> float:
    return 2.0 * math.atan(0.5 * height / float(K[1, 1]))


def view_size(aspect: float, max_px: int, multiple: int = 8) -> tuple[int, int]:
    """(width, height) with the longer side ~max_px, both multiples of `multiple` (latent grid)."""
    aspect = max(min(float(aspect), 8.0), 1.0 / 8.0)
    w, h = (max_px, max_px / aspect) if aspect >= 1 else (max_px * aspect, max_px)
    return (max(multiple, int(round(w / multiple)) * multiple), max(multiple, int(round(h / multiple)) * multiple))


def intrinsics(fov_y: float, width: int, height: int) -> np.ndarray:
    f = 0.5 * height / math.tan(0.5 * fov_y)
    return np.array([[f, 0.0, 0.5 * width], [0.0, f, 0.5 * height], [0.0, 0.0, 1.0]])


# ---------------------------------------------------------------------------- renderer
def bf16_fast() -> bool:
    """Native bf16 convolutions (oneDNN on AMX / AVX512-BF16); elsewhere bf16 is emulated: slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001
        return False


@dataclass
class Timing:
    render_ms: float = 0.0
    decode_ms: float = 0.0


class Renderer:
    """Loads fields and decoders on first use (thread-safe) and renders frames of a method."""

    def __init__(self, vae_spec: dict, weights_dir: str | Path, precision: str = "auto"):
        self.vae_spec = dict(vae_spec)
        self.weights_dir = weights_dir
        self.precision = ("bf16" if bf16_fast() else "fp32") if precision == "auto" else precision
        self._lock = threading.Lock()
        self._fields: dict[Path, tuple] = {}
        self._vaes: dict[Path | None, tuple] = {}

    # -- loading
    def vae(self, decoder: Path | None = None):
        """(vae with this decoder, its copy for live frames) - decoder None: the spec's own."""
        key = None if decoder is None else Path(decoder)
        with self._lock:
            if key not in self._vaes:
                from lrf.vae.factory import load_vae

                spec = dict(self.vae_spec)
                if key is not None:
                    spec["decoder"] = str(key)
                vae = load_vae(spec, self.weights_dir)
                # a copy for live frames: channels-last (oneDNN's faster convolution layout, ~20% on
                # TAEF2 in float32 too), in bf16 where chosen
                fast = copy.deepcopy(vae).to(memory_format=torch.channels_last)
                if self.precision == "bf16":
                    fast = fast.to(torch.bfloat16)
                self._vaes[key] = (vae, fast)
            return self._vaes[key]

    def field(self, path: Path):
        """(GaussianField, background it was fitted with)."""
        path = Path(path)
        with self._lock:
            if path not in self._fields:
                from lrf.field import field_background, load_field

                f = load_field(path)
                f.requires_grad_(False)
                self._fields[path] = (f, field_background(path, f.channels))
            return self._fields[path]

    def warm(self, m: MethodSource) -> None:
        self.field(m.field)
        if m.kind == "latent":
            self.vae(m.decoder)

    # -- frames
    @torch.no_grad()
    def live(self, m: MethodSource, w2c: np.ndarray, K: np.ndarray, width: int, height: int,
             x0: int = 0, x1: int | None = None, timing: Timing | None = None) -> np.ndarray:
        """Columns [x0, x1) of a width x height view, as float32 [H, x1-x0, 3] in [0, 1].

        Latent methods: width, height, x0, x1 are multiples of 8; the field renders the 1/8 grid
        and the decoder (fast path) makes the pixels."""
        x1 = width if x1 is None else x1
        field, bg = self.field(m.field)
        Kc = np.array(K, dtype=np.float64)
        Kc[0, 2] -= x0
        t0 = time.perf_counter()
        if m.kind == "latent":
            vae, fast = self.vae(m.decoder)
            s = vae.downscale
            Kc[:2] /= s
            out = field.render(w2c, Kc, (x1 - x0) // s, height // s, bg, "auto")
            z = out.image.permute(2, 0, 1)[None]
            t1 = time.perf_counter()
            img = fast.decode(z.contiguous(memory_format=torch.channels_last)).float()[0].permute(1, 2, 0)
        else:
            out = field.render(w2c, Kc, x1 - x0, height, bg, "auto")
            t1 = time.perf_counter()
            img = out.image
        t2 = time.perf_counter()
        if timing is not None:
            timing.render_ms += (t1 - t0) * 1e3
            timing.decode_ms += (t2 - t1) * 1e3
        return img.clamp(0, 1).float().contiguous().numpy()

    @torch.no_grad()
    def exact(self, m: MethodSource, cam) -> np.ndarray:
        """One scene camera rendered and decoded as lrf.evaluate does (float32): [H, W, 3] in [0, 1]."""
        field, bg = self.field(m.field)
        if m.kind == "latent":
            vae, _ = self.vae(m.decoder)
            out = render_at(field, cam, vae.downscale, bg, "auto")
            pred = vae.decode(out.image.permute(2, 0, 1)[None])
        else:
            k = m.rgb_downscale()
            out = render_at(field, cam, k, bg, "auto")
            pred = out.image.permute(2, 0, 1)[None].clamp(0, 1)
            if k != 1:
                pred = torch.nn.functional.interpolate(pred, size=(cam.height, cam.width), mode="bilinear",
                                                       align_corners=False)
        return pred.clamp(0, 1).float()[0].permute(1, 2, 0).contiguous().numpy()


def to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def compose(renderer: Renderer, left: MethodSource, right: MethodSource | None, w2c: np.ndarray, fov_y: float,
            aspect: float, max_px: int, split: float = 0.5, timing: Timing | None = None) -> np.ndarray:
    """One viewer frame (uint8 [H, W, 3]): `left` alone, or `left` | `right` split at `split`
    of the width with a thin divider. Each side renders only its own columns."""
    width, height = view_size(aspect, max_px)
    K = intrinsics(fov_y, width, height)
    if right is None:
        return to_uint8(renderer.live(left, w2c, K, width, height, timing=timing))
    cut = min(max(int(round(split * width / 8)) * 8, 8), width - 8)
    a = renderer.live(left, w2c, K, width, height, 0, cut, timing)
    b = renderer.live(right, w2c, K, width, height, cut, width, timing)
    img = to_uint8(np.concatenate([a, b], 1))
    img[:, max(cut - 1, 0):cut + 1] = 255
    return img
