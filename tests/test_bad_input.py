"""Bad input: every failure is ONE line naming the scene, the file and the reason.

Each case is checked twice: the SceneError raised in-process, and the command line
(`python -m lrf.prepare ...` / `python -m lrf.sfm ...`), whose stderr must end with
`ERROR <dataset>/<scene>: <path>: <reason>`, exit 1, and carry no traceback.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lrf.scene.loaders import load_scene
from lrf.scene.model import SceneError
from lrf.scene.prepare import prepare_scene
from lrf.sfm import run_sfm


def load_and_prepare(fmt, root, dataset, name, out, images=None, max_side=64):
    scene = load_scene(fmt, root, dataset, name, images)
    return prepare_scene(scene, out, max_side=max_side)


def assert_scene_error(exc: SceneError, key: str, path: Path, reason: str) -> None:
    msg = str(exc)
    assert "\n" not in msg
    assert exc.scene == key and Path(exc.path).resolve() == Path(path).resolve()
    assert msg.startswith(f"{key}: {Path(path).resolve()}: "), msg
    assert re.search(reason, exc.reason), msg


def assert_cli_error(proc, key: str, path: Path, reason: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    prefix = f"ERROR {key}: {Path(path).resolve()}: "
    assert last.startswith(prefix), last
    assert re.search(reason, last[len(prefix):]), last
    assert sum(ln.startswith("ERROR") for ln in proc.stderr.splitlines()) == 1
    return last


def cli_prepare(run_lrf, fmt, root, dataset, name, out, images=None, max_side=64):
    args = ["--format", fmt, "--root", root, "--dataset", dataset, "--name", name, "--out", out,
            "--max-side", max_side]
    if images:
        args += ["--images", images]
    return run_lrf("prepare", *args)


def both(run_lrf, tmp_path, fmt, root, dataset, name, path, reason, images=None):
    """The same bad scene through the library and through the CLI."""
    with pytest.raises(SceneError) as ei:
        load_and_prepare(fmt, root, dataset, name, tmp_path / "lib_out", images)
    assert_scene_error(ei.value, f"{dataset}/{name}", path, reason)
    proc = cli_prepare(run_lrf, fmt, root, dataset, name, tmp_path / "cli_out", images)
    return assert_cli_error(proc, f"{dataset}/{name}", path, reason)


def _jpgs(data_dir: Path, names, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy2(data_dir / "strecha/herz-jesu-p25/images_4" / n, dst / n)
    return dst


# --------------------------------------------------------------------------- image files
def test_garbage_image(copy_scene, run_lrf, tmp_path):
    root = copy_scene("llff/fern", "images_8", keep=5)
    bad = root / "images_8" / "image002.png"
    bad.write_bytes(b"this is not a png at all" * 40)
    both(run_lrf, tmp_path, "llff", root, "llff", "badfern", bad, r"cannot decode image", "images_8")


def test_truncated_jpeg(copy_scene, run_lrf, tmp_path):
    root = copy_scene("strecha/herz-jesu-p25", "images_4", keep=4)
    bad = root / "images_4" / "0002.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3])  # header intact: the size reads, the pixels do not
    last = both(run_lrf, tmp_path, "strecha", root, "strecha", "herz", bad, r"cannot decode image \(OSError: .*truncated",
                "images_4")
    assert "0002.jpg" in last


def test_images_of_different_sizes(data_dir, run_lrf, tmp_path):
    root = _jpgs(data_dir, ["0000.jpg", "0001.jpg", "0002.jpg"], tmp_path / "mixed")
    with Image.open(root / "0001.jpg") as im:
        im.resize((640, 480)).save(root / "0001.jpg")
    both(run_lrf, tmp_path, "images", root, "photos", "mixed", root / "0001.jpg",
         r"images differ in size: 0001.jpg is 640x480, 0000.jpg is 768x512")


def test_empty_image_folder(copy_scene, run_lrf, tmp_path):
    root = copy_scene("llff/fern", "images_8", keep=3)
    for p in (root / "images_8").iterdir():
        p.unlink()
    (root / "images_8" / "notes.txt").write_text("not an image")
    both(run_lrf, tmp_path, "llff", root, "llff", "empty", root / "images_8", r"^image folder holds no images$",
         "images_8")


def test_fewer_than_three_images(data_dir, run_lrf, tmp_path):
    root = _jpgs(data_dir, ["0000.jpg", "0001.jpg"], tmp_path / "two")
    both(run_lrf, tmp_path, "images", root, "photos", "two", root, r"^only 2 images; need at least 3$")


def test_missing_scene_folder(data_dir, run_lrf, tmp_path):
    root = data_dir / "llff" / "no-such-scene"
    both(run_lrf, tmp_path, "llff", root, "llff", "ghost", root, r"^scene folder does not exist$")


# --------------------------------------------------------------------------- camera files
def test_llff_frame_missing(copy_scene, run_lrf, tmp_path):
    root = copy_scene("llff/fern", "images_8")  # 20 images, 20 poses
    (root / "images_8" / "image007.png").unlink()
    both(run_lrf, tmp_path, "llff", root, "llff", "fern19", root / "images_8",
         r"^19 images but 20 poses in poses_bounds.npy$", "images_8")


def test_nerf_frame_missing_is_a_warning(data_dir, run_lrf, tmp_path):
    """A transforms.json frame without its image is skipped with a warning naming it; the run goes on."""
    src = data_dir / "nerf_synthetic/lego"
    root = tmp_path / "lego3"
    (root / "train").mkdir(parents=True)
    doc = json.loads((src / "transforms_train.json").read_text())
    frames = doc["frames"][:3]
    for fr in frames:
        shutil.copy2(src / (fr["file_path"] + ".png"), root / "train")
    frames.append({**frames[0], "file_path": "./train/r_gone"})
    (root / "transforms.json").write_text(json.dumps({"camera_angle_x": doc["camera_angle_x"], "frames": frames}))

    proc = cli_prepare(run_lrf, "nerf", root, "nerf_synthetic", "lego3", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    warn = [ln for ln in proc.stderr.splitlines() if ln.startswith("WARNING")]
    assert len(warn) == 1 and "r_gone.png" in warn[0] and "1 of 4" in warn[0], proc.stderr
    assert f"nerf_synthetic/lego3: {root / 'transforms.json'}" in warn[0]
    assert "prepared 3 images" in proc.stderr.strip().splitlines()[-1]
    assert (tmp_path / "out" / "scene.json").exists()


@pytest.mark.parametrize("model,params", [
    ("OPENCV_FISHEYE", [60.0, 60.0, 32.0, 24.0, 0.01, 0.0, 0.0, 0.0]),
    ("FULL_OPENCV", [60.0, 60.0, 32.0, 24.0, 0.01, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
])
def test_unsupported_camera_model(model, params, run_lrf, tmp_path):
    import pycolmap

    root = tmp_path / "colmap"
    (root / "images").mkdir(parents=True)
    rec = pycolmap.Reconstruction()
    rec.add_camera_with_trivial_rig(pycolmap.Camera(model=model, width=64, height=48, params=params, camera_id=1))
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "images" / f"{k}.png")
        pose = pycolmap.Rigid3d(np.c_[np.eye(3), [k * 0.1, 0, 0]])
        rec.add_image_with_trivial_frame(
            pycolmap.Image(name=f"{k}.png", keypoints=np.zeros((0, 2)), camera_id=1, image_id=k + 1), pose)
    model_dir = root / "sparse" / "0"
    model_dir.mkdir(parents=True)
    rec.write_binary(model_dir)
    both(run_lrf, tmp_path, "colmap", root, "colmap", "fisheye", model_dir,
         rf"^unsupported camera model {model} \(supported: .*OPENCV.*\)$")


def test_unknown_format_and_bad_camera_file(copy_scene, tmp_path):
    root = copy_scene("strecha/herz-jesu-p25", "images_4", keep=3)
    with pytest.raises(SceneError) as ei:
        load_scene("blender", root, "d", "s")
    assert_scene_error(ei.value, "d/s", root, r"unknown format 'blender'")
    cam = root / "gt_dense_cameras" / "0001.jpg.camera"
    cam.write_text("1 2 3\n")
    with pytest.raises(SceneError) as ei:
        load_scene("strecha", root, "d", "s", "images_4")
    assert_scene_error(ei.value, "d/s", cam, r"malformed Strecha \.camera file")
    cam.unlink()
    with pytest.raises(SceneError) as ei:
        load_scene("strecha", root, "d", "s", "images_4")
    assert_scene_error(ei.value, "d/s", cam, r"^camera file is missing$")


# --------------------------------------------------------------------------- SfM
def test_sfm_registers_too_few(data_dir, run_lrf, tmp_path):
    """3 real photos + 4 noise images with no cameras: SfM can place at most 3 of 7."""
    root = _jpgs(data_dir, ["0004.jpg", "0005.jpg", "0006.jpg"], tmp_path / "noisy")
    rng = np.random.default_rng(0)
    for k in range(4):
        noise = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)  # coarse noise, upsampled: many blobs
        Image.fromarray(noise).resize((768, 512), Image.Resampling.BILINEAR).save(root / f"noise{k}.jpg")
    prep = tmp_path / "prepared"
    proc = cli_prepare(run_lrf, "images", root, "photos", "noisy", prep, max_side=192)
    assert proc.returncode == 0, proc.stderr
    scene_json = prep / "scene.json"
    reason = r"SfM registered only [0-3] of 7 images \(need at least 50%\)$"

    from lrf.scene.model import Scene

    with pytest.raises(SceneError) as ei:
        run_sfm(Scene.load(scene_json), tmp_path / "sfm_lib", poses="sfm", max_features=512)
    assert_scene_error(ei.value, "photos/noisy", prep / "images", reason)

    proc = run_lrf("sfm", "--scene", scene_json, "--out", tmp_path / "sfm_cli", "--poses", "sfm",
                   "--max-features", 512, "--threads", 2)
    assert_cli_error(proc, "photos/noisy", prep / "images", reason)


# --------------------------------------------------------------------------- correspondences
@pytest.mark.parametrize("case,reason", [
    ("single_views", r"^no correspondences survive the filters \(max reprojection 2.0 px, min track 2\)$"),
    ("no_tracks", r"^scene has no SfM tracks$"),
])
def test_correspondences_empty_for_a_scene(given_runs, run_lrf, tmp_path, case, reason):
    """Real fern SfM whose points are each seen in one view only (or have no tracks at all): the
    step fails with one line naming the scene and its points.npz, and writes no tables."""
    from lrf.scene.model import Points, Scene

    src = Scene.load(given_runs("fern").out / "scene.json")
    p = src.points
    if case == "single_views":
        _, first = np.unique(p.track_point, return_index=True)
        pts = Points(p.xyz, p.rgb, p.error, p.ids, p.track_point[first], p.track_image[first], p.track_xy[first])
    else:
        pts = Points(p.xyz, p.rgb, p.error, p.ids, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2)))
    scene_json = tmp_path / "sfm" / "scene.json"
    Scene(src.dataset, src.name, src.cameras, pts, src.root, src.meta).save(scene_json)
    out = tmp_path / "corr"
    proc = run_lrf("correspondences", "--scene", scene_json, "--out", out)
    assert_cli_error(proc, "llff/fern", scene_json.parent / "points.npz", reason)
    assert not out.exists()


# --------------------------------------------------------------------------- the scene sheet
def test_sheet_names_missing_folder(workflow_copy, snakemake_run, data_dir):
    wf = workflow_copy([{"dataset": "llff", "scene": "ghost", "format": "llff", "path": "llff/no-such-folder",
                         "images": "images_8", "poses": "given", "max_side": 64}])
    proc = snakemake_run(wf, "--cores", "1", "results/llff/ghost/prepared/scene.json")
    assert proc.returncode != 0
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR ")]
    assert err == [f"ERROR llff/ghost: {(data_dir / 'llff/no-such-folder').resolve()}: scene folder does not exist"], \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    log = wf / "results/logs/sfm_input/llff/ghost.log"
    assert log.exists() and err[0] in log.read_text()


# --------------------------------------------------------------------------- Middlebury *_par.txt
def _temple(copy_scene) -> tuple[Path, Path, list[str]]:
    root = copy_scene("middlebury/temple-sparse-ring")
    par = root / "templeSR_par.txt"
    return root, par, par.read_text().splitlines()


@pytest.mark.parametrize("case", ["short_line", "not_a_number", "bad_header", "listed_image_missing",
                                  "image_without_line", "par_file_missing"])
def test_middlebury_bad_par_file(case, copy_scene, run_lrf, tmp_path):
    """Each fault of a Middlebury scene is one line naming the scene, the file and the reason."""
    root, par, lines = _temple(copy_scene)
    path, reason = par, None
    if case == "short_line":
        lines[3] = " ".join(lines[3].split()[:12])
        reason = r"^line 4: 12 fields, expected 22 \(name, K row-major, R row-major, t\)$"
    elif case == "not_a_number":
        toks = lines[5].split()
        toks[14] = "0.98x"
        lines[5] = " ".join(toks)
        reason = r"^line 6: not a number: '0\.98x'$"
    elif case == "bad_header":
        lines[0] = "17"
        reason = r"^header says 17 cameras, 16 lines follow$"
    elif case == "listed_image_missing":
        path = root / "templeSR0005.png"
        path.unlink()
        reason = r"^image listed in templeSR_par\.txt is missing$"
    elif case == "image_without_line":
        lines = ["14"] + [ln for ln in lines[1:] if not ln.startswith(("templeSR0007.png", "templeSR0012.png"))]
        path = root / "templeSR0007.png"
        reason = r"^image has no line in templeSR_par\.txt \(and 1 more\)$"
    elif case == "par_file_missing":
        par.unlink()
        path = root / "*_par.txt"
        reason = r"^camera file is missing \(no \*_par\.txt\)$"
    if par.exists():
        par.write_text("\n".join(lines) + "\n")
    both(run_lrf, tmp_path, "middlebury", root, "middlebury", "temple", path, reason)


def test_middlebury_rotation_that_is_not_one(copy_scene, tmp_path):
    root, par, lines = _temple(copy_scene)
    toks = lines[2].split()
    toks[10:13] = ["2.0", "0.0", "0.0"]  # r11..r13: a scaled first row
    lines[2] = " ".join(toks)
    par.write_text("\n".join(lines) + "\n")
    with pytest.raises(SceneError) as ei:
        load_scene("middlebury", root, "middlebury", "temple")
    assert_scene_error(ei.value, "middlebury/temple", par, r"^line 3: R is not a rotation")
