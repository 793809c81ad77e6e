"""Shared fixtures for the scene / SfM / workflow tests.

The real scenes live read-only in the shared folder ($LRF_SHARED, default <repo>/../shared).
Tests that need them skip when it is missing. Tests never write there: anything they corrupt
is a copy under tmp_path (`copy_scene`).

Expensive steps (prepare + SIFT + triangulation of a few real images) are cached for the
session in `given_runs`, so test_loaders_geometry.py and test_sfm.py share them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_path() -> Path:
    env = os.environ.get("LRF_SHARED")
    return Path(env).resolve() if env else (Path(__file__).parents[1] / ".." / "shared").resolve()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread (modules opt in with pytestmark): on a shared 2-core box two OpenMP
    threads that must meet at every op ran the fine-tuning tests 20x slower (10 s instead of
    0.35 s per step) whenever another job held a core."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    p = _shared_path()
    if not p.is_dir():
        pytest.skip(f"shared folder not found at {p} (set LRF_SHARED)")
    return p


@pytest.fixture(scope="session")
def data_dir(shared_dir) -> Path:
    p = shared_dir / "data"
    if not p.is_dir():
        pytest.skip(f"shared scenes not found at {p}")
    return p


# --------------------------------------------------------------------------- copies to corrupt
def _copy_scene(src: Path, dst: Path, image_dir: str | None = None, keep=None) -> Path:
    """Copy a shared scene's camera files and (a subset of) one image folder into dst.

    image_dir: the image sub-folder to copy ("images_8", "images", ...); None copies every
    folder whose name starts with "images" plus the NeRF split folders.
    keep: None (all images), an int (the first k by sorted name) or a list of file names.
    LLFF `poses_bounds.npy` is cut to the kept rows (its rows follow sorted image names), so the
    copy stays a valid scene until a test breaks it on purpose.
    """
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    img_dirs = [image_dir] if image_dir else [p.name for p in src.iterdir()
                                              if p.is_dir() and (p.name.startswith("images") or p.name in ("train", "test"))]
    kept_rows = None
    for d in img_dirs:
        names = sorted(p.name for p in (src / d).iterdir() if p.is_file())
        if keep is None:
            chosen = names
        elif isinstance(keep, int):
            chosen = names[:keep]
        else:
            chosen = [n for n in names if n in set(keep)]
        kept_rows = [names.index(n) for n in chosen]
        (dst / d).mkdir(parents=True, exist_ok=True)
        for n in chosen:
            shutil.copy2(src / d / n, dst / d / n)
    for p in src.iterdir():  # camera files and camera folders (gt_dense_cameras), not masks/images
        if p.is_file():
            if p.name == "poses_bounds.npy" and keep is not None and kept_rows is not None:
                np.save(dst / p.name, np.load(p)[kept_rows])
            else:
                shutil.copy2(p, dst / p.name)
        elif p.is_dir() and p.name not in img_dirs and not p.name.startswith(("images", "masks")) \
                and p.name not in ("train", "test", "val"):
            shutil.copytree(p, dst / p.name)
    return dst


@pytest.fixture
def copy_scene(data_dir, tmp_path):
    """copy_scene("llff/fern", image_dir="images_8", keep=5, dst=None) -> path of a writable copy."""

    def make(rel: str, image_dir: str | None = None, keep=None, dst: Path | None = None) -> Path:
        return _copy_scene(data_dir / rel, dst or tmp_path / "scenes" / rel, image_dir, keep)

    return make


# --------------------------------------------------------------------------- subprocess helpers
def lrf_env(shared: Path | None = None) -> dict:
    """Environment for `python -m lrf...` and snakemake subprocesses."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("OMP_NUM_THREADS", "2")
    if shared is not None:
        env["LRF_SHARED"] = str(shared)
    return env


@pytest.fixture
def run_lrf(shared_dir):
    """run_lrf("prepare", "--format", ...) -> CompletedProcess of `python -m lrf.<step> ...`."""

    def run(step: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", f"lrf.{step}", *map(str, args)], cwd=REPO,
                              env=lrf_env(shared_dir), capture_output=True, text=True, timeout=timeout)

    return run


# --------------------------------------------------------------------------- real scenes, small
@dataclass(frozen=True)
class Spec:
    fmt: str
    rel: str              # folder under data/
    dataset: str
    name: str
    images: str | None    # image sub-folder
    start: str | int      # first training camera of the contiguous run (name or index), or anchor
    n: int
    max_side: int
    min_points: int       # about half of what correct poses give: wrong conventions fall below
    near: bool = False    # pick the n training views nearest to `start` instead of a run


GEOMETRY_SPECS = {
    "fern": Spec("llff", "llff/fern", "llff", "fern", "images_8", 0, 7, 256, 120),
    "lego": Spec("nerf", "nerf_synthetic/lego", "nerf_synthetic", "lego", None, "train/r_18.png", 7, 256, 100, near=True),
    "fox": Spec("nerf", "instant-ngp/fox", "instant-ngp", "fox", None, 0, 6, 256, 150),
    "herz-jesu": Spec("strecha", "strecha/herz-jesu-p25", "strecha", "herz-jesu-p25", "images_4", 0, 7, 256, 180),
    "mary-rose": Spec("llff", "nerd/mary-rose", "nerd", "mary-rose", "images_4", 0, 7, 256, 120),
    "statue": Spec("llff", "nerd/statue-of-liberty", "nerd", "statue-of-liberty", "images", "video2_0012.jpg", 8, 320, 55),
    "flower": Spec("llff", "llff/flower", "llff", "flower", "images_8", 0, 7, 256, 300),
    # a thin object on white: few features at any resolution (about 50 points)
    "mic": Spec("nerf", "nerf_synthetic/mic", "nerf_synthetic", "mic", None, "train/r_18.png", 10, 256, 25, near=True),
    # a small object on black: at 256 px a handful of points; the native 640x480 gives ~450
    "temple": Spec("middlebury", "middlebury/temple-sparse-ring", "middlebury", "temple-sparse-ring", None,
                   "templeSR0004.png", 8, 640, 200, near=True),
}


def select_cameras(scene, spec: Spec) -> list:
    """Neighbouring training cameras: a contiguous run by sorted name, or the nearest views."""
    cams = sorted((c for c in scene.cameras if c.split == "train"), key=lambda c: c.name)
    names = [c.name for c in cams]
    i0 = names.index(spec.start) if isinstance(spec.start, str) else spec.start
    if not spec.near:
        return cams[i0:i0 + spec.n]
    C = np.stack([c.center for c in cams])
    Z = np.stack([c.w2c[2, :3] for c in cams])
    extent = np.linalg.norm(C - C.mean(0), axis=1).max()
    score = np.linalg.norm(C - C[i0], axis=1) / extent + (1.0 - Z @ Z[i0])
    return [cams[i] for i in sorted(np.argsort(score)[:spec.n])]


def subset(scene, cameras):
    from lrf.scene.model import Scene

    return Scene(scene.dataset, scene.name, list(cameras), None, scene.root, dict(scene.meta))


@dataclass
class GivenRun:
    spec: Spec
    loaded: object        # Scene as the loader returned it (all cameras)
    prepared: object      # prepared subset (working images)
    result: object        # run_sfm result (with points)
    stats: dict
    out: Path             # run_sfm's out_dir


@pytest.fixture(scope="session")
def given_runs(data_dir, tmp_path_factory):
    """given_runs(key) -> GivenRun: load, pick neighbours, prepare small, triangulate with given poses."""
    from lrf.scene.loaders import load_scene
    from lrf.scene.prepare import prepare_scene
    from lrf.sfm import run_sfm

    cache: dict[str, GivenRun] = {}

    def get(key: str) -> GivenRun:
        if key not in cache:
            spec = GEOMETRY_SPECS[key]
            scene = load_scene(spec.fmt, data_dir / spec.rel, spec.dataset, spec.name, spec.images)
            base = tmp_path_factory.mktemp(f"given-{key}")
            prepared = prepare_scene(subset(scene, select_cameras(scene, spec)), base / "prepared",
                                     max_side=spec.max_side)
            prepared.save(base / "prepared" / "scene.json")
            result, stats = run_sfm(prepared, base / "sfm", poses="given", max_features=2048)
            cache[key] = GivenRun(spec, scene, prepared, result, stats, base / "sfm")
        return cache[key]

    return get


# --------------------------------------------------------------------------- the Snakemake workflow
SHEET_COLUMNS = ["dataset", "scene", "format", "path", "images", "poses", "max_side", "downscale", "max_images"]


def make_workflow(wf: Path, rows, shared: Path, **overrides) -> Path:
    """Copy Snakefile, workflow/, config/ into wf with a scene sheet of `rows` and a small config.

    rows: dicts with the sheet's columns (missing ones blank). The config is the repository's
    with `scenes` pointing at the new sheet, `select` = the rows' keys, small SfM settings, and
    any keyword overrides (a value of None removes the key).
    """
    import yaml

    wf.mkdir(parents=True)
    shutil.copy2(REPO / "Snakefile", wf / "Snakefile")
    shutil.copytree(REPO / "workflow", wf / "workflow")
    shutil.copytree(REPO / "config", wf / "config")
    shutil.copytree(REPO / "envs", wf / "envs")
    lines = ["\t".join(SHEET_COLUMNS)]
    lines += ["\t".join("" if r.get(c) is None else str(r[c]) for c in SHEET_COLUMNS) for r in rows]
    (wf / "config" / "test_scenes.tsv").write_text("\n".join(lines) + "\n")
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg.update({"shared_dir": str(shared), "scenes": "config/test_scenes.tsv",
                "select": [f"{r['dataset']}/{r['scene']}" for r in rows] or "demo"})
    # one SfM thread, as the default: multi-threaded matching under load can change which points
    # COLMAP keeps (the SLURM-vs-local comparison saw different point ids once)
    cfg["sfm"].update({"max_features": 1024, "matcher": "exhaustive"})
    assert cfg["resources"]["default"]["threads"] == 1 and "threads" not in cfg["resources"]["sfm"]
    for k, v in overrides.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    if "protocol" not in overrides:  # tune on the first selected scene, evaluate on the rest
        keys = cfg["select"] if isinstance(cfg["select"], list) else cfg["groups"][cfg["select"]]
        cfg["protocol"] = {"tune": keys[:1], "eval": keys[1:]}
    (wf / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return wf


@pytest.fixture
def workflow_copy(tmp_path, shared_dir):
    """workflow_copy(rows, name="wf", **config) -> a runnable copy of the workflow in tmp_path."""

    def make(rows, name="wf", **overrides) -> Path:
        return make_workflow(tmp_path / name, rows, shared_dir, **overrides)

    return make


def snakemake_cmd(wf: Path, *args) -> list[str]:
    exe = Path(sys.executable).parent / "snakemake"
    return [str(exe) if exe.exists() else "snakemake", "--directory", str(wf), "--snakefile",
            str(wf / "Snakefile"), *map(str, args)]


@pytest.fixture
def snakemake_run(shared_dir):
    """snakemake_run(wf, "--cores", "2", ...) -> CompletedProcess (cwd = wf, lrf importable)."""

    def run(wf: Path, *args, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(snakemake_cmd(wf, *args), cwd=wf, env=lrf_env(shared_dir),
                              capture_output=True, text=True, timeout=timeout)

    return run


# --------------------------------------------------------------------------- a real browser
CHROMIUM_ARGS = ["--no-sandbox", "--enable-unsafe-swiftshader", "--use-angle=swiftshader"]


def find_chromium() -> str | None:
    """Debian's chromium (`.ci/run` installs it); Playwright's own browser download is not used."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    """Headless chromium driven by Playwright (one per test module: the sync API owns an event
    loop while it runs). Skipped where chromium or Playwright is missing, unless
    LRF_REQUIRE_BROWSER is set (CI), where that is a failure."""
    exe = find_chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if exe is None or sync_playwright is None:
        why = "chromium not found (apt-get install chromium)" if exe is None else "playwright not installed"
        if os.environ.get("LRF_REQUIRE_BROWSER"):
            pytest.fail(f"LRF_REQUIRE_BROWSER is set but {why}")
        pytest.skip(why)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh page (1000x700) whose console errors and uncaught exceptions collect in
    `page.errors`."""
    ctx = browser.new_context(viewport={"width": 1000, "height": 700})
    pg = ctx.new_page()
    pg.errors = []
    pg.on("console", lambda m: pg.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.errors.append(f"pageerror: {e}"))
    yield pg
    ctx.close()
