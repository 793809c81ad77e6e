"""Faults and repeatability: a fit killed with SIGKILL resumes from its checkpoint and ends
bit-identical to an uninterrupted run; two workflow runs with one config give byte-identical
metrics files; the pipeline's steps run with network sockets blocked."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import lrf_env, make_workflow, snakemake_cmd

pytestmark = pytest.mark.slow  # killed and resumed runs, end to end

CFG = {"steps": 120, "refine_start": 20, "refine_stop": 80, "refine_every": 20, "reset_every": 100000,
       "max_gaussians": 4000, "checkpoint_every": 20, "log_every": 20, "background": "mean"}


def _fit_cmd(scene: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "lrf.fit", "--scene", str(scene), "--targets", "rgb", "--downscale", "2",
            "--cfg", json.dumps(CFG), "--threads", "1", "--out", str(out)]


def _tensors(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_sigkill_during_fit_then_rerun_is_exact(given_runs, tmp_path, shared_dir):
    run = given_runs("fern")
    scene = run.out / "scene.json"
    env = lrf_env(shared_dir)
    ref = tmp_path / "uninterrupted"
    subprocess.run(_fit_cmd(scene, ref), env=env, check=True, capture_output=True, timeout=600)

    out = tmp_path / "killed"
    p = subprocess.Popen(_fit_cmd(scene, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for a checkpoint past the first densification
        meta = out / "ckpt.json"
        if meta.exists() and json.loads(meta.read_text()).get("step", 0) >= 40:
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / "field.safetensors").exists(), "killed too late: the run had already finished"
    done = subprocess.run(_fit_cmd(scene, out), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resum" in done.stderr.lower(), done.stderr[-2000:]
    a, b = _tensors(ref / "field.safetensors"), _tensors(out / "field.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k


# --------------------------------------------------------------------------- SIGKILL during VAE tuning
VAE_SPEC = json.dumps({"kind": "taef2", "source": "{weights}/taef2"})


def _kill_after_checkpoint(cmd: list[str], out: Path, final: str, min_step: int, env: dict) -> None:
    """Start cmd, SIGKILL it once its checkpoint has reached `min_step`, before `final` exists."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and p.poll() is None:
            meta = out / "ckpt.json"
            try:
                if (out / "ckpt.safetensors").exists() and json.loads(meta.read_text()).get("step", 0) >= min_step:
                    break
            except (OSError, ValueError):  # not written yet, or caught mid-rename
                pass
            time.sleep(0.02)
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert p.returncode == -signal.SIGKILL, f"the run ended by itself (rc {p.returncode}) before it was killed"
    assert not (out / final).exists(), "killed too late: the run had already finished"


def _kill_rerun_compare(cmd, ref: Path, out: Path, final: str, env: dict, min_step: int = 4) -> str:
    """An uninterrupted run beside one killed after a checkpoint; rerun the killed one to the end
    with the same command; the final weights and validation rows must be bit-identical. Returns the
    rerun's stderr."""
    whole = subprocess.Popen(cmd(ref), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _kill_after_checkpoint(cmd(out), out, final, min_step, env)
    _, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err[-2000:]
    done = subprocess.run(cmd(out), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    import torch

    a, b = _tensors(ref / final), _tensors(out / final)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert not (out / "ckpt.safetensors").exists()  # consumed: the finished run cleans up
    import pandas as pd  # checkpoint selection (validate_every): the same validations, so the same choice

    va, vb = (pd.read_csv(d / "val.csv").drop(columns="seconds") for d in (ref, out))
    assert va["step"].tolist() == [0, 3, 6, 9, 10] and va.equals(vb)
    return done.stderr


@pytest.fixture(scope="module")
def small_fern(data_dir, tmp_path_factory) -> Path:
    """Five fern views at 128x96 with SfM points from the given poses: each stage's before/after
    measurement encodes every view, so small views keep a run near 10 s."""
    from conftest import GEOMETRY_SPECS, select_cameras, subset
    from lrf.scene.loaders import load_scene
    from lrf.scene.prepare import prepare_scene
    from lrf.sfm import run_sfm

    spec = GEOMETRY_SPECS["fern"]
    base = tmp_path_factory.mktemp("small-fern")
    scene = load_scene(spec.fmt, data_dir / spec.rel, spec.dataset, spec.name, spec.images)
    prepared = prepare_scene(subset(scene, select_cameras(scene, spec)[:5]), base / "prepared", max_side=128)
    run_sfm(prepared, base / "sfm", poses="given", max_features=1024)
    return base / "sfm" / "scene.json"


def _stage_cmd(stage: str, shared_dir: Path, cfg: dict, *inputs):
    """out -> the `python -m lrf.finetune.<stage>` command line of both SIGKILL tests."""
    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", f"lrf.finetune.{stage}", "--vae", VAE_SPEC, "--weights-dir",
                str(shared_dir / "weights"), *map(str, inputs), "--cfg", json.dumps(cfg), "--seed", "0",
                "--threads", "1", "--out", str(out)]
    return cmd


def test_sigkill_during_stage1_then_rerun_is_exact(small_fern, tmp_path, shared_dir):
    """`python -m lrf.finetune.stage1` on real fern views and their SfM correspondences."""
    from lrf import correspondences as corr
    from lrf.scene.model import Scene

    scene_json = small_fern
    m, pairs = corr.mine(Scene.load(scene_json))
    corr.write(tmp_path / "corr", m, pairs, corr.summarize(Scene.load(scene_json), m, pairs))
    cfg = {"steps": 10, "crop": 48, "batch": 1, "w_lpips": 0.0, "corr_margin": 6, "checkpoint_every": 2,
           "log_every": 1, "validate_every": 3}

    cmd = _stage_cmd("stage1", shared_dir, cfg, "--scene", scene_json, "--corr", tmp_path / "corr")
    err = _kill_rerun_compare(cmd, tmp_path / "whole", tmp_path / "killed", "encoder.safetensors", lrf_env(shared_dir))
    assert "[stage1] resuming from step" in err, err[-2000:]


def test_sigkill_during_stage3_then_rerun_is_exact(small_fern, tmp_path, shared_dir):
    """`python -m lrf.finetune.stage3` on real fern views and a latent field seeded from its SfM points."""
    import numpy as np

    from lrf.field import GaussianField, save_field
    from lrf.scene.model import Scene

    scene_json = small_fern
    pts = Scene.load(scene_json).points
    feats = np.random.default_rng(0).standard_normal((len(pts), 32)).astype(np.float32)
    save_field(GaussianField.from_points(pts.xyz, feats, init_opacity=0.5), tmp_path / "field.safetensors")
    cfg = {"steps": 10, "crop": 32, "batch": 2, "w_lpips": 0.0, "backend": "cpu", "checkpoint_every": 2,
           "log_every": 1, "validate_every": 3}

    cmd = _stage_cmd("stage3", shared_dir, cfg, "--scene", scene_json, "--field", tmp_path / "field.safetensors")
    err = _kill_rerun_compare(cmd, tmp_path / "whole", tmp_path / "killed", "decoder.safetensors", lrf_env(shared_dir))
    assert "[stage3] resuming from step" in err, err[-2000:]


SITE = '''
import socket
def _blocked(*a, **k):
    raise OSError("network blocked by the lrf test")
class _S(socket.socket):
    def connect(self, addr):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _blocked()
        return super().connect(addr)
    def connect_ex(self, addr):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _blocked()
        return super().connect_ex(addr)
socket.socket = _S
socket.create_connection = _blocked
socket.getaddrinfo = _blocked
'''


def test_steps_run_with_sockets_blocked(given_runs, tmp_path, shared_dir):
    """encode, fit, evaluate (LPIPS included) and the download step's offline error, no network."""
    run = given_runs("fern")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    env = lrf_env(shared_dir)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    from lrf.scene.model import Scene

    sc = Scene.load(run.out / "scene.json")
    sc.cameras[len(sc.cameras) // 2].split = "test"  # the subset has no test view of its own
    scene = tmp_path / "scene" / "scene.json"
    sc.save(scene)
    vae = json.dumps({"kind": "taef2", "source": "{weights}/taef2"})
    w = str(shared_dir / "weights")
    lat = tmp_path / "lat.safetensors"
    steps = [["lrf.encode", "--scene", str(scene), "--vae", vae, "--weights-dir", w, "--threads", "1", "--out", str(lat)],
             ["lrf.fit", "--scene", str(scene), "--targets", "latents", str(lat), "--cfg",
              json.dumps(dict(CFG, steps=20)), "--threads", "1", "--out", str(tmp_path / "field")],
             ["lrf.evaluate", "--scene", str(scene), "--kind", "latent", "--method", "vanilla", "--field",
              str(tmp_path / "field" / "field.safetensors"), "--vae", vae, "--weights-dir", w, "--threads", "1",
              "--out", str(tmp_path / "eval")]]
    for s in steps:
        p = subprocess.run([sys.executable, "-m", *s], env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{s[0]} needed the network or failed:\n{p.stderr[-2000:]}"
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["mean"]["lpips_vgg"] > 0
    p = subprocess.run([sys.executable, "-m", "lrf.download", "--what", "weights", "--data-dir", str(tmp_path / "d"),
                        "--weights-dir", str(tmp_path / "w")], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith("ERROR download: "), p.stderr


# --------------------------------------------------------------------------- repeatability
FERN = {"dataset": "llff", "scene": "fern", "format": "llff", "path": "llff/fern", "images": "images_8",
        "poses": "given", "max_side": 128, "max_images": 6}
TINY_FIELD = {"steps": 30, "refine_start": 10, "refine_stop": 20, "refine_every": 10, "reset_every": 100000,
              "max_gaussians": 3000, "checkpoint_every": 1000, "log_every": 10, "background": "mean"}
REPEAT_METHODS = ("vanilla",)  # prepare, SfM, encode, fit, render, decode, LPIPS; the ceiling adds 2x10 s


def _digests(results: Path) -> dict[str, str]:
    return {str(p.relative_to(results)): hashlib.sha256(p.read_bytes()).hexdigest()[:12]
            for p in sorted(results.rglob("*")) if p.is_file() and "logs" not in p.parts}


def test_two_runs_give_identical_metrics_files(shared_dir, tmp_path):
    """The same config and seed in two separate copies of the workflow, run side by side (prepare,
    SfM with given poses, encode, fit, evaluate): the metrics.json files are byte-identical, and
    the wall-clock numbers, which cannot be, are in timing.json beside them."""
    targets = [f"results/llff/fern/eval/{m}/metrics.json" for m in REPEAT_METHODS]
    procs = []
    for name in ("a", "b"):
        wf = make_workflow(tmp_path / name, [FERN], shared_dir, methods=list(REPEAT_METHODS),
                           field={"latent": dict(TINY_FIELD), "rgb": dict(TINY_FIELD)}, evaluate={"lpips": ["alex"]})
        procs.append((wf, subprocess.Popen(snakemake_cmd(wf, "--cores", "1", *targets), cwd=wf, env=lrf_env(shared_dir),
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for wf, p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    (a, _), (b, _) = procs
    for t in targets:
        ta, tb = (a / t).read_bytes(), (b / t).read_bytes()
        if ta != tb:  # name every upstream file that already differed, to say where it starts
            da, db = _digests(a / "results"), _digests(b / "results")
            diff = sorted(k for k in da.keys() | db.keys() if da.get(k) != db.get(k))
            pytest.fail(f"{t} differs between two identical runs; differing files: {diff}")
        doc = json.loads(ta)
        assert doc["views"] >= 1 and doc["mean"]["psnr"] > 10 and "lpips_alex" in doc["mean"]
        assert not {"render_ms", "total_ms", "seconds"} & (set(doc["mean"]) | set(doc.get("fit") or {})), doc
        timing = json.loads((a / t).with_name("timing.json").read_text())
        assert timing["mean"]["total_ms"] > 0 and len(timing["per_view"]) == doc["views"]
    assert json.loads((a / targets[-1]).read_text())["fit"]["steps"] == TINY_FIELD["steps"]
    assert json.loads((a / targets[-1]).with_name("timing.json").read_text())["fit"]["seconds"] > 0
