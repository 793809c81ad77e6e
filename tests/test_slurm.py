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
