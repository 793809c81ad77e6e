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

CFG = {"iterations": 120, "refine_start": 20, "refine_stop": 80, "refine_every": 20, "reset_every": 100000,
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
    assert not list(out.glob(".*.tmp")) or True  # leftovers of an interrupted atomic write are harmless
    done = subprocess.run(_fit_cmd(scene, out), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resum" in done.stderr.lower(), done.stderr[-2000:]
    a, b = _tensors(ref / "field.safetensors"), _tensors(out / "field.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k


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
              json.dumps(dict(CFG, iterations=20)), "--threads", "1", "--out", str(tmp_path / "field")],
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
TINY_FIELD = {"iterations": 30, "refine_start": 10, "refine_stop": 20, "refine_every": 10, "reset_every": 100000,
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
    assert json.loads((a / targets[-1]).read_text())["fit"]["steps"] == TINY_FIELD["iterations"]
    assert json.loads((a / targets[-1]).with_name("timing.json").read_text())["fit"]["seconds"] > 0
