"""What both fine-tuning stages share: config, exact-resume checkpoints, crops, curves, progress.

Exact resumption: a checkpoint holds everything the next step depends on (the trained module's
weights, Adam's moments and step counts, the sampling generator and the global torch / numpy /
python RNG states, the curve so far, and the "before" measurements). All sampling randomness
comes from one numpy Generator whose state is saved; no op used draws from torch's RNG. So with a
fixed seed on the CPU a run killed after a checkpoint and resumed ends bit-identical to an
uninterrupted one. The checkpoint is one safetensors file (no pickle) written atomically, with
its SHA-256 in `ckpt.json` beside it: a truncated or corrupt file is detected and ignored.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lrf.errors import InputError
from lrf.io import atomic_write_bytes, atomic_write_text
from lrf.settings import DOWNSCALE



# ----------------------------------------------------------------------------- config

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
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@contextlib.contextmanager
def deterministic():
    """Deterministic torch algorithms for the block, then restore the caller's setting."""
    was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)


# ----------------------------------------------------------------------------- RNG
def _py_state_to_json(st) -> list:
    return [st[0], list(st[1]), st[2]]


def _py_state_from_json(js) -> tuple:
    return (js[0], tuple(js[1]), js[2])


def _np_legacy_to_json(st) -> list:
    return [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]


def _np_legacy_from_json(js) -> tuple:
    return (js[0], np.asarray(js[1], dtype=np.uint32), js[2], js[3], js[4])


class RNG:
    """Every random source of a run. Sampling uses `self.np` only; the global torch / numpy /
    python states are seeded and saved too, so nothing a library draws can break resumption."""

    def __init__(self, seed: int):
        self.np = np.random.default_rng(int(seed))
        torch.manual_seed(int(seed))
        np.random.seed(int(seed) % 2 ** 32)
        random.seed(int(seed))

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"rng/torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for k, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng/cuda/{k}"] = s
        meta = {"generator": self.np.bit_generator.state, "numpy": _np_legacy_to_json(np.random.get_state()),
                "python": _py_state_to_json(random.getstate())}
        return tensors, meta

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.np.bit_generator.state = meta["generator"]
        torch.set_rng_state(tensors["rng/torch"])
        cuda = sorted(k for k in tensors if k.startswith("rng/cuda/"))
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
        np.random.set_state(_np_legacy_from_json(meta["numpy"]))
        random.setstate(_py_state_from_json(meta["python"]))


# ----------------------------------------------------------------------------- checkpoints
def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state (step, exp_avg, exp_avg_sq) as flat named tensors."""
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if not torch.is_tensor(v):
                v = torch.tensor(v)
            out[f"adam/{idx}/{k}"] = v.detach().cpu().contiguous()
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        if name.startswith("adam/"):
            _, idx, k = name.split("/", 2)
            state.setdefault(int(idx), {})[k] = v.clone()
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


from lrf.checkpoint import (CKPT_META, CKPT_NAME, CKPT_VERSION, load_checkpoint,  # noqa: E402,F401
                            remove_checkpoint, safetensors_header as _header, save_checkpoint)


def save_module(path: str | Path, module: torch.nn.Module, meta: dict | None = None) -> None:
    """A module's state_dict as float32 safetensors (what lrf.vae.factory.load_vae swaps in)."""
    from safetensors.torch import save

    sd = {k: v.detach().cpu().float().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
          for k, v in module.state_dict().items()}
    atomic_write_bytes(path, save(sd, metadata={"lrf": json.dumps(meta or {})}))


# ----------------------------------------------------------------------------- curve + progress
def write_curve(path: str | Path, columns: Sequence[str], rows: Sequence[Sequence[float]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([int(v) if c == "step" else f"{v:.6g}" for c, v in zip(columns, r)])
    atomic_write_text(path, buf.getvalue())


def rows_tensor(rows: Sequence[Sequence[float]], ncol: int) -> torch.Tensor:
    return torch.tensor([list(map(float, r)) for r in rows], dtype=torch.float64).reshape(-1, ncol)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Progress:
    """tqdm on a terminal; otherwise one line every `log_every` steps (logs stay readable)."""

    def __init__(self, desc: str, total: int, initial: int, log_every: int, enabled: bool = True):
        self.desc, self.total, self.log_every, self.enabled = desc, total, max(int(log_every), 1), enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(self, step: int, values: dict[str, float], seconds: float) -> None:
        text = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif self.enabled and (step % self.log_every == 0 or step == self.total):
            say(f"[{self.desc}] step {step}/{self.total} {text} {seconds:.1f}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- images + crops
def image_tensor(scene, i: int) -> torch.Tensor:
    """View i as [3, H, W] float32 in [0, 1]."""
    return torch.from_numpy(scene.load_image(i)).permute(2, 0, 1).contiguous()


def trim8(x: torch.Tensor) -> torch.Tensor:
    """Top-left crop to multiples of 8: pixel coordinates stay valid (corner origin)."""
    h, w = x.shape[-2:]
    return x[..., : h - h % DOWNSCALE, : w - w % DOWNSCALE]


def crop_origin(rng: np.random.Generator, x: float, size: int, length: int, margin: float) -> int:
    """Random integer origin o of a crop [o, o+size) inside [0, length) such that the continuous
    coordinate x lies in [o + margin, o + size - margin). Any integer, not only multiples of 8:
    sub-cell offsets between the two crops of a pair are the inconsistency stage 1 removes."""
    hi = min(length - size, math.floor(x - margin))
    lo = max(0, math.floor(x + margin - size) + 1)
    if lo > hi:  # the point is too near a border for the margin: best effort, centred on it
        return int(np.clip(round(x - size / 2), 0, max(length - size, 0)))
    return int(rng.integers(lo, hi + 1))


def inside(xy: np.ndarray, left: int, top: int, size: int, margin: float) -> np.ndarray:
    """Which pixels [M, 2] lie in the crop at (left, top), at least `margin` px from its edges."""
    x, y = xy[:, 0] - left, xy[:, 1] - top
    return (x >= margin) & (x < size - margin) & (y >= margin) & (y < size - margin)


def sample_latents(z: torch.Tensor, xy: torch.Tensor, downscale: int = DOWNSCALE) -> torch.Tensor:
    """Bilinear latents [M, C] of the grid z [C, h, w] at continuous pixel coords xy [M, 2] of the
    image (or crop) it encodes, which is (h*8) x (w*8) pixels. grid_sample with
    align_corners=False and normalised coordinate 2*x/W - 1 puts latent cell u's centre at
    pixel 8u + 4, i.e. latent coordinate x/8 - 0.5, the same corner-origin convention as the
    scene's pixels; border padding keeps samples near the edge finite."""
    c, h, w = z.shape
    size = torch.tensor([w * downscale, h * downscale], dtype=torch.float64)
    g = 2.0 * xy.to(torch.float64) / size - 1.0
    # float64 so that a cell centre hits its cell exactly (float32 leaves ~1e-5 of the neighbour
    # on grids whose size is not a power of two); gradients flow back to z's dtype.
    s = F.grid_sample(z[None].double(), g[None, None], mode="bilinear", padding_mode="border",
                      align_corners=False)
    return s[0, :, 0].T.to(z.dtype)


def latent_crop(rng: np.random.Generator, h: int, w: int, cells: int) -> tuple[int, int, int, int]:
    """(top, left, ch, cw) of a random crop of `cells` latent cells (clipped to the grid)."""
    ch, cw = min(cells, h), min(cells, w)
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    return top, left, ch, cw


def load_lpips(net: str, weights_dir: str | Path, device="cpu"):
    from lrf.metrics import LPIPS

    return LPIPS(net, Path(weights_dir) / "lpips", device=device)


def psnr_l1(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(PSNR dB, mean L1) of a clamped prediction; the numbers alignment/recon reports use."""
    from lrf.metrics import psnr

    pred = pred.clamp(0, 1)
    return psnr(pred, target), float((pred - target).abs().mean())


def mean_or_none(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


# ----------------------------------------------------------------------------- CLI
def stage_parser(description: str, part: str, paired: str, paired_help: str, spec_help: str):
    """The arguments both stages share; `paired` is what each --scene comes with (corr | field)."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--vae", required=True, help=spec_help)
    ap.add_argument("--weights-dir", required=True, type=Path)
    ap.add_argument("--scene", action="extend", nargs="+", type=Path, help="tuning scene.json (repeatable)")
    ap.add_argument(f"--{paired}", action="extend", nargs="+", type=Path, help=paired_help)
    ap.add_argument("--measure-scene", action="extend", nargs="+", type=Path,
                    help="scene.json only measured (before/after), never trained on")
    ap.add_argument(f"--measure-{paired}", action="extend", nargs="+", type=Path)
    ap.add_argument("--cfg", default="{}", help="JSON overrides of the stage's config")
    ap.add_argument("--seed", type=int, default=None, help="overrides cfg seed")
    ap.add_argument("--measure-only", action="store_true",
                    help=f"no training: pretrained vs the spec's {part} on --measure-scene")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads; on a busy 2-core machine 1 is several times faster")
    ap.add_argument("--out", required=True, type=Path)
    return ap


def spec_and_overrides(args) -> tuple[dict, dict]:
    """(--vae, --cfg) parsed, with --seed folded into the overrides; one-line error if not JSON."""
    try:
        spec = json.loads(args.vae)
        over = json.loads(args.cfg)
    except json.JSONDecodeError as e:
        raise InputError(f"--vae/--cfg: not JSON ({e.msg})") from None
    if args.seed is not None:
        over["seed"] = args.seed
    return spec, over
