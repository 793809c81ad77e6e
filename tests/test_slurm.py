"""The SLURM profile against a real SLURM (started by `.ci/slurm.sh up`, as CI does).

A small pipeline (prepare -> sfm -> correspondences on six fern images) runs once through
`snakemake --profile profiles/slurm` and once locally; the jobs must have gone through SLURM
(job ids in Snakemake's log and known to `scontrol`), and the outputs must equal the local run's.
Skipped when no SLURM answers, unless LRF_REQUIRE_SLURM=1 (CI), where that is a failure.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, lrf_env, make_workflow, snakemake_cmd

pytestmark = pytest.mark.slow  # pipelines through a real SLURM

FERN = {"dataset": "llff", "scene": "fern", "format": "llff", "path": "llff/fern", "images": "images_8",
        "poses": "given", "max_side": 160, "max_images": 6}
TARGET = "results/llff/fern/correspondences/summary.json"


def slurm_up() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and bool(re.search(r"idle|mixed|allocated", out.stdout))


@pytest.fixture(scope="module")
def slurm():
    if not slurm_up():
        if os.environ.get("LRF_REQUIRE_SLURM") == "1":
            pytest.fail("LRF_REQUIRE_SLURM=1 but no SLURM answers (bash .ci/slurm.sh up)")
        pytest.skip("no SLURM here (bash .ci/slurm.sh up starts one)")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_slurm_profile_runs_jobs_through_slurm(slurm, shared_dir, tmp_path):
    env = lrf_env(shared_dir)
    runs = {}
    for name, extra in (("slurm", ["--profile", "profiles/slurm"]), ("local", ["--cores", "2"])):
        wf = make_workflow(tmp_path / name, [FERN], shared_dir)
        shutil.copytree(REPO / "profiles", wf / "profiles")
        p = subprocess.run(snakemake_cmd(wf, *extra, TARGET), cwd=wf, env=env, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, f"{name} run failed:\n{p.stderr[-3000:]}"
        runs[name] = (wf, p.stdout + p.stderr)
    wf, log = runs["slurm"]
    ids = re.findall(r"SLURM jobid (\d+)", log) or re.findall(r"jobid[^0-9]{1,20}(\d+)", log)
    rules = set(re.findall(r"rule (prepare|sfm|correspondences)", log))
    assert rules == {"prepare", "sfm", "correspondences"}, log[-2000:]
    assert len(set(ids)) >= 3, f"no SLURM job ids in the log:\n{log[-3000:]}"
    for jid in set(ids):
        info = subprocess.run(["scontrol", "show", "job", jid], capture_output=True, text=True)
        assert info.returncode == 0 and "JobState=COMPLETED" in info.stdout, info.stdout + info.stderr
    print("SLURM job ids:", " ".join(sorted(set(ids), key=int)))
    # same outputs as the local run
    local = runs["local"][0]
    d = "results/llff/fern"
    assert _digest(wf / d / "prepared/images/image001.png") == _digest(local / d / "prepared/images/image001.png")
    # SfM: the same points and tracks; COLMAP may list a track's observations in another order and
    # round the last bit of a coordinate differently between processes
    a, b = np.load(wf / d / "sfm/points.npz"), np.load(local / d / "sfm/points.npz")
    assert np.array_equal(a["ids"], b["ids"]) and np.array_equal(a["rgb"], b["rgb"])
    np.testing.assert_allclose(a["xyz"], b["xyz"], rtol=0, atol=1e-9)
    def tracks(z):
        return sorted(zip(z["track_point"].tolist(), z["track_image"].tolist(), z["track_xy"].round(6).tolist()))
    assert tracks(a) == tracks(b)
    for rel in ("correspondences/matches.parquet", "correspondences/pairs.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(wf / d / rel), pd.read_parquet(local / d / rel),
                                      check_exact=False, rtol=1e-9)


TINY_FIELD = {"steps": 30, "refine_start": 10, "refine_stop": 20, "refine_every": 10, "checkpoint_every": 0}


@pytest.fixture(scope="module")
def fern_field(slurm, shared_dir, tmp_path_factory):
    """A workflow run locally up to fern's `vanilla` field (both GPU cases start from a copy of it:
    SLURM adds ~20 s a job, so the steps before run once, locally)."""
    import yaml

    wf = make_workflow(tmp_path_factory.mktemp("gpu") / "wf", [FERN], shared_dir, methods=["vanilla", "vanilla-ps"])
    shutil.copytree(REPO / "profiles", wf / "profiles")
    cfg = yaml.safe_load((wf / "config" / "config.yaml").read_text())
    cfg["field"]["latent"].update(TINY_FIELD)
    (wf / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    pre = subprocess.run(snakemake_cmd(wf, "--cores", "2", "results/llff/fern/fields/vanilla/field.json"), cwd=wf,
                         env=lrf_env(shared_dir), capture_output=True, text=True, timeout=600)
    assert pre.returncode == 0, pre.stderr[-3000:]
    return wf


@pytest.mark.parametrize("rule,target", [
    # encode (no GPU, rerun) and fit_field (GPU) go through SLURM
    ("fit_field", "results/llff/fern/fields/vanilla/field.json"),
    # the per-scene alignment, the longest per-scene step (encode and a CPU fit_field before it)
    ("align_scene", "results/llff/fern/align/vanilla-ps/align.json"),
])
def test_gpu_rule_requests_a_gpu_and_fails_without_cuda(fern_field, shared_dir, tmp_path, rule, target):
    """resources.<rule>.gpu = 1: the profile's sbatch call asks for the GPU (--gpus=1, SLURM's
    TresPerJob gres:gpu:1), jobs of other rules ask for none, and the job, which finds no CUDA
    device (CI's node has one fake GPU), fails with one ERROR line instead of running on the CPU."""
    import yaml

    wf = tmp_path / "gpu"
    shutil.copytree(fern_field, wf, symlinks=True)
    cfg = yaml.safe_load((wf / "config" / "config.yaml").read_text())
    key = "align" if rule == "align_scene" else rule   # the resources entry is named after the step
    cfg["resources"].setdefault(key, {})["gpu"] = 1
    (wf / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    if rule == "fit_field":   # the GPU job must write it anew (and cannot)
        (wf / target).unlink()
    p = subprocess.run(snakemake_cmd(wf, target, "--profile", "profiles/slurm", "--verbose", "--forcerun", "encode"),
                       cwd=wf, env=lrf_env(shared_dir), capture_output=True, text=True, timeout=900)
    log = p.stdout + p.stderr
    assert p.returncode != 0, "the GPU job ran without a GPU:\n" + log[-3000:]
    calls = [ln.strip() for ln in log.splitlines() if "sbatch call:" in ln]
    by_rule = {}
    for c in calls:
        m = re.search(r"--comment[= ]'?\"?rule_(\w+?)_wildcards", c) or re.search(r"rule_(\w+?)_wildcards", c)
        by_rule.setdefault(m.group(1) if m else "?", []).append(c)
    assert rule in by_rule, f"no {rule} submission:\n" + "\n".join(calls)
    assert all("--gpus=1" in c for c in by_rule[rule]), by_rule[rule]
    others = [c for r, cs in by_rule.items() if r != rule for c in cs]
    assert "encode" in by_rule and not any("--gpus" in c for c in others), others
    call = by_rule[rule][0]
    print(f"sbatch call ({rule}):", re.sub(r" --wrap=.*", " --wrap=...", call.split("sbatch call:", 1)[1].strip()))
    # the job as SLURM recorded it
    jid = re.search(r"Job \d+ has been submitted with SLURM jobid (\d+)[^\n]*\n?", log[log.index(call):])
    assert jid, log[-3000:]
    info = subprocess.run(["scontrol", "show", "job", jid.group(1)], capture_output=True, text=True).stdout
    tres = re.search(r"TresPerJob=(\S+)", info)
    assert tres and tres.group(1) == "gres:gpu:1", info
    assert re.search(r"JobState=FAILED", info), info
    print(f"scontrol show job {jid.group(1)}:", re.search(r"JobState=\S+", info).group(0), tres.group(0))
    # one ERROR line, the one a scene prints for bad input, and no output
    step_log = wf / re.search(rf"rule {rule}:.*?\n\s+log: (\S+)", log, re.S).group(1)
    errors = [ln for ln in step_log.read_text().splitlines() if ln.startswith("ERROR")]
    assert len(errors) == 1 and errors[0].startswith(
        "ERROR llff/fern: gsplat: no CUDA device is visible, but this step must run on 'cuda'"), step_log.read_text()
    assert "Traceback" not in step_log.read_text()
    print(errors[0])
    assert not (wf / target).exists()
