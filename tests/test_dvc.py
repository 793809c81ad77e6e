"""DVC on top of Snakemake, for real: repro, push, lose cache and outputs, pull, same hashes;
then a second run with other settings and `dvc metrics diff` between the two."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, lrf_env, make_workflow

pytestmark = pytest.mark.slow  # dvc repro / push / pull of a small pipeline

FERN = {"dataset": "llff", "scene": "fern", "format": "llff", "path": "llff/fern", "images": "images_8",
        "poses": "given", "max_side": 128, "max_images": 6}
TINY_FIELD = {"steps": 30, "refine_start": 10, "refine_stop": 20, "refine_every": 10, "reset_every": 100000,
              "max_gaussians": 3000, "checkpoint_every": 1000, "log_every": 10, "background": "mean"}


def sh(cmd: list[str], cwd: Path, env: dict, timeout: float = 600) -> str:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def set_field_steps(wf: Path, n: int) -> None:
    cfg_path = wf / "config" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["field"]["latent"]["steps"] = n
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))


@pytest.fixture(scope="module")
def dvc_repo(shared_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("dvc")
    wf = make_workflow(base / "repo", [FERN], shared_dir, methods=["vae-ceiling", "vanilla"],
                       field={"latent": dict(TINY_FIELD), "rgb": dict(TINY_FIELD)}, evaluate={"lpips": ["alex"]})
    shutil.copy2(REPO / "dvc.yaml", wf / "dvc.yaml")
    shutil.copytree(REPO / "lrf", wf / "lrf", ignore=shutil.ignore_patterns("__pycache__"))
    (wf / ".gitignore").write_text("results/*\n!results/report/\nresults/report/*\n!results/report/summary.json\n"
                                   ".snakemake/\n__pycache__/\n")
    env = lrf_env(shared_dir)
    env["PYTHONPATH"] = str(wf)  # the copy's lrf, which DVC hashes as a dependency
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    sh(["git", "init", "-q"], wf, env)
    sh(["dvc", "init", "-q"], wf, env)
    sh(["dvc", "config", "core.analytics", "false"], wf, env)
    sh(["dvc", "remote", "add", "-d", "local", str(base / "remote")], wf, env)
    return wf, env, git


def test_dvc_push_pull_roundtrip_and_metrics_diff(dvc_repo):
    wf, env, git = dvc_repo
    out = sh(["dvc", "repro"], wf, env)
    store = wf / "results" / "store"
    before = hashes(store)
    assert any(k.startswith("fields/llff/fern/vanilla") for k in before), before
    assert "scenes/llff/fern/points.npz" in before
    lock = yaml.safe_load((wf / "dvc.lock").read_text())
    outs = {o["path"]: o for o in lock["stages"]["pipeline"]["outs"]}
    assert outs["results/store"]["md5"].endswith(".dir") and "results/report/summary.json" in outs
    deps = {Path(d["path"]).name for d in lock["stages"]["pipeline"]["deps"]}
    assert {"data", "weights", "lrf", "config"} <= deps, deps  # the scene data is versioned too

    sh(["dvc", "push"], wf, env)
    shutil.rmtree(wf / ".dvc" / "cache")
    shutil.rmtree(store)
    sh(["dvc", "pull"], wf, env)
    assert hashes(store) == before

    metrics = sh(["dvc", "metrics", "show", "--json"], wf, env)
    assert "psnr/vanilla" in metrics
    sh(git + ["add", "-A"], wf, env)
    sh(git + ["commit", "-qm", "run 1"], wf, env)
    set_field_steps(wf, 60)
    sh(["dvc", "repro"], wf, env)
    diff = sh(["dvc", "metrics", "diff", "--md"], wf, env)
    print(diff)
    assert "psnr/vanilla" in diff and "fit_seconds/vanilla" in diff, diff
