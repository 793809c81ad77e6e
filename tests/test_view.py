"""The field viewer (lrf.view): discovery, rendering as lrf.evaluate does, one-line errors, Ctrl-C,
and the page itself in a real browser (Debian's chromium driven by Playwright).

One small results tree is built per module, in the workflow's layout: a synthetic scene (six
cameras on an arc, one held-out) with a latent field (32 channels, for TAEF2), an RGB field, a
"tuned" decoder (the pretrained one with its output bias shifted, so `dec` looks different),
a per-scene method's field and decoder, and `vanilla`'s metrics.json written by lrf.evaluate.
"""
from __future__ import annotations

import io
import json
import math
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, lrf_env

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

W, H = 64, 48
TEST_VIEW = "view3.png"


def per_scene_name() -> str:
    from lrf.methods import METHODS

    return next((m for m, s in METHODS.items() if s.get("per_scene")), "vanilla-ps")


def look_at(pos, target=(0.0, 0.0, 0.0)) -> np.ndarray:
    from lrf.field import look_at_w2c

    return look_at_w2c(np.asarray(pos, float), np.asarray(target, float), np.array([0.0, 1.0, 0.0]))


def random_field(n: int, channels: int, rgb: bool, seed: int):
    from lrf.field import GaussianField

    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * 1.4
    feats = torch.rand(n, channels, generator=g) if rgb else torch.randn(n, channels, generator=g) * 1.5
    return GaussianField.from_points(means.numpy(), feats, rgb_offset=rgb, init_opacity=0.6, init_scale=1.5)


def make_tree(root: Path, weights: Path) -> Path:
    """results/syn/arc/{prepared,fields,align,eval}, results/vae/taef2/stage3/decoder.safetensors."""
    from safetensors.torch import save_file

    from lrf.evaluate import evaluate
    from lrf.field import field_background
    from lrf.field import save_field
    from lrf.scene.images import save_png
    from lrf.scene.model import Camera, Scene
    from lrf.vae.factory import load_vae

    results = root / "results"
    sd = results / "syn" / "arc"
    K = np.array([[60.0, 0, W / 2], [0, 60.0, H / 2], [0, 0, 1]])
    cams = []
    rng = np.random.default_rng(0)
    for i in range(6):
        a = math.radians(-40 + 16 * i)
        name = f"view{i}.png"
        img = np.clip(rng.random((H, W, 3)) * 0.3 + np.linspace(0.2, 0.8, W)[None, :, None], 0, 1).astype(np.float32)
        save_png(sd / "prepared" / "images" / name, img)
        cams.append(Camera(name, str(sd / "prepared" / "images" / name), W, H, K,
                           look_at((3 * math.sin(a), -0.5, -3 * math.cos(a))), "test" if name == TEST_VIEW else "train"))
    scene = Scene("syn", "arc", cams, root=sd)
    scene.save(sd / "prepared" / "scene.json")
    Scene("syn", "arc", cams[:2], root=sd).save(sd / "sfm" / "scene.json")   # the older layout: not preferred
    latent, rgb = random_field(3000, 32, False, 0), random_field(3000, 3, True, 1)
    save_field(latent, sd / "fields" / "vanilla" / "field.safetensors")
    save_field(rgb, sd / "fields" / "rgb-3dgs" / "field.safetensors")
    vae = load_vae({"kind": "taef2", "source": "{weights}/taef2"}, weights)
    dec = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    last = max(int(k.split(".")[0]) for k in dec)
    dec[f"{last}.bias"][0] += 1.0        # redder: `dec` must look different from `vanilla`
    (results / "vae" / "taef2" / "stage3").mkdir(parents=True)
    save_file(dec, str(results / "vae" / "taef2" / "stage3" / "decoder.safetensors"))
    ps = sd / "align" / per_scene_name()
    save_field(random_field(3000, 32, False, 2), ps / "field.safetensors")
    save_file(dec, str(ps / "decoder.safetensors"))
    metrics, _ = evaluate(scene, "latent", sd / "eval" / "vanilla", vae, latent,
                          field_background(sd / "fields" / "vanilla" / "field.safetensors", 32), save_renders=False)
    (sd / "eval" / "vanilla").mkdir(parents=True, exist_ok=True)
    (sd / "eval" / "vanilla" / "metrics.json").write_text(json.dumps(metrics))
    return results


@pytest.fixture(scope="module")
def tree(shared_dir, tmp_path_factory):
    weights = shared_dir / "weights"
    if not (weights / "taef2").is_dir():
        pytest.skip("TAEF2 weights not in the shared folder")
    return make_tree(tmp_path_factory.mktemp("view"), weights), weights


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def view_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "lrf.view", *map(str, args)]


# ---------------------------------------------------------------------------- no browser
def test_discovers_methods_from_the_table_and_the_disk(tree):
    from lrf.view.sources import discover

    results, _ = tree
    scenes = discover(results, "taef2")
    assert list(scenes) == ["syn/arc"]
    sc = scenes["syn/arc"]
    assert sc.scene_json == results / "syn/arc/prepared/scene.json"      # preferred over sfm/
    ps = per_scene_name()
    assert set(sc.methods) == {"vanilla", "dec", "rgb-3dgs", ps}             # no enc field: no enc, no full
    assert sc.methods["dec"].field == sc.methods["vanilla"].field
    assert sc.methods["dec"].decoder == results / "vae/taef2/stage3/decoder.safetensors"
    assert sc.methods["vanilla"].decoder is None and sc.methods["rgb-3dgs"].kind == "rgb"
    assert sc.methods[ps].decoder == results / f"syn/arc/align/{ps}/decoder.safetensors"
    # one scene folder works too, and so does a field file with its scene found two levels up
    assert set(discover(results / "syn/arc", "taef2")["syn/arc"].methods) == set(sc.methods)


def test_exact_render_is_evaluates_and_live_split_is_both_methods(tree):
    """The held-out PSNR the viewer shows is lrf.evaluate's number for that view; the live split
    view renders each side's own columns of the same camera."""
    from lrf.metrics import psnr
    from lrf.scene.model import Scene
    from lrf.view.render import Renderer, compose
    from lrf.view.sources import discover

    results, weights = tree
    methods = discover(results, "taef2")["syn/arc"].methods
    scene = Scene.load(results / "syn/arc/prepared/scene.json")
    i = scene.test[0]
    r32 = Renderer({"kind": "taef2", "source": "{weights}/taef2"}, weights, "fp32")
    pred = r32.exact(methods["vanilla"], scene.cameras[i])
    photo = scene.load_image(i)
    p = psnr(torch.from_numpy(pred).permute(2, 0, 1)[None], torch.from_numpy(photo).permute(2, 0, 1)[None])
    assert p == pytest.approx(methods["vanilla"].per_view_psnr()[TEST_VIEW], abs=1e-9)

    live = Renderer({"kind": "taef2", "source": "{weights}/taef2"}, weights)
    w2c, fov = scene.cameras[0].w2c, 0.8
    a = compose(live, methods["vanilla"], None, w2c, fov, 1.5, 96).astype(float)
    b = compose(live, methods["dec"], None, w2c, fov, 1.5, 96).astype(float)
    ab = compose(live, methods["vanilla"], methods["dec"], w2c, fov, 1.5, 96, split=0.5).astype(float)
    assert a.shape == ab.shape == (64, 96, 3)
    assert np.abs(a - b).mean() > 10                                        # the tuned decoder differs
    # away from the cut (the decoder's reach), each side is that method's own full-frame render
    assert np.abs(ab[:, :32] - a[:, :32]).mean() < 3 and np.abs(ab[:, 64:] - b[:, 64:]).mean() < 3
    assert (ab[:, 47:49] == 255).all()                                      # the divider


@pytest.mark.slow
def test_bad_input_is_one_line(tree, tmp_path):
    """A missing field, a field whose channels do not fit the VAE, a busy port: one ERROR line each."""
    from lrf.field import save_field

    results, weights = tree
    wrong = tmp_path / "wrong" / "field.safetensors"
    save_field(random_field(50, 4, False, 3), wrong)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    cases = {
        "missing": ([tmp_path / "nope" / "field.safetensors"], "nope: {}: field file is missing"),
        "channels": ([wrong, "--scene-json", results / "syn/arc/prepared/scene.json"],
                     "syn/arc: {}: field has 4 channels, taef2 latents have 32"),
        "port": ([results, "--port", port], f"127.0.0.1:{port}: port is busy"),
        "empty": ([tmp_path], "{}: no fitted field"),
    }
    paths = {"missing": tmp_path / "nope" / "field.safetensors", "channels": wrong, "port": None, "empty": tmp_path}
    env = lrf_env()
    env["LRF_WEIGHTS_DIR"] = str(weights)
    try:
        procs = {k: subprocess.Popen(view_cmd(*a), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True) for k, (a, _) in cases.items()}
        for k, p in procs.items():
            out, err = p.communicate(timeout=120)
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert p.returncode == 1, (k, err[-2000:])
            assert len(lines) == 1 and "Traceback" not in err, (k, err[-2000:])
            want = "ERROR " + cases[k][1].format(paths[k])
            assert lines[0].startswith(want), (k, lines[0], want)
    finally:
        busy.close()


# ---------------------------------------------------------------------------- the page
@pytest.fixture(scope="module")
def viewer(tree, tmp_path_factory):
    """`python -m lrf.view results` serving on a free port (stopped by test_ctrl_c_stops_cleanly)."""
    results, weights = tree
    port = free_port()
    env = lrf_env()
    env["LRF_WEIGHTS_DIR"] = str(weights)
    log = tmp_path_factory.mktemp("viewer") / "stderr.txt"
    fh = open(log, "w")
    proc = subprocess.Popen(view_cmd(results, "--port", port, "--max-px", 256, "--moving-px", 128), cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=fh, text=True)
    t0 = time.time()
    while "serving at" not in log.read_text():
        if proc.poll() is not None or time.time() - t0 > 90:
            proc.kill()
            pytest.fail(f"viewer did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    yield proc, f"http://localhost:{port}", log
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    fh.close()


def status(page) -> str:
    return page.get_by_text(re.compile(r"^frame \d+")).inner_text(timeout=30_000)


def wait_frame(page, after: int = 0, contains: str = "", still: bool = True) -> tuple[int, str]:
    """Wait until the status shows a frame newer than `after` (a still one, naming `contains`)."""
    t0 = time.time()
    while time.time() - t0 < 60:
        s = status(page)
        n = int(re.match(r"frame (\d+)", s).group(1))
        if n > after and contains in s and (not still or " still " in s):
            return n, s
        page.wait_for_timeout(100)
    raise AssertionError(f"no new frame after {after} with {contains!r}: {s}")


def view_pixels(page, path: Path) -> np.ndarray:
    """A screenshot of the 3D view's left part (clear of the panel and the notices), saved."""
    from PIL import Image

    png = page.screenshot(path=str(path), clip={"x": 40, "y": 180, "width": 560, "height": 480})
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


@pytest.mark.slow
def test_viewer_in_browser(viewer, page, tmp_path):
    proc, url, log = viewer
    page.goto(url)
    n, s = wait_frame(page, contains="vanilla")
    img0 = view_pixels(page, tmp_path / "0-first.png")
    assert img0.std() > 10, "the view is blank: no rendered image arrived"
    print(f"first frame: {s}")

    # orbit: drag across the view, as a person would
    page.mouse.move(300, 400)
    page.mouse.down()
    for k in range(1, 11):
        page.mouse.move(300 + 15 * k, 400 + 3 * k)
        page.wait_for_timeout(30)
    page.mouse.up()
    n, s = wait_frame(page, after=n)
    img1 = view_pixels(page, tmp_path / "1-moved.png")
    assert np.abs(img1 - img0).mean() > 5, "the camera move did not change the image"
    print(f"after the drag: {s}")

    # the method switch: the panel's Method dropdown
    page.get_by_role("combobox", name="Method").click()
    page.get_by_role("option", name="rgb-3dgs", exact=True).click()
    n, s = wait_frame(page, after=n, contains="rgb-3dgs")
    img2 = view_pixels(page, tmp_path / "2-rgb.png")
    assert np.abs(img2 - img1).mean() > 5, "switching the method did not change the image"
    print(f"after the switch: {s}")

    # split view: vanilla | dec
    page.get_by_role("combobox", name="Method").click()
    page.get_by_role("option", name="vanilla", exact=True).click()
    page.get_by_role("combobox", name="Compare with").click()
    page.get_by_role("option", name="dec", exact=True).click()
    n, s = wait_frame(page, after=n, contains="vanilla | dec")
    view_pixels(page, tmp_path / "3-split.png")
    print(f"split view: {s}")

    # snap to the held-out view: photo, render and the PSNR lrf.evaluate reported
    page.get_by_role("button", name="Snap to held-out view").click()
    text = page.get_by_text(re.compile(r"^vanilla on held-out view")).inner_text(timeout=30_000)
    page.screenshot(path=str(tmp_path / "4-snap.png"))
    m = re.search(r"view (\S+): PSNR ([\d.]+) dB \(evaluate: ([\d.]+) dB\)", text)
    assert m and m.group(1) == TEST_VIEW and m.group(2) == m.group(3), text
    assert page.get_by_text("photo", exact=True).count() == 1 and page.get_by_text("render: vanilla").count() == 1
    assert "**dec**" not in text and page.get_by_text(re.compile(r"^dec on held-out view")).count() == 1
    print(f"snap: {text}")
    assert page.errors == [], page.errors
    print(f"screenshots in {tmp_path}")


def test_ctrl_c_stops_cleanly(viewer):
    proc, _, log = viewer
    assert proc.poll() is None, log.read_text()[-2000:]
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=20)
    err = log.read_text()
    assert rc == 0, err[-2000:]
    assert "Traceback" not in err and err.rstrip().endswith("lrf.view: stopped"), err[-2000:]
