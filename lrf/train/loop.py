"""One resumable training loop for the field fit, stage 1, stage 3 and the per-scene alignment.

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

Checkpoint selection (stages 1 and 3): `loop.run(..., validate=fn)` with cfg.validate_every > 0
calls `fn()` -> (score, eligible, metrics) at step 0, every validate_every steps and at the end,
writes val.csv (step, score, eligible, the metrics, seconds), keeps a copy of state() at the best
eligible score (higher is better; a later step must beat it strictly, so ties keep the earlier,
step 0 first) and, once the run is complete, load()s it back before the trainer writes its
outputs. The copy and the rows are in the checkpoint, so a resumed run chooses as an
uninterrupted one would. `fn` must not draw random numbers (or must restore what it draws).

The field fit uses the same loop with two twists, each a keyword of TrainLoop: its optimizer is rebuilt from the checkpoint, since densification
changes the parameters' shapes (`resume()` without an optimizer: `state`/`load` carry Adam's state,
with `optimizer_tensors(opt, named=True)`); and it logs a row every `log_every` steps with the mean
loss since the last row (`mean_of`), summed on the device so a step need not wait for the GPU.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
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
def optimizer_tensors(opt: torch.optim.Optimizer, named: bool = False) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state (step, exp_avg, exp_avg_sq) as flat named tensors, keyed by the
    parameter's index, or with `named` by its param group's name (groups of one parameter, as the
    field's: their tensors are replaced as Gaussians come and go, their names stay)."""
    out = {}
    if named:
        for g in opt.param_groups:
            for k, v in opt.state.get(g["params"][0], {}).items():
                if torch.is_tensor(v):
                    out[f"adam/{g['name']}/{k}"] = v.detach().cpu().contiguous()
        return out
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if not torch.is_tensor(v):
                v = torch.tensor(v)
            out[f"adam/{idx}/{k}"] = v.detach().cpu().contiguous()
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], named: bool = False) -> None:
    """Put back what optimizer_tensors(opt, named) saved (moments onto each parameter's device)."""
    index, n = {}, 0
    for g in opt.param_groups:       # a group's name -> its first parameter's index in state_dict()
        index[g.get("name")] = n
        n += len(g["params"])
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        if name.startswith("adam/"):
            _, idx, k = name.split("/", 2)
            state.setdefault(index[idx] if named else int(idx), {})[k] = v.clone()
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})




# ----------------------------------------------------------------------------- curve + progress
def write_curve(path: str | Path, columns: Sequence[str], rows: Sequence[Sequence[float]],
                formats: dict[str, str] | None = None) -> None:
    """CSV of the rows: `step` as an integer, other columns as `formats` says ("d": an integer),
    else 6 significant digits."""
    specs = [(formats or {}).get(c, "d" if c == "step" else ".6g") for c in columns]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([int(v) if f == "d" else format(v, f) for f, v in zip(specs, r)])
    atomic_write_text(path, buf.getvalue())


def write_val(path: str | Path, rows: Sequence[dict]) -> None:
    """val.csv: one row per validation; `eligible` as 0/1, a missing value empty."""
    cols = list(dict.fromkeys(k for r in rows for k in r)) or ["step", "score", "eligible"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r.get(c) is None else int(r[c]) if c in ("step", "eligible") else format(r[c], ".6g")
                    for c in cols])
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

    def update(self, step: int, values: dict[str, float] | None, seconds: float) -> None:
        """values None: nothing new to show (the bar just advances)."""
        text = " ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4g}" for k, v in (values or {}).items())
        if self.bar is not None:
            if values is not None:
                self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif self.enabled and values is not None and (step % self.log_every == 0 or step == self.total):
            say(f"[{self.desc}] step {step}/{self.total} {text} {seconds:.1f}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Window:
    """Sums of the averaged curve columns since the last row, kept as float64 tensors on the
    values' device: adding a step's loss does not wait for it to be computed."""

    def __init__(self, columns: Sequence[str], mean_of: Sequence[str]):
        self.idx = [list(columns).index(c) for c in mean_of]
        self.reset()

    def reset(self) -> None:
        self.sums, self.count = [torch.zeros((), dtype=torch.float64) for _ in self.idx], 0

    def add(self, values: Sequence) -> None:
        for j, i in enumerate(self.idx):
            v = values[i].detach() if torch.is_tensor(values[i]) else torch.tensor(float(values[i]), dtype=torch.float64)
            self.sums[j] = self.sums[j].to(v.device).add_(v)
        self.count += 1

    def row(self, values: Sequence) -> tuple:
        """`values` with the averaged columns replaced by their means; the window starts again."""
        row = list(values)
        for j, i in enumerate(self.idx):
            row[i] = self.sums[j].item() / max(self.count, 1)
        self.reset()
        return tuple(row)

    def state(self) -> torch.Tensor:
        return torch.stack([s.cpu() for s in self.sums]) if self.sums else torch.zeros(0, dtype=torch.float64)

    def restore(self, sums: torch.Tensor, count: int) -> None:
        self.sums, self.count = [s.clone() for s in sums.to(torch.float64).unbind()], int(count)


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


# ----------------------------------------------------------------------------- the loop
class TrainLoop:
    """See the module docstring. `state()` returns the trainer's tensors to checkpoint (its
    modules' weights and anything else it must restore); `load(tensors)` puts them back.

    curve_file, formats: the curve CSV's name and its columns' formats (write_curve).
    mean_of: columns averaged over the steps since the previous row; when given, a row is written
      only every cfg.log_every steps (and at the end) and the progress shows the rows.
    side: small JSON facts for ckpt.json beside the checkpoint (the field's size), for people
      watching a run."""

    def __init__(self, name: str, out_dir: str | Path, fp: dict, cfg, columns: Sequence[str],
                 state: Callable[[], dict[str, torch.Tensor]], load: Callable[[dict], None],
                 progress: bool = True, *, curve_file: str = "curve.csv",
                 formats: dict[str, str] | None = None, mean_of: Sequence[str] = (),
                 side: Callable[[], dict] | None = None):
        self.name, self.out_dir, self.fp, self.cfg, self.columns = name, Path(out_dir), fp, cfg, tuple(columns)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.state, self.load, self.progress = state, load, progress
        self.total = int(cfg.steps)  # every trainer's config names its length `steps`
        self.curve_file, self.formats, self.side = curve_file, formats, side
        self.window = Window(self.columns[1:-1], mean_of) if mean_of else None
        self.rng = RNG(cfg.seed)
        self.step, self.seconds, self.rows = 0, 0.0, []
        self.extra: dict = {}          # JSON state of the trainer kept in the checkpoint ("before" numbers)
        self.opt: torch.optim.Optimizer | None = None
        self.val_rows: list[dict] = []  # one per validation (run(validate=...))
        self.best_step: int | None = None
        self.best_score = -math.inf
        self.best_state: dict[str, torch.Tensor] | None = None

    def resume(self, opt: torch.optim.Optimizer | None = None) -> dict | None:
        """Restore the last valid checkpoint written with this fingerprint; None: start afresh.
        Without `opt` the trainer's state()/load() carry its optimizer's state (an optimizer
        that can only be built once load() has restored the parameters)."""
        self.opt = opt
        ck = load_checkpoint(self.out_dir, self.fp)
        if ck is None:
            return None
        tens, meta = ck
        self.load(tens)
        if opt is not None:
            load_optimizer_tensors(opt, tens)
        self.rng.restore(tens, meta["rng"])
        self.step, self.seconds = meta["step"], meta["seconds"]
        if self.window is not None:
            self.window.restore(tens["window"], meta["window"])
        self.extra = {k: v for k, v in meta.items() if k not in ("fingerprint", "step", "seconds", "rng", "window", "val")}
        self.rows = [tuple(r) for r in tens["curve"].tolist()]
        if "val" in meta:
            self.val_rows, self.best_step = meta["val"]["rows"], meta["val"]["best_step"]
            self.best_score = meta["val"]["best_score"]
            best = {k[len("best/"):]: v for k, v in tens.items() if k.startswith("best/")}
            self.best_state = best if self.best_step is not None else None
        if self.progress:
            say(f"[{self.name}] resuming from step {self.step}")
        return meta

    def checkpoint(self) -> None:
        t = dict(self.state())
        if self.opt is not None:
            t.update(optimizer_tensors(self.opt))
        rt, rm = self.rng.state()
        t.update(rt)
        t["curve"] = rows_tensor(self.rows, len(self.columns))
        meta = {"fingerprint": self.fp, "step": self.step, "seconds": self.seconds, "rng": rm, **self.extra}
        if self.window is not None:
            t["window"], meta["window"] = self.window.state(), self.window.count
        if self.val_rows:
            meta["val"] = {"rows": self.val_rows, "best_step": self.best_step, "best_score": self.best_score}
            t.update({f"best/{k}": v for k, v in (self.best_state or {}).items()})
        save_checkpoint(self.out_dir, t, meta, side=self.side() if self.side else None)
        self.write_curve()

    def write_curve(self) -> None:
        write_curve(self.out_dir / self.curve_file, self.columns, self.rows, self.formats)
        if self.val_rows:
            write_val(self.out_dir / "val.csv", self.val_rows)

    def validate(self, fn: Callable) -> None:
        """One validation of the current weights: a row, and a copy of state() if it is the best
        eligible one so far."""
        t = Timer()
        score, eligible, metrics = fn()
        score, eligible = float(score), bool(eligible)
        better = eligible and score > self.best_score
        if better:
            self.best_step, self.best_score = self.step, score
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.state().items()}
        self.val_rows.append({"step": self.step, "score": score, "eligible": eligible, **metrics, "seconds": t()})
        if self.progress:
            say(f"[{self.name}] validation at step {self.step}: score {score:.4g}"
                f"{'' if eligible else ' (not eligible)'}; best step {self.best_step} ({t():.1f}s)")

    def validation(self) -> dict | None:
        """The selection for the trainer's report: the chosen step and every validation row (a
        score or metric that is not finite as null: the report stays plain JSON)."""
        if not self.val_rows:
            return None
        plain = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
        return {"every": int(self.cfg.validate_every), "chosen_step": self.best_step,
                "best_score": plain(self.best_score), "seconds": sum(r["seconds"] for r in self.val_rows),
                "rows": [{k: plain(v) for k, v in r.items()} for r in self.val_rows]}

    def run(self, step_fn: Callable, stop_at: int | None = None, train: Sequence[tuple] = (),
            validate: Callable | None = None) -> bool:
        """Steps until the run's length (or `stop_at`), checkpointing every cfg.checkpoint_every;
        the modules in `train` get requires_grad (module, flag) for the run and lose it after.
        With `validate` (and cfg.validate_every > 0) the best eligible state is chosen (module
        docstring) and is the state when a complete run returns. True when the run is complete."""
        cfg, total = self.cfg, self.total
        end = total if stop_at is None else min(stop_at, total)
        bar = Progress(self.name, total, self.step, cfg.log_every, self.progress)
        every = max(int(cfg.log_every), 1)
        val_every = int(getattr(cfg, "validate_every", 0)) if validate is not None else 0
        for module, flag in train:
            module.requires_grad_(flag)
        try:
            with deterministic():
                if val_every and not self.val_rows:
                    self.validate(validate)         # step 0: the starting weights are a candidate
                while self.step < end:
                    t = Timer()
                    values, shown = step_fn(self.rng)
                    self.step += 1
                    self.seconds += t()
                    if self.window is None:
                        self.rows.append((self.step, *values, self.seconds))
                    else:
                        self.window.add(values)
                        shown = None
                        if self.step % every == 0 or self.step == total:
                            values = self.window.row(values)
                            self.rows.append((self.step, *values, self.seconds))
                            shown = dict(zip(self.columns[1:-1], values))
                    bar.update(self.step, shown, self.seconds)
                    if val_every and (self.step % val_every == 0 or self.step == total):
                        self.validate(validate)
                    if cfg.checkpoint_every > 0 and self.step % cfg.checkpoint_every == 0 and self.step < total:
                        self.checkpoint()
        finally:
            bar.close()
            for module, _ in train:
                module.requires_grad_(False)
        if self.step < total:
            return False
        if val_every:
            if self.best_step is None:
                say(f"[{self.name}] WARNING: no validated step was eligible; keeping the last weights")
            elif self.best_step != self.step:
                self.load(self.best_state)
        return True

    def finish(self, keep_checkpoint: bool = False) -> None:
        """After the trainer's outputs are written (atomically): the final curve, then the
        checkpoint goes (unless kept)."""
        self.write_curve()
        if not keep_checkpoint:
            remove_checkpoint(self.out_dir)
