"""Collecting runs: one (scene, method) cell per expected run, its metrics or its error; stage 1/3 JSON and curves."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrf.methods import METHODS, field_name, latent_variant, per_scene


QUALITY = ("psnr", "ssim", "lpips_alex", "lpips_vgg")


TIMING = ("render_ms", "total_ms")


LABEL = {"psnr": "PSNR ↑", "ssim": "SSIM ↑", "lpips_alex": "LPIPS-alex ↓", "lpips_vgg": "LPIPS-vgg ↓",
         "render_ms": "render ms", "total_ms": "render+decode ms", "fit_seconds": "fit s"}


HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips_alex": False, "lpips_vgg": False}


METHOD_ORDER = tuple(METHODS)  # lrf.methods lists them in the report's order


GRID_METHODS = ("vanilla", "full", "rgb-3dgs")


CSV_COLUMNS = ("dataset", "scene", "method", "kind", "view", "metric", "value", "status", "split", "error")


@dataclass
class Run:
    """One (scene, method) cell: its metrics.json if it exists, else why not."""

    dataset: str
    scene: str
    method: str
    kind: str
    split: str
    status: str                      # ok | failed | missing
    error: str = ""
    log: str = ""
    doc: dict | None = None

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.scene}"

    def mean(self, metric: str) -> float | None:
        """Mean over test views: the file's own mean, else recomputed from per_view."""
        if self.doc is None:
            return None
        v = (self.doc.get("mean") or {}).get(metric)
        if v is None:
            vals = [r.get(metric) for r in self.doc.get("per_view") or []]
            vals = [float(x) for x in vals if _is_num(x)]
            v = float(np.mean(vals)) if vals else None
        return float(v) if _is_num(v) else None

    def fit_seconds(self) -> float | None:
        s = ((self.doc or {}).get("fit") or {}).get("seconds")
        return float(s) if _is_num(s) else None


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def ordered_methods(methods) -> list[str]:
    """The paper's table order first, unknown names after in their given order."""
    methods = list(dict.fromkeys(methods))
    return [m for m in METHOD_ORDER if m in methods] + [m for m in methods if m not in METHOD_ORDER]


def measured(runs: list["Run"]) -> tuple[str, ...]:
    """The quality metrics some successful run has (LPIPS-vgg is optional in the config): a
    metric nobody computed gets no column, rather than a column of failures."""
    ok = [r for r in runs if r.status == "ok"]
    return tuple(m for m in QUALITY if any(r.mean(m) is not None for r in ok)) or QUALITY


def split_of(key: str, protocol: dict | None) -> str:
    if not protocol or not (protocol.get("tune") or protocol.get("eval")):
        return "-"
    return "in-domain" if key in set(protocol.get("tune") or []) else "cross-dataset"


def _error_line(log: Path) -> str | None:
    """Last line starting with ERROR (the one-line reason lrf.cli.run_main prints)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    errs = [ln.strip() for ln in lines if ln.startswith("ERROR")]
    return errs[-1] if errs else None


def candidate_logs(results: Path, dataset: str, scene: str, method: str, vae_name: str | None) -> list[Path]:
    """Logs that can explain a missing metrics.json, the method's own step first, then upstream."""
    logs = results / "logs"
    out = [logs / "evaluate" / dataset / scene / f"{method}.log"]
    kind = METHODS.get(method, {}).get("kind")
    if method in METHODS and per_scene(method):
        out.append(logs / "align" / dataset / scene / f"{method}.log")
    if method in METHODS and kind != "ceiling":
        out.append(logs / "fit_field" / dataset / scene / f"{field_name(method)}.log")
    if kind in ("latent", "ceiling"):
        enc = logs / "encode" / dataset / scene
        if vae_name and method in METHODS:
            out.append(enc / f"{latent_variant(vae_name, method)}.log")
        elif enc.is_dir():
            out += sorted(enc.glob("*.log"))
    # scene-level steps (prepare, sfm, correspondences, ...): results/logs/*/<dataset>/<scene>*.log
    if logs.is_dir():
        out += sorted(p for p in logs.glob(f"*/{glob_escape(dataset)}/{glob_escape(scene)}*.log")
                      if p.stem == scene or p.stem.startswith(scene + "."))
    return list(dict.fromkeys(out))


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)


def find_error(results: Path, dataset: str, scene: str, method: str, vae_name: str | None) -> tuple[str, str, str]:
    """(status, error line, log path) for a run without metrics.json.

    "failed" when a log says ERROR (or the method's own log exists but ended some other way,
    e.g. a traceback); "missing" when nothing ran, so the two are never confused."""
    cands = candidate_logs(results, dataset, scene, method, vae_name)
    for log in cands:
        line = _error_line(log) if log.is_file() else None
        if line:
            return "failed", line, str(log)
    own = cands[0]
    if own.is_file():
        tail = [ln.strip() for ln in own.read_text(errors="replace").splitlines() if ln.strip()]
        return "failed", (tail[-1] if tail else "log is empty, no metrics.json"), str(own)
    return "missing", "no metrics.json and no log", ""


def collect_runs(results: Path, scenes: list[str], methods: list[str], protocol: dict | None,
                 vae_name: str | None) -> list[Run]:
    runs = []
    for key in scenes:
        dataset, scene = key.split("/", 1)
        for method in methods:
            kind = METHODS.get(method, {}).get("kind", "?")
            split = split_of(key, protocol)
            path = results / dataset / scene / "eval" / method / "metrics.json"
            if path.is_file():
                try:
                    doc = json.loads(path.read_text())
                    if not isinstance(doc, dict):
                        raise ValueError("not a JSON object")
                except (OSError, ValueError) as e:
                    runs.append(Run(dataset, scene, method, kind, split, "failed",
                                    f"ERROR {path}: unreadable metrics.json ({e})", str(path)))
                    continue
                doc = merge_timing(doc, read_timing(path.with_name("timing.json")))
                runs.append(Run(dataset, scene, method, doc.get("kind", kind), split, "ok", doc=doc))
            else:
                status, err, log = find_error(results, dataset, scene, method, vae_name)
                runs.append(Run(dataset, scene, method, kind, split, status, err, log))
    return runs


def read_timing(path: Path) -> dict | None:
    """timing.json, or None when absent or unreadable (timings are optional; scores are not)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def merge_timing(doc: dict, timing: dict | None) -> dict:
    """The metrics document with the timing file's per-view times, means and fit seconds folded
    in, so every table reads one document; values already in the metrics file are kept."""
    if not timing:
        return doc
    doc = json.loads(json.dumps(doc))  # a copy: the caller's document stays as read
    by_view = {t.get("view"): t for t in timing.get("per_view") or [] if isinstance(t, dict)}
    for pv in doc.get("per_view") or []:
        for k, v in (by_view.get(pv.get("view")) or {}).items():
            pv.setdefault(k, v)
    for part in ("mean", "fit"):
        if not isinstance(doc.get(part), dict):
            doc[part] = {}
        for k, v in (timing.get(part) or {}).items():
            doc[part].setdefault(k, v)
    return doc


def discover_scenes(results: Path) -> list[str]:
    """Without a config: every scene that has an eval/ or sfm/ folder."""
    keys = {f"{p.parent.parent.name}/{p.parent.name}" for pat in ("*/*/eval", "*/*/sfm") for p in results.glob(pat)}
    return sorted(k for k in keys if not k.startswith(("logs/", "vae/", "report/")))


def before_after_rows(doc, path: tuple = ()) -> list[tuple[str, str, float | None, float | None]]:
    """Every {"before": .., "after": ..} pair anywhere in a JSON document, as flat numeric rows.

    Deliberately structure-agnostic: the stage 1/3 reports are still evolving, so we show
    whatever before/after numbers exist (path, metric, before, after) instead of expecting keys."""
    rows = []
    if isinstance(doc, dict):
        if "before" in doc or "after" in doc:  # a half-written report may hold only one side
            b, a = _flat_numbers(doc.get("before")), _flat_numbers(doc.get("after"))
            for m in dict.fromkeys(list(b) + list(a)):
                rows.append((" / ".join(path), m, b.get(m), a.get(m)))
            return rows
        for k, v in doc.items():
            if k in ("config", "vae", "fields", "latent_stats"):
                continue
            rows += before_after_rows(v, path + (str(k),))
    return rows


def _flat_numbers(x, prefix: str = "") -> dict[str, float]:
    if _is_num(x):
        return {prefix or "value": float(x)}
    out = {}
    if isinstance(x, dict):
        for k, v in x.items():
            out.update(_flat_numbers(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def read_json(path: Path, warnings: list[str]):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        warnings.append(f"{path}: unreadable ({e})")
        return None


def read_curve(path: Path, warnings: list[str]):
    import pandas as pd

    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path)
    except Exception as e:  # a half-written or empty CSV must not sink the whole report
        warnings.append(f"{path}: unreadable ({type(e).__name__}: {e})")
        return None
    if "step" not in df.columns or df.empty:
        warnings.append(f"{path}: no 'step' column or no rows")
        return None
    return df


def consistency_selection(rows):
    """The rows to plot: held-out correspondence L1 (and its ratio to random pairs) if present."""
    held = [r for r in rows if r[0].split(" / ")[-1] == "heldout" and r[1] in ("l1", "ratio")]
    if held:
        return held
    some = [r for r in rows if r[1] in ("l1", "ratio")]
    return some or rows[:24]


def vae_dirs(results: Path, config: dict) -> list[Path]:
    """results/vae/<name>/: the configured VAE if named, else every one present."""
    vae = config.get("vae")
    name = vae.get("name") if isinstance(vae, dict) else vae if isinstance(vae, str) else None
    root = results / "vae"
    if name:
        return [root / name]
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
