"""scripts/gpu_check.sh --dry: the GPU check's whole path on the CPU at tiny sizes, and with it the
paper's VAE path end to end without its weights: a small randomly initialised diffusers
AutoencoderKL (4 latent channels, KL posterior) saved with save_pretrained goes through encode,
stage 1 (its KL term), latent fields, stage 3, evaluation and the report. No hub access."""
from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, lrf_env


pytestmark = pytest.mark.slow  # the GPU check's whole pipeline, dry, on the CPU

def test_gpu_check_dry_runs_the_autoencoderkl_path_end_to_end(shared_dir, tmp_path):
    out = tmp_path / "check"
    env = dict(lrf_env(shared_dir), PYTHON=sys.executable)
    p = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry", "--out", str(out)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    print(p.stdout)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:] + (
        (out / "workflow.log").read_text()[-4000:] if (out / "workflow.log").exists() else "")
    assert p.stdout.rstrip().splitlines()[-1] == f"summary: {out}/summary.json"
    doc = json.loads((out / "summary.json").read_text())
    assert doc["ok"] and doc["dry"]
    assert doc["render_check"]["ok"] and doc["render_check"]["tol"] == 1e-4
    assert doc["fit"]["device"] == "cpu" and doc["fit"]["backend"] == "cpu" and doc["fit"]["it_per_s"] > 0
    assert {"versions", "render_check", "config", "workflow"} <= set(doc["phases"])
    assert doc["versions"]["gsplat"] == "1.5.3"
    # the diffusers-kl path, stage by stage
    cfg = __import__("yaml").safe_load((out / "config.yaml").read_text())
    assert cfg["vae"]["kind"] == "diffusers-kl" and doc["vae"]["random_init"]
    from lrf.encode import load_latents
    from lrf.vae import build_autoencoder

    vae = build_autoencoder("diffusers-kl", out / "vae")
    assert type(vae.model).__name__ == "AutoencoderKL" and vae.latent_channels == 4
    import torch

    assert vae.encode_distribution(torch.rand(1, 3, 16, 16))[1] is not None  # a posterior: stage 1 takes its KL
    run = out / "run" / "results"
    latents = sorted(glob.glob(str(run / "*" / "*" / "latents" / "*.safetensors")))
    assert len(latents) == 4  # 2 scenes x (pretrained, stage-1 encoder)
    for f in latents:
        assert load_latents(Path(f))[1]["channels"] == 4
    name = cfg["vae"]["name"]
    assert (run / "vae" / name / "stage1" / "encoder.safetensors").is_file()
    assert (run / "vae" / name / "stage3" / "decoder.safetensors").is_file()
    metrics = glob.glob(str(run / "*" / "*" / "eval" / "*" / "metrics.json"))
    assert len(metrics) == 2 * len(cfg["methods"])
    for m in metrics:
        assert json.loads(Path(m).read_text())["mean"]["psnr"] > 0
    assert "### Overall" in p.stdout and "| full |" in p.stdout
