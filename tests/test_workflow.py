"""The real Snakemake workflow, run on copies of Snakefile/workflow/config in a temporary folder.

All Snakemake invocations of this module start together (one module fixture) so their
start-up times overlap: a real run with a good and a bad scene, a dry run, and dry runs with
configs or sheets that break the schemas.
"""
from __future__ import annotations

import csv
import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from conftest import _copy_scene, lrf_env, make_workflow, snakemake_cmd

FERN = {"dataset": "llff", "scene": "fern", "format": "llff", "path": "llff/fern", "images": "images_8",
        "poses": "given", "max_side": 192, "max_images": 6}


@dataclass
class Ran:
    wf: Path
    rc: int
    out: str   # stdout + stderr
    err: str   # stderr only
    seconds: float


@pytest.fixture(scope="module")
def runs(shared_dir, data_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("workflow")
    # the bad scene: a copy of fern (8 images) with one image overwritten by garbage
    bad_root = _copy_scene(data_dir / "llff/fern", base / "data" / "badfern", "images_8", keep=8)
    bad_image = bad_root / "images_8" / "image003.png"
    bad_image.write_bytes(b"\x89PNG garbage " * 50)
    bad = {**FERN, "scene": "badfern", "path": str(bad_root)}

    jobs = {
        # explicit targets: prepare -> sfm -> correspondences, and the report over the cheapest
        # method (the VAE ceiling: no field, no tuning); the bad scene fails, so the report comes
        # from the workflow's onerror hook, as it would after any --keep-going run with a failure
        "real": (make_workflow(base / "real", [FERN, bad], shared_dir, methods=["vae-ceiling"],
                               evaluate={"lpips": ["alex"]}),
                 ["--cores", "2", "--keep-going", "results/llff/fern/correspondences/summary.json",
                  "results/llff/badfern/correspondences/summary.json", "results/report/summary.json"]),
        "dry": (make_workflow(base / "dry", [FERN], shared_dir), ["-n", "--cores", "2"]),  # the default target
        "unknown_key": (make_workflow(base / "unknown_key", [FERN], shared_dir, bogus_option=1), ["-n", "--cores", "1"]),
        "space": (make_workflow(base / "space", [FERN, {**FERN, "scene": "my fern"}], shared_dir, select=["llff/fern"]),
                  ["-n", "--cores", "1"]),
    }
    procs = {}
    for name, (wf, args) in jobs.items():
        so, se = open(wf / "_stdout.txt", "w"), open(wf / "_stderr.txt", "w")
        procs[name] = (subprocess.Popen(snakemake_cmd(wf, *args), cwd=wf, env=lrf_env(shared_dir), stdout=so,
                                        stderr=se), so, se, wf, time.perf_counter())
    result = {}
    for name, (p, so, se, wf, t0) in procs.items():
        try:
            rc = p.wait(timeout=240)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
        so.close(); se.close()
        err = (wf / "_stderr.txt").read_text()
        result[name] = Ran(wf, rc, (wf / "_stdout.txt").read_text() + err, err, time.perf_counter() - t0)
    result["bad_image"] = bad_image.resolve()
    return result


@pytest.mark.slow
def test_good_scene_completes_bad_scene_fails(runs):
    r = runs["real"]
    assert r.rc != 0, r.out[-3000:]  # --keep-going: the bad scene fails the run, the good one finishes
    res = r.wf / "results" / "llff"
    for f in ("sfm/input/scene.json", "prepared/scene.json", "prepared/points.npz", "sfm/scene.json",
              "sfm/points.npz", "sfm/stats.json",
              "correspondences/matches.parquet", "correspondences/pairs.parquet", "correspondences/summary.json"):
        assert (res / "fern" / f).exists(), f
    stats = json.loads((res / "fern/sfm/stats.json").read_text())
    assert stats["scene"] == "llff/fern" and stats["images"] == stats["registered"] == 6
    assert stats["points"] >= 50 and stats["mean_reprojection_error_px"] < 1.5
    m = pd.read_parquet(res / "fern/correspondences/matches.parquet")
    pairs = pd.read_parquet(res / "fern/correspondences/pairs.parquet")
    assert len(m) > 100 and len(pairs) > 0 and m["image_j"].max() < 6
    assert json.loads((res / "fern/correspondences/summary.json").read_text())["matches"] == len(m)
    prepared = json.loads((res / "fern/prepared/scene.json").read_text())
    assert [(c["width"], c["height"]) for c in prepared["cameras"]] == [(192, 144)] * 6
    assert sum(c["split"] == "test" for c in prepared["cameras"]) == 1

    # SfM runs on the photos at sfm.max_side (fern's 504x378 as they are), the fields at 192 px
    sfm_scene = json.loads((res / "fern/sfm/scene.json").read_text())
    assert [(c["width"], c["height"]) for c in sfm_scene["cameras"]] == [(504, 378)] * 6
    assert stats["image_size"] == [504, 378]

    for f in ("sfm/input/scene.json", "sfm/scene.json", "prepared/scene.json"):
        assert not (res / "badfern" / f).exists(), f


@pytest.mark.slow
def test_bad_scene_error_is_one_line(runs):
    r = runs["real"]
    errors = [ln for ln in r.err.splitlines() if ln.startswith("ERROR ")]
    assert len(errors) == 1, r.err[-3000:]
    assert errors[0].startswith(f"ERROR llff/badfern: {runs['bad_image']}: cannot decode image"), errors[0]
    assert "Traceback" not in r.err


@pytest.mark.slow
def test_report_marks_the_failed_scene(runs):
    """--keep-going: the good scene's metrics are in the report, the bad scene is a FAILED row
    carrying its one-line error, in metrics.csv, tables.md and report.html."""
    r = runs["real"]
    rep = r.wf / "results" / "report"
    rows = list(csv.DictReader((rep / "metrics.csv").open(newline="")))
    good = [x for x in rows if x["scene"] == "fern"]
    bad = [x for x in rows if x["scene"] == "badfern"]
    assert {x["status"] for x in good} == {"ok"} and {x["method"] for x in good} == {"vae-ceiling"}
    psnr = [float(x["value"]) for x in good if x["metric"] == "psnr"]
    assert len(psnr) == 1 and psnr[0] > 15, good
    error = f"ERROR llff/badfern: {runs['bad_image']}: cannot decode image"
    assert len(bad) == 1 and bad[0]["status"] == "failed" and bad[0]["error"].startswith(error), bad
    md = (rep / "tables.md").read_text()
    failed = md.split("### Failed or missing runs", 1)[1].split("###", 1)[0]
    assert "llff/badfern" in failed and "FAILED" in failed and error in failed and "llff/fern" not in failed
    assert error in (rep / "report.html").read_text()
    s = json.loads((rep / "summary.json").read_text())
    assert (s["runs_ok"], s["runs_failed"], s["scenes_failed"]) == (1, 1, 1)
    assert s["psnr/vae-ceiling"] == pytest.approx(psnr[0], abs=1e-5)


@pytest.mark.slow
def test_rerun_after_a_failure_redoes_the_report(runs):
    """The onerror report marks the failure, but it is not the report rule's output: a rerun
    schedules the report again (and with it whatever the failed scene still lacks)."""
    wf = runs["real"].wf
    assert (wf / "results" / "report" / "summary.json").exists()
    assert not (wf / "results" / "report" / ".complete").exists()
    for target in ([], ["report"]):  # the default target, and the rule (DVC's stage asks for it)
        r = subprocess.run(snakemake_cmd(wf, "-n", "--cores", "1", *target),
                           cwd=wf, env=lrf_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "rule report:" in r.stdout and "Nothing to be done" not in r.stdout, r.stdout[-2000:]
        assert "rule sfm_input:" in r.stdout  # the bad scene is tried again


@pytest.mark.slow
def test_logs_are_written(runs):
    logs = runs["real"].wf / "results" / "logs"
    for step in ("sfm_input", "sfm", "prepare", "correspondences"):
        text = (logs / step / "llff" / "fern.log").read_text()
        assert "llff/fern" in text and "ERROR" not in text
    bad_log = (logs / "sfm_input" / "llff" / "badfern.log").read_text()
    assert f"ERROR llff/badfern: {runs['bad_image']}" in bad_log


@pytest.mark.slow
def test_dry_run_lists_the_rules(runs):
    r = runs["dry"]
    assert r.rc == 0, r.out[-3000:]
    for rule in ("sfm_input", "sfm", "prepare", "correspondences"):
        assert f"rule {rule}:" in r.out
    assert "results/llff/fern/correspondences/summary.json" in r.out
    assert "results/llff/fern/sfm/stats.json" in r.out
    assert not (r.wf / "results").exists()  # a dry run writes nothing
    # `enc` decodes with stage 1's decoder, and stage 3 starts from it (lrf.methods)
    blocks = re.split(r"\n(?=rule \w+:)", r.out)
    enc_eval = [b for b in blocks if "rule evaluate:" in b and "eval/enc/metrics.json" in b]
    stage3 = [b for b in blocks if "rule stage3:" in b]
    assert enc_eval and stage3, r.out[-3000:]
    for b in enc_eval + stage3:
        inputs = next(line for line in b.splitlines() if line.strip().startswith("input:"))
        assert "results/vae/taef2/stage1/decoder.safetensors" in inputs, b


@pytest.mark.slow
def test_working_resolution_change_reuses_sfm(runs):
    """One SfM per scene: a new max_side in the scene sheet reruns `prepare` and what follows,
    never SfM or its input (their params do not include the working resolution)."""
    wf = runs["real"].wf
    sheet = wf / "config" / "test_scenes.tsv"
    text = sheet.read_text()
    sheet.write_text(text.replace("\t192\t", "\t128\t"))
    try:
        r = subprocess.run(snakemake_cmd(wf, "-n", "--cores", "1", "results/llff/fern/correspondences/summary.json"),
                           cwd=wf, env=lrf_env(), capture_output=True, text=True, timeout=120)
    finally:
        sheet.write_text(text)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "rule prepare:" in r.stdout and "rule correspondences:" in r.stdout, r.stdout[-2000:]
    assert "rule sfm:" not in r.stdout and "rule sfm_input:" not in r.stdout, r.stdout[-3000:]
    # and the unchanged sheet needs nothing at all
    r = subprocess.run(snakemake_cmd(wf, "-n", "--cores", "1", "results/llff/fern/correspondences/summary.json"),
                       cwd=wf, env=lrf_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Nothing to be done" in r.stdout + r.stderr, r.stdout[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("case,expected", [
    ("unknown_key", "Additional properties are not allowed ('bogus_option' was unexpected)"),  # config.yaml
    ("space", "'my fern' does not match"),                                                     # scene sheet
])
def test_schema_violations_fail_clearly(runs, case, expected):
    """Through Snakemake itself: the workflow refuses to start, with the offending value named."""
    r = runs[case]
    assert r.rc != 0
    assert "ValidationError" in r.out and expected in r.out, r.out[-3000:]
    assert "Traceback" not in r.out
    assert not (r.wf / "results").exists()


# In-process, with the same validate() and schema files the workflow uses (no Snakemake start-up).
def _config(repo_dir, **changes):
    import yaml

    cfg = yaml.safe_load((repo_dir / "config" / "config.yaml").read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        d = cfg
        for p in parents:
            d = d[p]
        d[leaf] = value
    return cfg


@pytest.mark.parametrize("preset", [None, "cross-dataset.yaml", "paper.yaml"])
def test_snakemake_lint_is_clean(repo_dir, shared_dir, preset):
    """The workflow catalog's conventions, as Snakemake's own linter checks them: no warning."""
    extra = ["--configfile", str(repo_dir / "config" / "presets" / preset)] if preset else []
    r = subprocess.run(snakemake_cmd(repo_dir, "--lint", *extra), cwd=repo_dir, env=lrf_env(shared_dir),
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Lints for" not in out, out[-3000:]
    assert "your workflow is in a good condition" in out, out[-3000:]


def test_repository_config_and_sheet_are_valid(repo_dir):
    from snakemake.utils import validate

    from lrf.scene.sheet import read_sheet

    validate(_config(repo_dir), str(repo_dir / "config/schemas/config.schema.yaml"))
    rows = read_sheet(repo_dir / "config/scenes.tsv")  # the workflow's own reader
    groups = _config(repo_dir)["groups"]
    assert all(k in rows for g in groups.values() for k in g), "a group names a scene the sheet lacks"


@pytest.mark.parametrize("changes,expected", [
    ({"seed": "zero"}, "'zero' is not of type 'integer'"),
    ({"sfm.max_features": 10}, "10 is less than the minimum of 128"),
    ({"sfm.matcher": "fastest"}, "'fastest' is not one of"),
    ({"correspondences.min_track": 1}, "1 is less than the minimum of 2"),
    ({"select": ["llff/../etc"]}, "is not valid under any of the given schemas"),
    ({"sfm.typo": 1}, "Additional properties are not allowed ('typo' was unexpected)"),
])
def test_config_schema_rejects(repo_dir, changes, expected):
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    with pytest.raises(WorkflowError) as ei:
        validate(_config(repo_dir, **changes), str(repo_dir / "config/schemas/config.schema.yaml"))
    assert expected in ei.value.args[0], ei.value.args[0][:500]


@pytest.mark.parametrize("change,expected", [
    ({"scene": "a..b"}, "'a..b' should not be valid under"),
    ({"dataset": ".."}, "'..' does not match"),
    ({"scene": "my fern"}, "'my fern' does not match"),
    ({"path": "llff/fern; rm -rf x"}, "does not match"),
    ({"format": "blender"}, "'blender' is not one of"),
    ({"max_images": 2}, "2 is less than the minimum of 3"),
    ({"colour": "red"}, "Additional properties are not allowed ('colour' was unexpected)"),
])
def test_sheet_schema_rejects(tmp_path, change, expected):
    import jsonschema

    from lrf.scene.sheet import read_sheet

    row = {**FERN, "downscale": None, **change}
    sheet = tmp_path / "scenes.tsv"
    sheet.write_text("\t".join(row) + "\n" + "\t".join("" if v is None else str(v) for v in row.values()) + "\n")
    with pytest.raises(jsonschema.ValidationError) as ei:
        read_sheet(sheet)
    msg = str(ei.value.message)
    assert expected in msg and msg.startswith(f"{sheet}: line 2 ("), msg[:500]


@pytest.mark.slow
def test_report_in_a_browser(runs, page, tmp_path):
    """The real run's report.html in headless chromium: no console errors, every <img> decoded
    (non-zero natural size), every in-page link lands on an element, every relative link on a file."""
    html = runs["real"].wf / "results" / "report" / "report.html"
    assert html.exists(), runs["real"].out[-2000:]
    page.goto(html.as_uri())
    page.wait_for_load_state("load")
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    imgs = page.eval_on_selector_all("img", "els => els.map(e => [e.alt, e.complete, e.naturalWidth, e.naturalHeight])")
    assert imgs, "the report shows no image"
    bad = [i for i in imgs if not (i[1] and i[2] > 0 and i[3] > 0)]
    assert not bad, bad
    links = page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))")
    for href in links:
        if href.startswith("#"):
            assert page.evaluate("id => !!(document.getElementById(id) || document.getElementsByName(id).length)",
                                 href[1:]), f"in-page link {href} goes nowhere"
        elif "://" not in href and not href.startswith(("mailto:", "data:")):
            assert (html.parent / href.split("#")[0]).exists(), f"link {href} names no file"
    assert page.errors == [], page.errors
    print(f"report.html: {len(imgs)} images ({', '.join(f'{w}x{h}' for _, _, w, h in imgs)}), "
          f"{len(links)} links resolved, no console errors; screenshot {tmp_path / 'report.png'}")
