"""The driver: collect, tabulate, draw and write every output atomically."""
from __future__ import annotations

from pathlib import Path

from lrf.io import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text
from lrf.methods import describe, METHODS
from lrf.report.claims import check_claims, claim_numbers, claims_tables, selection_table, stage_tables
from lrf.report.collect import before_after_rows, collect_runs, consistency_selection, discover_scenes, ordered_methods, read_curve, read_json, Run, vae_dirs
from lrf.report.figures import figure_before_after, figure_field_curves, figure_finetune_curves, figure_metrics, figure_validation
from lrf.report.grids import grid_image
from lrf.report.html import html_page, Report, summary_md, tables_md
from lrf.report.tables import before_after_table, ceiling_table, cost_tables, csv_text, diagnosis_table, failure_table, group_tables, long_rows, overall_table, scene_tables, sfm_table, shift_ceiling_numbers, summary_numbers


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
    chosen: dict[str, int] = {}          # summary.json: the step each stage shipped
    consistency = None  # the configured VAE's stage 1 report, for the claims
    for vd in vdirs:
        tag = "" if len(vdirs) == 1 else f" ({vd.name})"
        c = read_json(vd / "stage1" / "consistency.json", rep.warnings)
        if c is not None:
            if len(vdirs) == 1:
                consistency = c
            rows = before_after_rows(c)
            stage_rows["stage1" + ("" if not tag else f"/{vd.name}")] = rows
            rep.tables.setdefault("stage1", []).extend(stage_tables(c, 1, tag) or [before_after_table(
                f"Stage 1{tag}: latent L1 at correspondences before/after fine-tuning the encoder", rows)])
            if rows and "consistency" not in rep.figures:
                png = figure_before_after(f"Stage 1{tag}: latent consistency (lower is better)",
                                          consistency_selection(rows))
                if png:
                    rep.figures["consistency"] = (f"Latent consistency before/after stage 1{tag}", png)
        a = read_json(vd / "stage3" / "alignment.json", rep.warnings)
        if a is not None:
            rows = before_after_rows(a)
            stage_rows["stage3" + ("" if not tag else f"/{vd.name}")] = rows
            rep.tables.setdefault("stage3", []).extend(stage_tables(a, 3, tag) or [before_after_table(
                f"Stage 3{tag}: decoding rendered latents before/after fine-tuning the decoder", rows)])
        for st, doc in (("stage1", c), ("stage3", a)):
            curves[f"{st}{tag}"] = read_curve(vd / st / "curve.csv", rep.warnings)
            add_selection(rep, doc, st, tag, "" if not tag else f"_{vd.name}", chosen)
    field_logs: dict[str, dict[str, object]] = {}
    for key in scenes:
        fdir = results / key / "fields"
        for log in sorted(fdir.glob("*/train_log.csv")) if fdir.is_dir() else []:
            df = read_curve(log, rep.warnings)
            if df is not None:
                field_logs.setdefault(log.parent.name, {})[key] = df

    rep.summary = summary_numbers(runs, methods, stage_rows)
    rep.summary.update(chosen)
    rep.tables["failures"] = [failure_table(runs)]
    claims = check_claims(runs, scenes, methods, protocol, consistency)
    rep.tables["claims"] = claims_tables(claims)
    rep.summary.update(claim_numbers(claims))
    rep.tables["overall"] = [overall_table(runs, methods, rep.summary)]
    rep.tables["overall"][0].note += " Methods: " + "; ".join(describe(m) for m in methods) + "."
    rep.tables["dataset"] = group_tables(runs, methods, "dataset")
    if any(r.split != "-" for r in runs):
        rep.tables["split"] = group_tables(runs, methods, "split")
    rep.tables["scene"] = scene_tables(runs, scenes, methods)
    rep.tables["cost"] = cost_tables(runs, scenes, methods)
    rep.tables["diagnosis"] = [diagnosis_table(runs, scenes, methods)]
    ceil = ceiling_table(runs, scenes, methods)
    if ceil is not None:
        rep.tables["diagnosis"].append(ceil)
    rep.summary.update(shift_ceiling_numbers(runs, methods))
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


def add_selection(rep: Report, doc: dict | None, stage: str, tag: str, suffix: str, chosen: dict) -> None:
    """A stage's checkpoint selection: its line (a one-row table) and its figure in the stage's section."""
    t = selection_table(doc, int(stage[-1]), tag)
    if t is None:
        return
    rep.tables.setdefault(stage, []).append(t)
    sel = doc["validation"]
    if isinstance(sel.get("chosen_step"), int):
        chosen[f"{stage}{suffix}/chosen_step"] = sel["chosen_step"]
    png = figure_validation(f"Stage {stage[-1]}{tag}: validation curve and the step shipped", sel)
    if png:
        rep.figures[f"validation_{stage}{suffix}"] = (f"Stage {stage[-1]}{tag}: checkpoint selection on validation "
                                                     f"views ({sel.get('criterion', '')})", png)


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
