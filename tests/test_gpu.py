"""GPU readiness on a machine without one: gsplat is used on CUDA or the step stops with one line.

CUDA is faked (torch.cuda.is_available -> True) and gsplat made unimportable (sys.modules entry
None) or its device check stubbed; the real no-GPU case (`--device cuda` on this machine) is
the one a SLURM job without its GPU hits.
"""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from conftest import REPO, lrf_env


def _tiny_scene(tmp_path):
    """A one-camera scene.json (no image: every check here runs before images are read)."""
    from lrf.scene.model import Camera, Scene

    K = np.array([[20.0, 0, 16], [0, 20.0, 12], [0, 0, 1]])
    cam = Camera("a.png", "a.png", 32, 24, K, np.eye(4))
    path = tmp_path / "scene.json"
    Scene("ds", "sc", [cam], None, tmp_path).save(path)
    return path


@pytest.fixture
def fake_cuda_no_gsplat(monkeypatch):
    from lrf.render import gsplat_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "gsplat", None)  # `import gsplat` raises ImportError
    monkeypatch.setattr(gsplat_backend, "_PROBLEMS", {})


def select(backend: str, device: str, who: str = "", renders: bool = True):
    """A step's resolution, as lrf.cli.start_step does it: the device, then the rasteriser."""
    from lrf.device import resolve_device
    from lrf.render import resolve_backend

    dev = resolve_device(device, who, renders)
    return (resolve_backend(backend, dev, who) if renders else None), dev


def test_auto_on_cuda_without_gsplat_is_an_error_not_a_warning(fake_cuda_no_gsplat):
    from lrf.render import GsplatError, resolve_backend

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would be the old silent fallback
        with pytest.raises(GsplatError, match=r"^gsplat: cannot import it \(ModuleNotFoundError"):
            resolve_backend("auto", torch.device("cuda"))
        with pytest.raises(GsplatError) as e:
            select("auto", "auto", who="llff/fern")
    msg = str(e.value)
    assert msg.startswith("llff/fern: gsplat: cannot import it") and "\n" not in msg
    assert "backend: cpu" in msg
    with pytest.raises(GsplatError, match="^llff/fern: gsplat: "):
        select("gsplat", "cuda", who="llff/fern")
    # asked for explicitly, the pure-PyTorch rasterizer runs on the GPU
    assert select("cpu", "auto") == ("cpu", torch.device("cuda"))
    assert select("cpu", "cuda") == ("cpu", torch.device("cuda"))
    # steps that only run the VAE need no gsplat
    assert select("auto", "cuda", renders=False)[1] == torch.device("cuda")
    # a trainer given `auto` (library use) resolves through the same function
    from lrf.device import resolve_device

    assert resolve_device("auto") == torch.device("cuda")


def test_stub_device_check_reason_is_passed_through(monkeypatch):
    import lrf.render as render

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(render, "gsplat_problem", lambda dev: "gsplat: no CUDA kernels: it found no CUDA toolkit")
    with pytest.raises(render.GsplatError, match="^ds/sc: gsplat: no CUDA kernels: it found no CUDA toolkit; "):
        select("auto", "auto", who="ds/sc")
    monkeypatch.setattr(render, "gsplat_problem", lambda dev: None)
    assert select("auto", "auto") == ("gsplat", torch.device("cuda"))


def test_cpu_without_a_gpu_request_and_bad_settings():
    from lrf.cli import InputError

    if torch.cuda.is_available():
        pytest.skip("a machine with a GPU")
    assert select("auto", "auto") == ("cpu", torch.device("cpu"))
    assert select("cpu", "cpu") == ("cpu", torch.device("cpu"))
    with pytest.raises(InputError, match="^s: gsplat: backend 'gsplat' renders on CUDA only"):
        select("gsplat", "auto", who="s")
    with pytest.raises(InputError, match="^s: backend: unknown 'tpu'"):
        select("tpu", "auto", who="s")
    with pytest.raises(InputError, match="^s: gsplat: no CUDA device is visible, but this step must run on 'cuda'"):
        select("auto", "cuda", who="s")
    with pytest.raises(InputError, match="^s: cuda: no CUDA device is visible"):
        select("auto", "cuda", who="s", renders=False)


FAKE = ("import sys, torch; torch.cuda.is_available = lambda: True; sys.modules['gsplat'] = None; "
        "from lrf.{mod} import main; raise SystemExit(main({argv!r}))")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=lrf_env(), capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_steps_print_one_error_line(tmp_path):
    """The CLI steps: a GPU job without a GPU, and CUDA without gsplat, each give one ERROR line."""
    if torch.cuda.is_available():
        pytest.skip("a machine with a GPU")
    scene = _tiny_scene(tmp_path)
    fit = ["--scene", str(scene), "--targets", "rgb", "--out", str(tmp_path / "f")]
    cases = {
        # CUDA visible, gsplat not importable: backend auto must not fall back
        "fit_no_gsplat": (FAKE.format(mod="fit", argv=fit), "ERROR ds/sc: gsplat: cannot import it (ModuleNotFoundError"),
        # the rule asked for a GPU (resources gpu > 0) and there is none: no quiet CPU run
        "fit_no_gpu": (FAKE.replace("torch.cuda.is_available = lambda: True; ", "")
                       .format(mod="fit", argv=fit + ["--device", "cuda"]),
                       "ERROR ds/sc: gsplat: no CUDA device is visible, but this step must run on 'cuda'"),
        "encode_no_gpu": (FAKE.replace("torch.cuda.is_available = lambda: True; ", "").format(
            mod="encode", argv=["--scene", str(scene), "--vae", json.dumps({"kind": "taef2", "source": "x"}),
                                "--weights-dir", str(tmp_path), "--device", "cuda", "--out", str(tmp_path / "l.st")]),
                          "ERROR ds/sc: cuda: no CUDA device is visible"),
    }
    for name, (code, want) in cases.items():
        p = _run(code)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 1, (name, p.stderr)
        assert len(lines) == 1 and lines[0].startswith(want), (name, p.stderr)
        assert "Warning" not in p.stderr and "Traceback" not in p.stderr
        print(f"{name}: {lines[0]}")
    assert not (tmp_path / "f" / "field.safetensors").exists()


def test_load_vae_on_missing_cuda_is_one_line(tmp_path):
    """Stages 1 and 3 get device cuda from a GPU request; load_vae stops them in one line."""
    from lrf.cli import InputError
    from lrf.vae.factory import load_vae

    if torch.cuda.is_available():
        pytest.skip("a machine with a GPU")
    with pytest.raises(InputError, match="^vae taef2: cuda: no CUDA device is visible"):
        load_vae({"kind": "taef2", "source": str(tmp_path)}, tmp_path, "cuda")


@pytest.mark.slow
def test_cpu_path_never_imports_gsplat(tmp_path):
    """A CPU render, step resolution and the version report leave gsplat (and its CUDA parts) unimported."""
    code = """
import json, sys, torch
from lrf.bench import make_scene
from lrf.cli import start_step, step_parser
from lrf.gpu import versions
from lrf.render import rasterize
import lrf.fit, lrf.evaluate, lrf.encode
s = make_scene(50, 4, 16, 12, seed=0)
out = rasterize(s["means"], s["quats"], s["scales"], s["opacities"], s["features"], s["viewmat"], s["K"], 16, 12,
                backend="auto")
out.image.sum().backward() if out.image.requires_grad else None
step = start_step(step_parser("x", renders=True).parse_args(["--scene", "s.json", "--out", "o"]), renders=True)
assert (step.backend, step.device) == ("cpu", torch.device("cpu"))
v = versions()
print(json.dumps({"gsplat_modules": sorted(m for m in sys.modules if m.startswith("gsplat")), "versions": v}))
"""
    if torch.cuda.is_available():
        pytest.skip("a machine with a GPU")
    p = _run(code)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["gsplat_modules"] == []
    assert res["versions"]["gsplat"] == "1.5.3"  # installed (the pin), just not imported
