"""Tables: per scene, per dataset/split, overall, cost, diagnosis, SfM, failures, before/after; the long-form CSV and the flat summary numbers."""
from __future__ import annotations

import csv
import html
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrf.methods import METHODS
from lrf.report.collect import CSV_COLUMNS, HIGHER_IS_BETTER, _is_num, LABEL, measured, QUALITY, read_json, Run, TIMING


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


def ceiling_table(runs: list[Run], scenes: list[str], methods: list[str]) -> Table | None:
    """Per scene: each autoencoder's plain and shift-averaged ceilings at the held-out views
    (lrf.vae.shift), beside the latent fields' held-out PSNR. The shift-averaged one is the bound a
    field that averages views at different sub-cell offsets works under; stage 1 must raise it."""
    by = {(r.key, r.method): r for r in runs}
    ceilings = [m for m in methods if METHODS.get(m, {}).get("kind") == "ceiling"]
    fields = [m for m in methods if METHODS.get(m, {}).get("kind") == "latent"]
    if not ceilings:
        return None
    rows = []
    for key in scenes:
        cells = [(key, "")]
        for m in ceilings:
            r = by.get((key, m))
            ok = r is not None and r.status == "ok"
            cells += [(fmt("psnr", r.mean("psnr") if ok else None), ""),
                      (fmt("psnr", r.mean("psnr_shift") if ok else None), "")]
        for m in fields:
            r = by.get((key, m))
            cells.append((fmt("psnr", r.mean("psnr") if r is not None and r.status == "ok" else None), ""))
        rows.append(cells)
    header = ["scene"] + [h for m in ceilings for h in (f"{m} plain", f"{m} shift-averaged")] + \
        [f"{m} field" for m in fields]
    return Table("Autoencoder ceilings at the held-out views: plain and shift-averaged (PSNR)", header, rows,
                 "plain: decode(encode(photo)); shift-averaged: decode(mean of the encodings of the photo shifted "
                 "by a 4x4 grid of 0/2/4/6 px, each moved back), what survives a field's averaging over sub-cell "
                 "offsets (lrf.vae.shift). stage1-ceiling is stage 1's encoder and decoder.")


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


def shift_ceiling_numbers(runs: list[Run], methods: list[str]) -> dict:
    """summary.json: each ceiling method's mean shift-averaged ceiling, over all scenes and per split."""
    out = {}
    for m in methods:
        if METHODS[m]["kind"] != "ceiling":
            continue
        for split in [None] + sorted({r.split for r in runs if r.split != "-"}):
            v = [r.mean("psnr_shift") for r in runs if r.method == m and r.status == "ok"
                 and (split is None or r.split == split)]
            v = [x for x in v if x is not None]
            if v:
                out[f"shift_ceiling/{m}" + (f"/{split}" if split else "")] = sum(v) / len(v)
    return out


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
