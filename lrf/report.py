"""Collect every scene's evaluation into tables, figures, image grids and one self-contained HTML.

    python -m lrf.report --results results --config-json '{"scenes": [...], "methods": [...]}' \
        --out results/report

The expected scene/method list comes from the config, not from what happens to be on disk, so a
run that failed (no metrics.json) shows up as a marked row with the ERROR line of its log instead
of silently shrinking the averages. Outputs (all written atomically):
metrics.csv (long form), tables.md, summary.json (flat, for DVC), summary.md, report.html,
figures/*.png, grids/*.png.

Wall-clock numbers (render/decode ms, fit seconds) come from the timing.json beside each
metrics.json (lrf.evaluate keeps them apart so metrics files are repeatable); older metrics files
that still hold them inline are read as they are.
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrf.io import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text
from lrf.methods import METHODS, field_name, latent_variant, per_scene

QUALITY = ("psnr", "ssim", "lpips_alex", "lpips_vgg")
TIMING = ("render_ms", "total_ms")
LABEL = {"psnr": "PSNR ↑", "ssim": "SSIM ↑", "lpips_alex": "LPIPS-alex ↓", "lpips_vgg": "LPIPS-vgg ↓",
         "render_ms": "render ms", "total_ms": "render+decode ms", "fit_seconds": "fit s"}
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips_alex": False, "lpips_vgg": False}
METHOD_ORDER = ("vae-ceiling", "rgb-3dgs", "vanilla", "enc", "dec", "full", "vanilla-ps", "full-ps")
GRID_METHODS = ("vanilla", "full", "rgb-3dgs")
CSV_COLUMNS = ("dataset", "scene", "method", "kind", "view", "metric", "value", "status", "split", "error")


# ----------------------------------------------------------------------------- collecting runs
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


# ----------------------------------------------------------------------------- long form
def long_rows(runs: list[Run]) -> list[dict]:
    """One row per (run, view, metric); failed runs get one row carrying status and error."""
    rows = []
    for r in runs:
        base = {"dataset": r.dataset, "scene": r.scene, "method": r.method, "kind": r.kind,
                "status": r.status, "split": r.split, "error": r.error}
        if r.status != "ok":
            rows.append({**base, "view": "-", "metric": "-", "value": ""})
            continue
        for pv in r.doc.get("per_view") or []:
            for m in QUALITY + TIMING:
                if _is_num(pv.get(m)):
                    rows.append({**base, "view": pv.get("view", "?"), "metric": m, "value": float(pv[m])})
        for k, v in sorted((r.doc.get("fit") or {}).items()):
            if _is_num(v):
                rows.append({**base, "view": "-", "metric": f"fit_{k}", "value": float(v)})
    return rows


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: (repr(row[k]) if isinstance(row[k], float) else row[k]) for k in CSV_COLUMNS})
    return buf.getvalue()


# ----------------------------------------------------------------------------- tables
@dataclass
class Table:
    """Cells are (text, css class); rendered to both markdown and HTML so they cannot disagree."""

    title: str
    header: list[str]
    rows: list[list[tuple[str, str]]]
    note: str = ""


def fmt(metric: str, v: float | None) -> str:
    if v is None:
        return "—"
    if metric == "psnr":
        return f"{v:.2f}"
    if metric in ("ssim", "lpips_alex", "lpips_vgg"):
        return f"{v:.4f}"
    return f"{v:.1f}"


def _status_cell(r: Run) -> tuple[str, str]:
    return ("FAILED", "fail") if r.status == "failed" else ("missing", "missing")


def _best(values: dict[str, float | None], metric: str, exclude=("vae-ceiling",)) -> str | None:
    """Best field method per row (the VAE ceiling is a bound, not a competitor)."""
    vals = {m: v for m, v in values.items() if v is not None and m not in exclude}
    if not vals or metric not in HIGHER_IS_BETTER:
        return None
    pick = max if HIGHER_IS_BETTER[metric] else min
    return pick(vals, key=vals.get)


def scene_tables(runs: list[Run], scenes: list[str], methods: list[str]) -> list[Table]:
    by = {(r.key, r.method): r for r in runs}
    tables = []
    for metric in measured(runs):
        rows = []
        for key in scenes:
            vals = {m: by[key, m].mean(metric) if by[key, m].status == "ok" else None for m in methods}
            best = _best(vals, metric)
            cells = [(key, "")]
            for m in methods:
                r = by[key, m]
                cells.append((fmt(metric, vals[m]), "best" if m == best else "") if r.status == "ok"
                             else _status_cell(r))
            rows.append(cells)
        tables.append(Table(f"Per scene: {LABEL[metric]} (mean over test views)", ["scene"] + methods, rows,
                            "bold: best field method in the row (the VAE ceiling is excluded)."))
    return tables


def _mean_std(vals: list[float]) -> tuple[float | None, float | None]:
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def _ms_text(metric: str, vals: list[float], total: int) -> str:
    m, s = _mean_std(vals)
    if m is None:
        return "—"
    t = fmt(metric, m) + (f" ± {fmt(metric, s)}" if s is not None else "")
    return t + (f" ({len(vals)}/{total})" if len(vals) != total else "")


def group_tables(runs: list[Run], methods: list[str], group: str) -> list[Table]:
    """Mean ± std over scenes per (dataset or split) x method; (n/N) when some runs failed."""
    attr = "dataset" if group == "dataset" else "split"
    groups = list(dict.fromkeys(getattr(r, attr) for r in runs))
    tables = []
    for metric in measured(runs):
        rows = []
        for g in groups:
            vals = {}
            cells = [(g, "")]
            for m in methods:
                rs = [r for r in runs if getattr(r, attr) == g and r.method == m]
                v = [x for x in (r.mean(metric) for r in rs if r.status == "ok") if x is not None]
                vals[m] = (v, len(rs))
            means = {m: (float(np.mean(v)) if v else None) for m, (v, _) in vals.items()}
            best = _best(means, metric)
            for m in methods:
                v, n = vals[m]
                if not v:
                    cells.append((f"FAILED (0/{n})" if n else "—", "fail" if n else ""))
                else:
                    cells.append((_ms_text(metric, v, n), "best" if m == best else ("partial" if len(v) < n else "")))
            rows.append(cells)
        what = "dataset" if group == "dataset" else "split"
        tables.append(Table(f"Per {what}: {LABEL[metric]} (mean ± std over scenes)", [what] + methods, rows,
                            "(n/N), shaded: only n of N scenes succeeded; std is over scenes (ddof=1); bold: best field method."))
    return tables


def overall_table(runs: list[Run], methods: list[str], summary: dict) -> Table:
    """One row per method: the means over all successful scenes, and the paired PSNR gap to vanilla."""
    splits = [sp for sp in ("in-domain", "cross-dataset") if any(r.split == sp for r in runs)]
    quality = measured(runs)
    header = ["method"] + [LABEL[m] for m in quality] + ["ΔPSNR vs vanilla"] + [f"PSNR {sp}" for sp in splits]
    rows = []
    for m in methods:
        rs = [r for r in runs if r.method == m]
        cells = [(m, "")]
        for metric in quality:
            v = [x for x in (r.mean(metric) for r in rs if r.status == "ok") if x is not None]
            cells.append((_ms_text(metric, v, len(rs)), "" if len(v) == len(rs) else ("partial" if v else "fail")))
        g = summary.get(f"gap/{m}-vanilla")
        cells.append(("—" if g is None else f"{g:+.2f}", ""))
        for sp in splits:
            v = [x for x in (r.mean("psnr") for r in rs if r.status == "ok" and r.split == sp) if x is not None]
            n = sum(1 for r in rs if r.split == sp)
            cells.append((_ms_text("psnr", v, n), "" if len(v) == n else ("partial" if v else "fail")))
        rows.append(cells)
    return Table("Overall (mean ± std over scenes)", header, rows,
                 "ΔPSNR is paired: mean over scenes where both the method and vanilla succeeded; "
                 "(n/N): only n of N scenes succeeded.")


def cost_tables(runs: list[Run], scenes: list[str], methods: list[str]) -> list[Table]:
    by = {(r.key, r.method): r for r in runs}
    out = []
    for metric, title in (("fit_seconds", "Field fitting time (s)"),
                          ("render_ms", "Render time per test view (ms)"),
                          ("total_ms", "Render + decode time per test view (ms)")):
        rows = []
        for key in scenes:
            cells = [(key, "")]
            for m in methods:
                r = by[key, m]
                if r.status != "ok":
                    cells.append(_status_cell(r))
                else:
                    cells.append((fmt(metric, r.fit_seconds() if metric == "fit_seconds" else r.mean(metric)), ""))
            rows.append(cells)
        note = "dec reuses vanilla's field and full reuses enc's, so their fit times repeat." \
            if metric == "fit_seconds" else ""
        out.append(Table(title, ["scene"] + methods, rows, note))
    return out


def diagnosis_table(runs: list[Run], scenes: list[str], methods: list[str]) -> Table:
    """Fit or generalisation? Per scene and field method: the VAE ceiling (held-out), decoded
    PSNR at training views (how well the field fits what it was given), held-out PSNR, and the
    field's own loss (latent space for latent fields)."""
    by = {(r.key, r.method): r for r in runs}
    rows = []
    for key in scenes:
        ceil = by.get((key, "vae-ceiling"))
        c = ceil.mean("psnr") if ceil is not None and ceil.status == "ok" else None
        for m in methods:
            r = by.get((key, m))
            if r is None or METHODS.get(m, {}).get("kind") not in ("latent", "rgb") or r.status != "ok":
                continue
            tr = ((r.doc.get("train") or {}).get("mean") or {}).get("psnr")
            te = r.mean("psnr")
            loss = (r.doc.get("fit") or {}).get("final_loss")
            tr = float(tr) if _is_num(tr) else None
            verdict = ""
            if tr is not None and te is not None and c is not None:
                verdict = "fit" if (c - tr) >= (tr - te) else "generalisation"
            rows.append([(key, ""), (m, ""), (fmt("psnr", c), ""), (fmt("psnr", tr), ""), (fmt("psnr", te), ""),
                         (fmt("psnr", None if tr is None or te is None else tr - te), ""),
                         (_num(loss) if _is_num(loss) else "—", ""), (verdict, "")]
                        )
    return Table("Fit or generalisation: decoded PSNR at training views vs held-out views",
                 ["scene", "method", "VAE ceiling", "train-view PSNR", "held-out PSNR", "train - held-out",
                  "field loss", "limited by"], rows,
                 "training views: up to 8 evenly spread; 'limited by' compares (ceiling - train) with "
                 "(train - held-out). field loss: the fit's final loss (latent fields: 0.8 L1 + 0.2 D-SSIM "
                 "on normalised latents; per-scene methods repeat their base field's).")


def sfm_table(results: Path, scenes: list[str], warnings: list[str]) -> Table:
    """Per scene: how SfM did (registered of all images, points) and what stage 1 gets from it."""
    rows = []
    for key in scenes:
        st = read_json(results / key / "sfm" / "stats.json", warnings)
        if st is None:
            continue
        corr = read_json(results / key / "correspondences" / "summary.json", warnings)
        reg, n = st.get("registered"), st.get("images")
        size = st.get("image_size")
        rows.append([(key, ""), (f"{reg} / {n}", "fail" if reg != n else ""),
                     ("×".join(map(str, size)) if size else "—", ""), (str(st.get("points", "—")), ""),
                     (str((corr or {}).get("matches", "—")), ""), (_num(st.get("total_s")) if _is_num(st.get("total_s")) else "—", "")])
    return Table("Structure from motion per scene", ["scene", "registered / images", "SfM image size", "points",
                                                     "correspondences", "SfM s"], rows,
                 "registered below the image count: the unregistered photos are left out of the scene.")


def failure_table(runs: list[Run]) -> Table:
    rows = [[(r.key, ""), (r.method, ""), (r.status.upper() if r.status == "failed" else r.status,
                                           "fail" if r.status == "failed" else "missing"),
             (r.error, ""), (r.log, "")] for r in runs if r.status != "ok"]
    return Table("Failed or missing runs", ["scene", "method", "status", "error", "log"], rows)


COUNTS = ("matches", "pairs", "views", "steps")


def tidy_before_after(rows):
    """Overall numbers first; unchanged counts (matches, views) dropped as noise."""
    rows = [r for r in rows if not (r[1].split(".")[-1] in COUNTS and r[2] == r[3])]
    return sorted(rows, key=lambda r: 0 if r[0].split(" / ")[0] in ("overall", "measure_overall") else 1)


def before_after_table(title: str, rows: list[tuple[str, str, float | None, float | None]]) -> Table:
    cells = []
    for path, metric, b, a in tidy_before_after(rows):
        d = (a - b) if (a is not None and b is not None) else None
        cells.append([(path or "(top level)", ""), (metric, ""), (_num(b), ""), (_num(a), ""),
                      (("+" if d is not None and d >= 0 else "") + _num(d) if d is not None else "—", "")])
    return Table(title, ["measured on", "metric", "before", "after", "after − before"], cells)


def _num(v) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"


def table_md(t: Table) -> str:
    def cell(text, cls):
        text = str(text).replace("|", "\\|").replace("\n", " ")
        return f"**{text}**" if cls in ("best", "fail") and text else text

    lines = [f"### {t.title}", "", "| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
    lines += ["| " + " | ".join(cell(*c) for c in row) + " |" for row in t.rows]
    if not t.rows:
        lines.append("| " + " | ".join(["(none)"] + [""] * (len(t.header) - 1)) + " |")
    if t.note:
        lines += ["", f"_{t.note}_"]
    return "\n".join(lines) + "\n"


def table_html(t: Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f'<td class="{c}">{e(str(x))}</td>' if c else f"<td>{e(str(x))}</td>"
                                    for x, c in row) + "</tr>" for row in t.rows)
    if not t.rows:
        body = f'<tr><td colspan="{len(t.header)}">(none)</td></tr>'
    note = f'<p class="note">{e(t.note)}</p>' if t.note else ""
    return f"<h3>{e(t.title)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


# ----------------------------------------------------------------------------- stage 1 / stage 3 JSON
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


# ----------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def method_colors(methods: list[str]) -> dict[str, tuple]:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(ordered_methods(list(METHOD_ORDER) + methods))}


def figure_metrics(runs: list[Run], methods: list[str]) -> bytes | None:
    """Grouped bars: datasets on x, one bar per method, error bars = std over scenes."""
    ok = [r for r in runs if r.status == "ok"]
    if not ok:
        return None
    plt = _plt()
    datasets = list(dict.fromkeys(r.dataset for r in runs))
    colors = method_colors(methods)
    quality = measured(runs)
    fig, axes = plt.subplots(1, len(quality), figsize=(4.2 * len(quality), 3.6), squeeze=False)
    width = 0.8 / max(len(methods), 1)
    for ax, metric in zip(axes[0], quality):
        for j, m in enumerate(methods):
            mean, std, short = [], [], []
            for d in datasets:
                v = [x for x in (r.mean(metric) for r in ok if r.dataset == d and r.method == m) if x is not None]
                mu, sd = _mean_std(v)
                mean.append(np.nan if mu is None else mu)
                std.append(np.nan if sd is None else sd)
                short.append(len(v) < sum(1 for r in runs if r.dataset == d and r.method == m))
            x = np.arange(len(datasets)) + (j - (len(methods) - 1) / 2) * width
            ceiling = METHODS.get(m, {}).get("kind") == "ceiling"
            ax.bar(x, mean, width, yerr=None if np.all(np.isnan(std)) else std, capsize=2, label=m,
                   color="#d0d0d0" if ceiling else colors[m], hatch="///" if ceiling else None,
                   edgecolor="#888888" if ceiling else "white", linewidth=0.5)
            # a red x under every bar that lost scenes: failures must be visible in the figure too
            bad = [xx for xx, sh in zip(x, short) if sh]
            if bad:
                ax.plot(bad, [0.02] * len(bad), "x", color="#d93025", ms=6, mew=2,
                        transform=ax.get_xaxis_transform(), label="_failed", clip_on=False)
        ax.set_xticks(np.arange(len(datasets)), datasets, rotation=20, ha="right")
        ax.set_title(LABEL[metric])
        ax.grid(axis="y", alpha=0.3)
        if metric == "psnr":
            vals = [r.mean("psnr") for r in ok if r.mean("psnr") is not None]
            if vals:
                ax.set_ylim(max(0.0, min(vals) - 3), max(vals) + 1.5)
    handles, labels = axes[0][0].get_legend_handles_labels()
    from matplotlib.lines import Line2D

    if any(r.status != "ok" for r in runs):
        handles.append(Line2D([], [], ls="", marker="x", color="#d93025", mew=2))
        labels.append("scenes failed/missing")
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), bbox_to_anchor=(0.5, 1.07), frameon=False)
    fig.tight_layout()
    return fig_bytes(fig)


def figure_before_after(title: str, rows) -> bytes | None:
    """Before/after bars per measured set, one panel per metric (L1 and its ratio to random pairs)."""
    rows = [r for r in rows if r[2] is not None or r[3] is not None]
    if not rows:
        return None
    plt = _plt()
    metrics = list(dict.fromkeys(r[1] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(5.0, 0.9 * len(rows) / len(metrics) + 2.5) * len(metrics) ** 0.8,
                                                        3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        rs = [r for r in rows if r[1] == metric]
        labels = [_short_path(r[0]) for r in rs]
        x = np.arange(len(rs))
        b = [np.nan if r[2] is None else r[2] for r in rs]
        a = [np.nan if r[3] is None else r[3] for r in rs]
        ax.bar(x - 0.2, b, 0.4, label="before", color="#9aa5b1")
        ax.bar(x + 0.2, a, 0.4, label="after", color="#2b7bba")
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig_bytes(fig)


def _short_path(p: str) -> str:
    parts = [x for x in p.split(" / ") if x not in ("tuning", "scenes", "heldout")]
    return " / ".join(parts) or "(all)"


def _smooth(y: np.ndarray, n: int) -> np.ndarray:
    if n <= 1 or len(y) < 3:
        return y
    n = min(n, len(y))
    k = np.ones(n) / n
    pad = np.concatenate([np.full(n - 1, y[0]), y])
    return np.convolve(pad, k, mode="valid")


def figure_finetune_curves(curves: dict[str, object]) -> bytes | None:
    """Stage 1 / stage 3 losses per step (raw faint, moving average bold)."""
    curves = {k: v for k, v in curves.items() if v is not None}
    if not curves:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.6), squeeze=False)
    for ax, (name, df) in zip(axes[0], curves.items()):
        step = df["step"].to_numpy(float)
        cols = [c for c in df.columns if c not in ("step", "seconds", "clean")]
        win = max(1, len(step) // 50)
        for i, c in enumerate(cols):
            y = df[c].to_numpy(float)
            if not np.isfinite(y).any():
                continue
            color = plt.get_cmap("tab10")(i)
            if c == "loss":
                ax.plot(step, y, color=color, alpha=0.25, lw=0.7)
            ax.plot(step, _smooth(y, win), color=color, lw=1.8 if c == "loss" else 1.0, label=c)
        pos = df[cols].to_numpy(float)
        if np.all(pos[np.isfinite(pos)] > 0):
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig_bytes(fig)


def figure_field_curves(logs: dict[str, dict[str, object]]) -> bytes | None:
    """One column per field (vanilla, enc, rgb-3dgs); loss and Gaussian count vs step, a line per scene."""
    logs = {f: logs[f] for f in ordered_methods(list(logs)) if logs[f]}
    if not logs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(2, len(logs), figsize=(5.0 * len(logs), 6.2), squeeze=False, sharex="col")
    for j, (fname, per_scene) in enumerate(logs.items()):
        for key, df in per_scene.items():
            if "loss" in df.columns:
                axes[0][j].plot(df["step"], df["loss"], lw=1.2, label=key)
            if "n_gaussians" in df.columns:
                axes[1][j].plot(df["step"], df["n_gaussians"], lw=1.2, label=key)
        axes[0][j].set_title(f"field: {fname}")
        axes[0][j].set_ylabel("loss")
        vals = np.concatenate([d["loss"].to_numpy(float) for d in per_scene.values() if "loss" in d.columns] or [[]])
        if vals.size and np.all(vals[np.isfinite(vals)] > 0):
            axes[0][j].set_yscale("log")
        axes[1][j].set_ylabel("Gaussians")
        axes[1][j].set_xlabel("step")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
        axes[0][j].legend(fontsize=7)
    fig.tight_layout()
    return fig_bytes(fig)


# ----------------------------------------------------------------------------- image grids
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _fit_cell(img, max_w: int = 320, min_w: int = 128):
    """Large renders are shrunk (keeps the HTML small); tiny ones are blown up with nearest pixels."""
    from PIL import Image

    w, h = img.size
    if w > max_w:
        return img.resize((max_w, max(1, round(h * max_w / w))), Image.LANCZOS)
    if w < min_w:
        k = math.ceil(min_w / w)
        return img.resize((w * k, h * k), Image.NEAREST)
    return img


def grid_image(scene_json: Path, runs: dict[str, Run], results_scene: Path, max_views: int = 3) -> bytes | None:
    """photo | vanilla | full | rgb-3dgs (whichever exist) for up to `max_views` test views."""
    from PIL import Image, ImageDraw

    from lrf.scene.model import Scene

    scene = Scene.load(scene_json)
    test = scene.test
    if not test:
        return None
    pick = sorted({test[int(round(t))] for t in np.linspace(0, len(test) - 1, min(max_views, len(test)))})
    cols = ["photo"] + [m for m in GRID_METHODS if m in runs and runs[m].status == "ok"
                        and (results_scene / "eval" / m / "renders").is_dir()]
    if len(cols) == 1:
        return None
    cells: list[list[tuple[object, str]]] = []
    for i in pick:
        cam = scene.cameras[i]
        photo = Image.fromarray((np.clip(scene.load_image(i), 0, 1) * 255).round().astype(np.uint8))
        row = [(photo, cam.name)]
        for m in cols[1:]:
            p = results_scene / "eval" / m / "renders" / (Path(cam.name.replace("/", "__")).stem + ".png")
            if p.is_file():
                with Image.open(p) as im:
                    img = im.convert("RGB")
                if img.size != photo.size:
                    img = img.resize(photo.size, Image.BICUBIC)
                pv = next((v for v in runs[m].doc.get("per_view") or [] if v.get("view") == cam.name), {})
                cap = " · ".join(x for x in (f"PSNR {pv['psnr']:.2f}" if _is_num(pv.get("psnr")) else "",
                                           f"LPIPS-alex {pv['lpips_alex']:.3f}" if _is_num(pv.get("lpips_alex")) else "") if x)
                row.append((img, cap))
            else:
                row.append((None, "no render"))
        cells.append(row)
    cw, ch = _fit_cell(cells[0][0][0]).size
    head, cap_h, pad = 24, 18, 4
    W = len(cols) * (cw + pad) + pad
    H = head + len(cells) * (ch + cap_h + pad) + pad
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    f_head, f_cap = _font(15), _font(11)
    for j, c in enumerate(cols):
        draw.text((pad + j * (cw + pad) + cw / 2, head / 2), c, fill="black", font=f_head, anchor="mm")
    for r, row in enumerate(cells):
        y = head + r * (ch + cap_h + pad)
        for j, (img, cap) in enumerate(row):
            x = pad + j * (cw + pad)
            if img is None:
                draw.rectangle([x, y, x + cw - 1, y + ch - 1], fill="#dddddd")
            else:
                canvas.paste(_fit_cell(img).resize((cw, ch)), (x, y))
            draw.text((x + cw / 2, y + ch + cap_h / 2), _clip_text(draw, cap, f_cap, cw), fill="#333333",
                      font=f_cap, anchor="mm")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _clip_text(draw, text: str, font, width: int) -> str:
    """Fit a caption into its cell: drop trailing ' · ' parts first, then truncate."""
    while " · " in text and draw.textlength(text, font=font) > width - 4:
        text = text.rsplit(" · ", 1)[0]
    while text and draw.textlength(text, font=font) > width - 4:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


# ----------------------------------------------------------------------------- HTML / markdown
CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1300px;color:#222;padding:0 16px}
h1{margin-bottom:4px} h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
h3{margin:20px 0 6px;font-size:1.02em}
table{border-collapse:collapse;font-size:13px;margin:4px 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f0f2f5} td:first-child,th:first-child{text-align:left}
td.best{font-weight:bold;background:#e6f4ea}
td.fail{background:#fde2e1;color:#a50e0e;font-weight:bold}
td.missing{background:#fff4d6;color:#8a6100}
td.partial{background:#fff4d6}
.failbox{border:2px solid #d93025;background:#fdecea;padding:8px 14px;border-radius:6px}
.failbox td,.failbox th{white-space:normal;text-align:left}
.okbox{border:2px solid #188038;background:#e6f4ea;padding:8px 14px;border-radius:6px}
.note{color:#666;font-size:12px;margin:2px 0 10px}
img{max-width:100%;border:1px solid #eee}
figure{margin:10px 0} figcaption{color:#555;font-size:13px}
.scene-fail{color:#a50e0e;font-weight:bold}
.tables{display:flex;flex-wrap:wrap;gap:0 28px}
.nav{font-size:14px} a{color:#1a5fb4;text-decoration:none}
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@dataclass
class Report:
    """Everything rendered, kept in memory so markdown and HTML are built from the same numbers."""

    runs: list[Run]
    scenes: list[str]
    methods: list[str]
    protocol: dict | None
    summary: dict = field(default_factory=dict)
    tables: dict[str, list[Table]] = field(default_factory=dict)
    figures: dict[str, tuple[str, bytes]] = field(default_factory=dict)   # name -> (caption, png)
    grids: dict[str, bytes] = field(default_factory=dict)
    grid_notes: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def summary_numbers(runs: list[Run], methods: list[str], stage_rows: dict[str, list]) -> dict:
    """Flat numbers for DVC: means over successful scenes, paired gaps to vanilla, failure counts."""
    out: dict[str, float | int] = {}
    ok = [r for r in runs if r.status == "ok"]
    for metric in QUALITY + ("fit_seconds",):
        for m in methods:
            v = [x for x in ((r.fit_seconds() if metric == "fit_seconds" else r.mean(metric))
                             for r in ok if r.method == m) if x is not None]
            if v:
                out[f"{metric}/{m}"] = round(float(np.mean(v)), 6)
    splits = sorted({r.split for r in runs} - {"-"})
    for sp in splits:
        for m in methods:
            v = [x for x in (r.mean("psnr") for r in ok if r.method == m and r.split == sp) if x is not None]
            if v:
                out[f"psnr/{sp}/{m}"] = round(float(np.mean(v)), 6)
    by = {(r.key, r.method): r for r in ok}
    for m in methods:
        if m == "vanilla" or METHODS.get(m, {}).get("kind") == "ceiling":
            continue
        for metric in ("psnr", "lpips_alex"):
            d = [by[k, m].mean(metric) - by[k, "vanilla"].mean(metric) for k, mm in by
                 if mm == m and (k, "vanilla") in by and by[k, m].mean(metric) is not None
                 and by[k, "vanilla"].mean(metric) is not None]
            if d:
                out[("gap" if metric == "psnr" else f"gap_{metric}") + f"/{m}-vanilla"] = round(float(np.mean(d)), 6)
    bad = [r for r in runs if r.status != "ok"]
    out["runs_total"] = len(runs)
    out["runs_ok"] = len(ok)
    out["runs_failed"] = len(bad)
    out["scenes_total"] = len({r.key for r in runs})
    out["scenes_failed"] = len({r.key for r in bad})
    for stage, rows in stage_rows.items():
        for path, metric, b, a in tidy_before_after(rows):
            top = path.split(" / ")[0] if path else ""
            if top not in ("", "overall", "measure_overall"):
                continue
            base = "/".join(x for x in [stage] + path.split(" / ") + [metric] if x)
            base = re.sub(r"\s+", "_", base)
            for when, v in (("before", b), ("after", a)):
                if v is not None:
                    out[f"{base}/{when}"] = round(float(v), 6)
    return out


def html_page(rep: Report, title: str) -> str:
    e = html.escape
    s = rep.summary
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{e(title)}</h1>"]
    nav = [("overall", "overall"), ("dataset", "per dataset"), ("split", "in-domain vs cross-dataset"),
           ("scene", "per scene"), ("diagnosis", "fit or generalisation"), ("sfm", "SfM"), ("cost", "cost"),
           ("stage1", "stage 1"), ("stage3", "stage 3"),
           ("curves", "training curves"), ("views", "test views")]
    parts.append("<p class='nav'>" + " · ".join(f"<a href='#{a}'>{e(t)}</a>" for a, t in nav
                                                if a not in ("split", "sfm") or a in rep.tables) + "</p>")
    parts.append(f"<p>{len(rep.scenes)} scenes × {len(rep.methods)} methods: "
                 f"{s['runs_ok']} runs ok, {s['runs_failed']} failed or missing "
                 f"(in {s['scenes_failed']} of {s['scenes_total']} scenes).</p>")
    bad = [r for r in rep.runs if r.status != "ok"]
    if bad:
        parts.append('<div class="failbox"><b>Failed scenes:</b> '
                     + ", ".join(f'<span class="scene-fail">{e(k)}</span>' for k in dict.fromkeys(r.key for r in bad))
                     + table_html(rep.tables["failures"][0]) + "</div>")
    else:
        parts.append('<div class="okbox">All expected scene/method runs produced metrics.</div>')
    parts.append("<h2 id='overall'>Overall</h2>" + table_html(rep.tables["overall"][0]))
    sections = [("Per dataset (mean ± std over scenes)", "dataset"), ("In-domain vs cross-dataset", "split"),
                ("Per scene", "scene"), ("Fit or generalisation", "diagnosis"), ("Structure from motion", "sfm"),
                ("Cost", "cost")]
    for name, key in sections:
        if key in rep.tables and rep.tables[key]:
            parts.append(f"<h2 id='{key}'>{e(name)}</h2><div class='tables'>"
                         + "".join(f"<div>{table_html(t)}</div>" for t in rep.tables[key]) + "</div>")
            if key == "dataset" and "metrics" in rep.figures:
                parts.append(_fig_html(*rep.figures["metrics"]))
    parts.append("<h2 id='stage1'>Stage 1: latent 3D consistency</h2>")
    if "stage1" in rep.tables:
        parts.append("".join(table_html(t) for t in rep.tables["stage1"]))
    else:
        parts.append("<p class='note'>No stage 1 consistency.json found.</p>")
    if "consistency" in rep.figures:
        parts.append(_fig_html(*rep.figures["consistency"]))
    parts.append("<h2 id='stage3'>Stage 3: VAE–RF alignment</h2>")
    if "stage3" in rep.tables:
        parts.append("".join(table_html(t) for t in rep.tables["stage3"]))
    else:
        parts.append("<p class='note'>No stage 3 alignment.json found.</p>")
    parts.append("<h2 id='curves'>Training curves</h2>")
    curves = [n for n in ("curves_finetune", "curves_fields") if n in rep.figures]
    parts += [_fig_html(*rep.figures[n]) for n in curves] or ["<p class='note'>No training logs found.</p>"]
    parts.append("<h2 id='views'>Test views</h2>")
    by = {}
    for r in rep.runs:
        by.setdefault(r.key, []).append(r)
    for key in rep.scenes:
        fails = [r for r in by.get(key, []) if r.status != "ok"]
        if fails and len(fails) == len(rep.methods) and len({r.status for r in fails}) == 1:
            what = f"all methods {fails[0].status.upper()}"
        else:
            what = ", ".join(f"{r.method} {r.status.upper()}" for r in fails)
        mark = f" <span class='scene-fail'>— {e(what)}</span>" if fails else ""
        parts.append(f"<h3>{e(key)}{mark}</h3>")
        errors: dict[str, list[str]] = {}
        for r in fails:  # one line per distinct error, not one per method
            errors.setdefault(r.error, []).append(r.method)
        for err, ms in errors.items():
            parts.append(f"<p class='note'>{e(', '.join(ms))}: {e(err)}</p>")
        if key in rep.grids:
            parts.append(f"<img alt='{e(key)} test views' src='{data_uri(rep.grids[key])}'>")
        else:
            parts.append(f"<p class='note'>No image grid: {e(rep.grid_notes.get(key, 'no renders'))}</p>")
    if rep.warnings:
        parts.append("<h2>Report warnings</h2><ul>" + "".join(f"<li>{e(w)}</li>" for w in rep.warnings) + "</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _fig_html(caption: str, png: bytes) -> str:
    e = html.escape
    return f"<figure><img alt='{e(caption)}' src='{data_uri(png)}'><figcaption>{e(caption)}</figcaption></figure>"


def tables_md(rep: Report) -> str:
    out = ["# lrf: tables", ""]
    for name, key in (("Failures", "failures"), ("Overall", "overall"), ("Per dataset", "dataset"), ("In-domain vs cross-dataset", "split"),
                      ("Per scene", "scene"), ("Fit or generalisation", "diagnosis"), ("Structure from motion", "sfm"),
                      ("Cost", "cost"), ("Stage 1: latent consistency", "stage1"),
                      ("Stage 3: alignment", "stage3")):
        if rep.tables.get(key):
            out += [f"## {name}", ""] + [table_md(t) for t in rep.tables[key]]
    return "\n".join(out)


def summary_md(rep: Report, fig_files: dict[str, str], grid_files: dict[str, str]) -> str:
    s = rep.summary
    out = ["# lrf report", "",
           f"{len(rep.scenes)} scenes × {len(rep.methods)} methods: {s['runs_ok']} runs ok, "
           f"{s['runs_failed']} failed or missing (in {s['scenes_failed']} of {s['scenes_total']} scenes).",
           "", "Full report: [report.html](report.html) · all tables: [tables.md](tables.md) · "
           "numbers: [metrics.csv](metrics.csv), [summary.json](summary.json)", ""]
    if rep.tables["failures"][0].rows:
        out += [table_md(rep.tables["failures"][0])]
    for key in ("overall", "dataset", "split"):
        out += [table_md(t) for t in rep.tables.get(key) or []]
    out += [table_md(t) for t in (rep.tables.get("scene") or [])[:1]]
    out += [table_md(t) for t in (rep.tables.get("diagnosis") or []) if t.rows]
    if rep.tables.get("stage1"):
        out += [table_md(rep.tables["stage1"][0])]
    if fig_files:
        out += ["## Figures", ""] + [f"- [{cap}]({path})" for cap, path in fig_files.items()] + [""]
    if grid_files:
        out += ["## Test views", ""] + [f"- [{k}]({p})" for k, p in grid_files.items()] + [""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- driver
def vae_dirs(results: Path, config: dict) -> list[Path]:
    """results/vae/<name>/: the configured VAE if named, else every one present."""
    vae = config.get("vae")
    name = vae.get("name") if isinstance(vae, dict) else vae if isinstance(vae, str) else None
    root = results / "vae"
    if name:
        return [root / name]
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def build_report(results: Path, config: dict, out: Path, max_views: int = 3) -> Report:
    results, out = Path(results), Path(out)
    scenes = list(dict.fromkeys(config.get("scenes") or discover_scenes(results)))
    methods = ordered_methods(config.get("methods") or list(METHODS))
    protocol = config.get("protocol") or None
    vdirs = vae_dirs(results, config)
    vae_name = vdirs[0].name if len(vdirs) == 1 else None
    runs = collect_runs(results, scenes, methods, protocol, vae_name)
    rep = Report(runs, scenes, methods, protocol)

    # stage 1 / stage 3 reports and curves
    stage_rows: dict[str, list] = {}
    curves: dict[str, object] = {}
    for vd in vdirs:
        tag = "" if len(vdirs) == 1 else f" ({vd.name})"
        c = read_json(vd / "stage1" / "consistency.json", rep.warnings)
        if c is not None:
            rows = before_after_rows(c)
            stage_rows["stage1" + ("" if not tag else f"/{vd.name}")] = rows
            rep.tables.setdefault("stage1", []).append(before_after_table(
                f"Stage 1{tag}: latent L1 at correspondences before/after fine-tuning the encoder", rows))
            if rows and "consistency" not in rep.figures:
                png = figure_before_after(f"Stage 1{tag}: latent consistency (lower is better)",
                                          consistency_selection(rows))
                if png:
                    rep.figures["consistency"] = (f"Latent consistency before/after stage 1{tag}", png)
        a = read_json(vd / "stage3" / "alignment.json", rep.warnings)
        if a is not None:
            rows = before_after_rows(a)
            stage_rows["stage3" + ("" if not tag else f"/{vd.name}")] = rows
            rep.tables.setdefault("stage3", []).append(before_after_table(
                f"Stage 3{tag}: decoding rendered latents before/after fine-tuning the decoder", rows))
        for st in ("stage1", "stage3"):
            curves[f"{st}{tag}"] = read_curve(vd / st / "curve.csv", rep.warnings)
    field_logs: dict[str, dict[str, object]] = {}
    for key in scenes:
        fdir = results / key / "fields"
        for log in sorted(fdir.glob("*/train_log.csv")) if fdir.is_dir() else []:
            df = read_curve(log, rep.warnings)
            if df is not None:
                field_logs.setdefault(log.parent.name, {})[key] = df

    rep.summary = summary_numbers(runs, methods, stage_rows)
    rep.tables["failures"] = [failure_table(runs)]
    rep.tables["overall"] = [overall_table(runs, methods, rep.summary)]
    rep.tables["dataset"] = group_tables(runs, methods, "dataset")
    if any(r.split != "-" for r in runs):
        rep.tables["split"] = group_tables(runs, methods, "split")
    rep.tables["scene"] = scene_tables(runs, scenes, methods)
    rep.tables["cost"] = cost_tables(runs, scenes, methods)
    rep.tables["diagnosis"] = [diagnosis_table(runs, scenes, methods)]
    sfm = sfm_table(results, scenes, rep.warnings)
    if sfm.rows:
        rep.tables["sfm"] = [sfm]

    for name, cap, png in (
            ("metrics", "Metrics per method per dataset (mean ± std over scenes)", figure_metrics(runs, methods)),
            ("curves_finetune", "Fine-tuning curves (stage 1 encoder, stage 3 decoder)",
             figure_finetune_curves(curves)),
            ("curves_fields", "Field training: loss and Gaussian count per scene", figure_field_curves(field_logs))):
        if png:
            rep.figures[name] = (cap, png)

    by_scene: dict[str, dict[str, Run]] = {}
    for r in runs:
        by_scene.setdefault(r.key, {})[r.method] = r
    for key in scenes:
        sj = results / key / "prepared" / "scene.json"
        if not sj.is_file():
            rep.grid_notes[key] = f"{sj} not found"
            continue
        try:
            png = grid_image(sj, by_scene.get(key, {}), results / key, max_views)
        except Exception as e:  # one broken scene must not cost the report of the others
            rep.grid_notes[key] = f"{type(e).__name__}: {e}"
            rep.warnings.append(f"{key}: image grid failed: {type(e).__name__}: {e}")
            continue
        if png:
            rep.grids[key] = png
        else:
            rep.grid_notes[key] = "no test views or no successful photo/vanilla/full/rgb-3dgs renders"
    write_outputs(rep, out)
    return rep


def write_outputs(rep: Report, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.csv", csv_text(long_rows(rep.runs)))
    atomic_write_json(out / "summary.json", rep.summary)
    atomic_write_text(out / "tables.md", tables_md(rep))
    fig_files, grid_files = {}, {}
    for name, (cap, png) in rep.figures.items():
        atomic_write_bytes(out / "figures" / f"{name}.png", png)
        fig_files[cap] = f"figures/{name}.png"
    for key, png in rep.grids.items():
        rel = f"grids/{key.replace('/', '__')}.png"
        atomic_write_bytes(out / rel, png)
        grid_files[key] = rel
    atomic_write_text(out / "summary.md", summary_md(rep, fig_files, grid_files))
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(html_page(rep, "lrf: latent radiance fields report"), encoding="utf-8")


def parse_config(text: str) -> dict:
    """JSON text, or a path to a JSON file (long scene lists do not fit a command line well)."""
    t = text.strip()
    if not t.startswith("{") and Path(t).is_file():
        t = Path(t).read_text()
    cfg = json.loads(t) if t else {}
    if not isinstance(cfg, dict):
        raise ValueError("--config-json must be a JSON object")
    return cfg


def main(argv=None) -> int:
    from lrf.cli import InputError, run_main

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--config-json", default="{}",
                    help='{"scenes": ["dataset/scene", ...], "methods": [...], "protocol": {"tune": [...], '
                         '"eval": [...]}, "vae": {"name": ...}} (or a path to such a file)')
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-views", type=int, default=3, help="test views per scene in the image grids")
    args = ap.parse_args(argv)

    def go():
        try:
            cfg = parse_config(args.config_json)
        except ValueError as e:
            raise InputError(f"report: --config-json: {e}") from None
        for k in ("scenes", "methods"):
            if k in cfg and not isinstance(cfg[k], list):
                raise InputError(f"report: --config-json: '{k}' must be a list, got {type(cfg[k]).__name__}")
        bad = [s for s in cfg.get("scenes") or [] if not isinstance(s, str) or "/" not in s]
        if bad:
            raise InputError(f"report: --config-json: scenes must be 'dataset/scene', got {bad[:3]}")
        rep = build_report(args.results, cfg, args.out, args.max_views)
        s = rep.summary
        head = " ".join(f"{m} {s[f'psnr/{m}']:.2f}" for m in rep.methods if f"psnr/{m}" in s)
        return (f"report: {s['runs_ok']}/{s['runs_total']} runs ok, {s['scenes_failed']} scenes with failures; "
                f"PSNR {head or 'n/a'} -> {args.out}/report.html")

    return run_main(go)


if __name__ == "__main__":
    raise SystemExit(main())
