"""What both fine-tuning stages (and the per-scene alignment) share beyond the training loop
(lrf.train.loop: checkpoints, RNG, progress, curves): hashes, crops, latent sampling, LPIPS,
outputs and the command line.

Exact resumption: all sampling randomness comes from the loop's numpy Generator, whose state is
checkpointed; no op used draws from torch's RNG. So with a fixed seed on the CPU a run killed
after a checkpoint and resumed ends bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lrf.errors import InputError
from lrf.io import atomic_write_bytes, atomic_write_json
from lrf.settings import DOWNSCALE



# ----------------------------------------------------------------------------- hashes
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


# ----------------------------------------------------------------------------- outputs
def save_module(path: str | Path, module: torch.nn.Module, meta: dict | None = None) -> None:
    """A module's state_dict as float32 safetensors (what lrf.vae.factory.load_vae swaps in)."""
    from safetensors.torch import save

    sd = {k: v.detach().cpu().float().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
          for k, v in module.state_dict().items()}
    atomic_write_bytes(path, save(sd, metadata={"lrf": json.dumps(meta or {})}))


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


def stage_main(argv, description: str, *, stage: int, part: str, paired: str, paired_metavar: str,
               paired_help: str, spec_help: str, config, report: str, scene_list, train, measure_only,
               summary_line) -> int:
    """Both stages' command line, which differ only in what they tune (`part`: encoder | decoder)
    and what each scene comes with (`paired`: corr | field): the config from --cfg/--seed, then
    training on the --scene/--<paired> pairs, or with --measure-only the pretrained VAE against the
    spec's tuned `part` on the --measure-scene pairs, written to out/`report`.

    scene_list(scenes, paired, what) -> scenes; measure_only(before_vae, after_vae, scenes, cfg) and
    train(vae, lpips, scenes, cfg, out, measure_scenes, spec=, progress=) -> report;
    summary_line(report) -> the line printed at the end."""
    from lrf.cli import run_main

    args = stage_parser(description, part, paired, paired_help, spec_help).parse_args(argv)

    def go():
        from lrf.vae.factory import load_vae

        torch.set_num_threads(args.threads)
        spec, over = spec_and_overrides(args)
        cfg = config.from_overrides(over)
        mscenes = scene_list(args.measure_scene, getattr(args, f"measure_{paired}"),
                             f"--measure-scene/--measure-{paired}")
        if args.measure_only:
            tuned = spec.get(part) or (args.out / f"{part}.safetensors")
            if not Path(tuned).is_file():
                raise InputError(f"--measure-only: {tuned}: no tuned {part} (give it as the spec's '{part}')")
            if not mscenes:
                raise InputError(f"--measure-only: give --measure-scene/--measure-{paired}")
            base = {k: v for k, v in spec.items() if k != part}
            after = dict(base, **{part: str(tuned)})
            rep = measure_only(load_vae(base, args.weights_dir, cfg.device), load_vae(after, args.weights_dir, cfg.device),
                               mscenes, cfg)
            rep["vae"] = after
            atomic_write_json(args.out / report, rep)
            return summary_line(rep)
        scenes = scene_list(args.scene, getattr(args, paired), f"--scene/--{paired}")
        if not scenes:
            raise InputError(f"stage {stage}: give at least one --scene SCENE_JSON --{paired} {paired_metavar}")
        vae = load_vae(spec, args.weights_dir, cfg.device)
        lp = load_lpips(cfg.lpips_net, args.weights_dir, cfg.device) if cfg.w_lpips > 0 else None
        return summary_line(train(vae, lp, scenes, cfg, args.out, mscenes, spec=spec, progress=True))

    return run_main(go)
