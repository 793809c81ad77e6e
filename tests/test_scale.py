"""Scale check plumbing (issue #6): the 20-scene sheet and preset are valid and plan a full DAG,
and the memory watcher sees a child process's memory and passes its exit status through."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import lrf_env, snakemake_cmd


def test_memwatch_sees_a_child_allocation_and_passes_the_exit_code(tmp_path):
    child = ("import time; b = bytearray(300 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); "
             "time.sleep(1.5); raise SystemExit(3)")
    out = tmp_path / "mem.json"
    r = subprocess.run([sys.executable, "-m", "lrf.memwatch", "--interval", "0.1", "--out", str(out), "--",
                        sys.executable, "-c", child], capture_output=True, text=True, env=lrf_env())
    assert r.returncode == 3, r.stderr
    res = json.loads(out.read_text())
    assert res["returncode"] == 3
    assert res["peak_process_rss_mib"] >= 290, res
    assert res["peak_tree_rss_mib"] >= res["peak_process_rss_mib"]
    assert "bytearray" in res["peak_process_cmd"]
    assert "peak tree RSS" in r.stderr


@pytest.mark.slow
def test_scale_preset_plans_twenty_scenes(repo_dir, tmp_path):
    sheet = [line for line in (repo_dir / "config" / "scenes_scale.tsv").read_text().splitlines()
             if line and not line.startswith("#")][1:]
    assert len(sheet) == 20
    r = subprocess.run(snakemake_cmd(repo_dir, "-n", "--cores", "2", "--configfile", "config/presets/scale.yaml",
                                     "--quiet", "rules"),
                       cwd=repo_dir, capture_output=True, text=True, env=lrf_env())
    assert r.returncode == 0, r.stderr[-2000:]
    counts = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    assert counts.get("fit_field") == 20 and counts.get("evaluate") == 40, r.stdout


@pytest.mark.slow
def test_the_fine_tuning_chain_is_scheduled_first(repo_dir):
    """Rule priorities: SfM of the protocol scenes, stage 1, the `enc` latents and fields and
    stage 3 outrank the baselines; and no rule asks for more threads than a 2-core run's jobs
    use (a 2-thread job beside 1-thread ones waits until nothing else is ready)."""
    r = subprocess.run(snakemake_cmd(repo_dir, "-n", "-F", "--cores", "2"), cwd=repo_dir, capture_output=True,
                       text=True, env=lrf_env())
    assert r.returncode == 0, r.stderr[-2000:]
    jobs, cur = [], None
    for line in r.stdout.splitlines():
        if line.startswith("rule ") or line.startswith("localrule "):
            cur = {"rule": line.split()[-1].rstrip(":"), "priority": 0, "threads": 1, "wildcards": ""}
            jobs.append(cur)
        elif cur is not None and line.strip().startswith(("priority:", "threads:", "wildcards:")):
            k, v = line.strip().split(":", 1)
            cur[k] = v.strip() if k == "wildcards" else int(v)
    by = lambda rule: [j for j in jobs if j["rule"] == rule]  # noqa: E731
    assert by("stage1") and all(j["priority"] == 50 for j in by("stage1") + by("stage3"))
    for j in by("fit_field") + by("encode"):
        critical = "field=enc" in j["wildcards"] or "variant=taef2-enc" in j["wildcards"]
        assert j["priority"] == (50 if critical else 0), j
    assert all(j["priority"] == 50 for j in by("sfm") + by("correspondences"))
    assert all(j["priority"] == 0 for j in by("evaluate"))
    assert max(j["threads"] for j in jobs) == 1, [j for j in jobs if j["threads"] > 1]
