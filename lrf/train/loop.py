"""One resumable training loop for stage 1, stage 3 and the per-scene alignment.

The loop owns what every trainer needs to end bit-identical after `kill -9` and a rerun: the
fingerprint check, the checkpoint (one safetensors file with its SHA-256 beside it, lrf.checkpoint),
every RNG state (`RNG`: the sampling generator and torch / numpy / python's global states), Adam's
state, the "resuming from step k" line, progress (tqdm on a terminal, a line every `log_every`
steps in logs), the curve CSV, and the final step: outputs written atomically, then the
checkpoint removed. A trainer plugs in a step function and its state:

    loop = TrainLoop("stage3", out_dir, fp, cfg, CURVE_COLUMNS, state=..., load=..., progress=...)
    opt = ...
    if loop.resume(opt) is None:
        loop.extra = {"before": ...}            # JSON kept in the checkpoint
    if not loop.run(step_fn, opt, stop_at, train=[(module, True)]):
        return None                               # stopped early at stop_at (as if killed)
    ... write outputs ...
    loop.finish()

`step_fn(rng)` does one optimisation step and returns (the curve row's values between `step` and
`seconds`, the values shown in the progress line).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import random
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from lrf.checkpoint import load_checkpoint, remove_checkpoint, save_checkpoint
from lrf.io import atomic_write_text


def fingerprint(cfg, **parts) -> dict:
    """What a checkpoint must match to be resumed: the config's maths-relevant settings plus the
    identity of everything the run reads (weights, data, views), as plain JSON."""
    fp = cfg.fingerprint()
    fp.update(parts)
    return json.loads(json.dumps(fp))


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


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


# ----------------------------------------------------------------------------- the loop
class TrainLoop:
    """See the module docstring. `state()` returns the trainer's tensors to checkpoint (its
    modules' weights and anything else it must restore); `load(tensors)` puts them back."""

    def __init__(self, name: str, out_dir: str | Path, fp: dict, cfg, columns: Sequence[str],
                 state: Callable[[], dict[str, torch.Tensor]], load: Callable[[dict], None],
                 progress: bool = True):
        self.name, self.out_dir, self.fp, self.cfg, self.columns = name, Path(out_dir), fp, cfg, tuple(columns)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.state, self.load, self.progress = state, load, progress
        self.rng = RNG(cfg.seed)
        self.step, self.seconds, self.rows = 0, 0.0, []
        self.extra: dict = {}          # JSON state of the trainer kept in the checkpoint ("before" numbers)
        self.opt: torch.optim.Optimizer | None = None

    def resume(self, opt: torch.optim.Optimizer) -> dict | None:
        """Restore the last valid checkpoint written with this fingerprint; None: start afresh."""
        self.opt = opt
        ck = load_checkpoint(self.out_dir, self.fp)
        if ck is None:
            return None
        tens, meta = ck
        self.load(tens)
        load_optimizer_tensors(opt, tens)
        self.rng.restore(tens, meta["rng"])
        self.step, self.seconds = meta["step"], meta["seconds"]
        self.extra = {k: v for k, v in meta.items() if k not in ("fingerprint", "step", "seconds", "rng")}
        self.rows = [tuple(r) for r in tens["curve"].tolist()]
        if self.progress:
            say(f"[{self.name}] resuming from step {self.step}")
        return meta

    def checkpoint(self) -> None:
        t = dict(self.state())
        t.update(optimizer_tensors(self.opt))
        rt, rm = self.rng.state()
        t.update(rt)
        t["curve"] = rows_tensor(self.rows, len(self.columns))
        save_checkpoint(self.out_dir, t, {"fingerprint": self.fp, "step": self.step, "seconds": self.seconds,
                                          "rng": rm, **self.extra})
        write_curve(self.out_dir / "curve.csv", self.columns, self.rows)

    def run(self, step_fn: Callable, stop_at: int | None = None, train: Sequence[tuple] = ()) -> bool:
        """Steps until cfg.steps (or `stop_at`), checkpointing every cfg.checkpoint_every; the
        modules in `train` get requires_grad (module, flag) for the run and lose it after.
        True when the run is complete."""
        cfg = self.cfg
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        bar = Progress(self.name, cfg.steps, self.step, cfg.log_every, self.progress)
        for module, flag in train:
            module.requires_grad_(flag)
        try:
            with deterministic():
                while self.step < end:
                    t = Timer()
                    values, shown = step_fn(self.rng)
                    self.step += 1
                    self.seconds += t()
                    self.rows.append((self.step, *values, self.seconds))
                    bar.update(self.step, shown, self.seconds)
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                        self.checkpoint()
        finally:
            bar.close()
            for module, _ in train:
                module.requires_grad_(False)
        return self.step >= cfg.steps

    def finish(self, keep_checkpoint: bool = False) -> None:
        """After the trainer's outputs are written (atomically): the final curve, then the
        checkpoint goes (unless kept)."""
        write_curve(self.out_dir / "curve.csv", self.columns, self.rows)
        if not keep_checkpoint:
            remove_checkpoint(self.out_dir)
