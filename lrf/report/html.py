"""HTML and markdown: the Report held in memory and its self-contained page."""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field

from lrf.report.collect import Run
from lrf.report.tables import Table, table_html, table_md


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
.claims td{white-space:normal;text-align:left}
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


def html_page(rep: Report, title: str) -> str:
    e = html.escape
    s = rep.summary
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{e(title)}</h1>"]
    nav = [("claims", "the paper's claims"), ("overall", "overall"), ("dataset", "per dataset"), ("split", "in-domain vs cross-dataset"),
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
    if rep.tables.get("claims"):
        verdicts, per_scene = rep.tables["claims"]
        parts.append("<h2 id='claims'>The paper's claims</h2><div class='claims'>" + table_html(verdicts)
                     + f"<details><summary>per scene</summary>{table_html(per_scene)}</details></div>")
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
    parts += [_fig_html(*f) for n, f in rep.figures.items() if n.startswith("validation_stage1")]
    parts.append("<h2 id='stage3'>Stage 3: VAE–RF alignment</h2>")
    if "stage3" in rep.tables:
        parts.append("".join(table_html(t) for t in rep.tables["stage3"]))
    else:
        parts.append("<p class='note'>No stage 3 alignment.json found.</p>")
    parts += [_fig_html(*f) for n, f in rep.figures.items() if n.startswith("validation_stage3")]
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
    for name, key in (("Failures", "failures"), ("The paper's claims", "claims"), ("Overall", "overall"), ("Per dataset", "dataset"), ("In-domain vs cross-dataset", "split"),
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
    if rep.tables.get("claims"):
        out += [table_md(rep.tables["claims"][0])]
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
