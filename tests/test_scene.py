"""Scene model, persistence, working size / crop, splits, subsampling and undistortion."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from lrf.prepare import subsample
from lrf.scene.images import read_rgb, working_size
from lrf.scene.loaders import load_scene
from lrf.scene.model import Camera, Points, Scene, SceneError, every_nth_split
from lrf.scene.prepare import colmap_camera, prepare_scene, undistort_image, undistort_points


def _cam(name="a.png", path="a.png", w=64, h=48, K=None, w2c=None, split="train", dist=None) -> Camera:
    K = np.array([[50.0, 0, 32.0], [0, 50.0, 24.0], [0, 0, 1]]) if K is None else K
    return Camera(name, path, w, h, K, np.eye(4) if w2c is None else w2c, split, dist)


def _write_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.round(arr * 255), 0, 255).astype(np.uint8)).save(path)


def psnr(a, b):
    return float(10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - b) ** 2)))


# --------------------------------------------------------------------------- persistence
def test_scene_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    img_dir = tmp_path / "imgs"
    for n in ("a.png", "b.png"):
        _write_png(img_dir / n, rng.random((48, 64, 3)))
    w2c = np.eye(4)
    w2c[:3, 3] = [0.1, -0.2, 3.0]
    cams = [_cam("a.png", "a.png", w2c=w2c),
            _cam("b.png", "b.png", split="test", dist=("OPENCV", [50.0, 50.0, 32.0, 24.0, 0.05, -0.01, 0.0, 0.0]))]
    pts = Points(rng.normal(size=(4, 3)), rng.integers(0, 255, (4, 3), dtype=np.uint8), rng.random(4),
                 np.array([7, 9, 11, 13], np.int64), np.array([0, 0, 1, 2, 3, 3], np.int64),
                 np.array([0, 1, 1, 0, 0, 1], np.int64), rng.random((6, 2)) * 40)
    scene = Scene("ds", "sc", cams, pts, img_dir, {"format": "test", "bounds": [[1.0, 2.0]]})
    out = tmp_path / "out" / "scene.json"
    scene.save(out)

    doc = json.loads(out.read_text())
    assert [c["image_path"] for c in doc["cameras"]] == ["../imgs/a.png", "../imgs/b.png"]  # relative
    assert doc["points"] == "points.npz" and (out.parent / "points.npz").exists()

    back = Scene.load(out)
    assert back.key == "ds/sc" and back.meta == scene.meta and back.root == out.parent
    for i, (a, b) in enumerate(zip(scene.cameras, back.cameras)):
        assert (a.name, a.width, a.height, a.split, a.distortion) == (b.name, b.width, b.height, b.split, b.distortion)
        np.testing.assert_array_equal(a.K, b.K)
        np.testing.assert_array_equal(a.w2c, b.w2c)
        assert back.image_path(i).resolve() == scene.image_path(i).resolve()
        np.testing.assert_array_equal(back.load_image(i), read_rgb(img_dir / a.name))
    for f in ("xyz", "rgb", "error", "ids", "track_point", "track_image", "track_xy"):
        np.testing.assert_array_equal(getattr(back.points, f), getattr(pts, f))
        assert getattr(back.points, f).dtype == getattr(pts, f).dtype
    assert back.train == [0] and back.test == [1]

    # the saved folder can move with its images: relative paths still resolve
    moved = tmp_path / "moved"
    (moved / "out").mkdir(parents=True)
    for p in out.parent.iterdir():
        p.rename(moved / "out" / p.name)
    img_dir.rename(moved / "imgs")
    again = Scene.load(moved / "out" / "scene.json")
    assert again.image_path(0).resolve() == (moved / "imgs" / "a.png").resolve()
    assert again.load_image(1).shape == (48, 64, 3)


def test_scene_without_points_round_trip(tmp_path):
    _write_png(tmp_path / "a.png", np.zeros((48, 64, 3)))
    scene = Scene("d", "s", [_cam(path=str(tmp_path / "a.png"))], None, tmp_path)
    scene.save(tmp_path / "scene.json")
    assert json.loads((tmp_path / "scene.json").read_text())["cameras"][0]["image_path"] == "a.png"
    back = Scene.load(tmp_path / "scene.json")
    assert back.points is None and not (tmp_path / "points.npz").exists()


def test_load_image_checks_size(tmp_path):
    _write_png(tmp_path / "a.png", np.zeros((40, 64, 3)))
    scene = Scene("d", "s", [_cam()], None, tmp_path)
    with pytest.raises(SceneError, match=r"^d/s: .*a\.png: image is 64x40, camera says 64x48$"):
        scene.load_image(0)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "x.png")
    img = read_rgb(tmp_path / "x.png")
    np.testing.assert_allclose(img[0, 0], [1, 0, 0])
    np.testing.assert_allclose(img[3, 3], [1, 1, 1])


# --------------------------------------------------------------------------- camera
def test_camera_project_by_hand():
    K = np.array([[100.0, 0, 50.5], [0, 120.0, 40.25], [0, 0, 1]])
    w2c = np.eye(4)
    w2c[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]  # 90 degrees about z
    w2c[:3, 3] = [0.5, -1.0, 4.0]
    cam = _cam(K=K, w2c=w2c)
    # X = (1, 2, 3): R X = (-2, 1, 3); + t = (-1.5, 0, 7)
    uv, z = cam.project(np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(uv[0], [100 * -1.5 / 7 + 50.5, 40.25])
    np.testing.assert_allclose(uv[1], [100 * (0.5 / 4) + 50.5, 120 * (-1 / 4) + 40.25])
    np.testing.assert_allclose(z, [7.0, 4.0])
    # centre and c2w are consistent with w2c
    np.testing.assert_allclose(cam.center, -w2c[:3, :3].T @ w2c[:3, 3])
    np.testing.assert_allclose(cam.project(cam.center[None] + cam.c2w[:3, 2][None])[0][0], K[:2, 2])
    # scaling the image scales pixels with corner-origin coordinates
    half = cam.scaled(0.5)
    assert (half.width, half.height) == (32, 24)
    np.testing.assert_allclose(half.project(np.array([[1.0, 2.0, 3.0]]))[0], uv[:1] * 0.5)


# --------------------------------------------------------------------------- working size
@pytest.mark.parametrize("size,kw,expected", [
    ((504, 378), {"max_side": 192}, ((192, 144), (0, 0, 192, 144))),
    ((1010, 770), {"max_side": 300}, ((300, 229), (2, 2, 296, 224))),
    ((1080, 1920), {"max_side": 512}, ((288, 512), (0, 0, 288, 512))),
    ((3072, 2048), {"downscale": 4}, ((768, 512), (0, 0, 768, 512))),
    ((800, 1200), {"downscale": 3}, ((267, 400), (1, 0, 264, 400))),
    ((100, 60), {}, ((100, 60), (2, 2, 96, 56))),
    ((5, 5), {}, ((8, 8), (0, 0, 8, 8))),
])
def test_working_size_examples(size, kw, expected):
    assert working_size(*size, **kw) == expected


def test_working_size_properties():
    rnd = random.Random(0)
    for _ in range(300):
        w, h = rnd.randint(8, 4000), rnd.randint(8, 4000)
        ms = rnd.choice([None, rnd.randint(64, 1024)])
        (rw, rh), (left, top, cw, ch) = working_size(w, h, max_side=ms)
        assert cw % 8 == 0 and ch % 8 == 0 and 0 <= rw - cw < 8 and 0 <= rh - ch < 8
        assert left == (rw - cw) // 2 and top == (rh - ch) // 2
        if ms:
            assert max(rw, rh) <= max(ms, 8)
        s = min(1.0, ms / max(w, h)) if ms else 1.0
        for got, full in ((rw, w), (rh, h)):  # one scale for both sides: the aspect ratio is kept
            assert got == max(8, round(full * s))


def test_prepare_moves_principal_point_with_crop(tmp_path):
    """Resize by (sx, sy), crop by (left, top): K' = diag(sx, sy, 1) K - crop, and a blob follows it."""
    W, H = 1010, 770
    K = np.array([[900.0, 0, 480.3], [0, 905.0, 390.7], [0, 0, 1]])
    X = np.array([[0.21, -0.08, 2.0]])
    cam = _cam("blob.png", "blob.png", W, H, K)
    u, v = cam.project(X)[0][0]
    jj, ii = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)  # pixel centres
    blob = np.exp(-((jj - u) ** 2 + (ii - v) ** 2) / (2 * 9.0 ** 2))
    _write_png(tmp_path / "src" / "blob.png", np.repeat(blob[..., None], 3, -1))
    scene = Scene("d", "s", [cam] * 3, None, tmp_path / "src")
    prepared = prepare_scene(scene, tmp_path / "prep", max_side=300)

    (rw, rh), (left, top, cw, ch) = working_size(W, H, 300)
    assert (left, top, cw, ch) == (2, 2, 296, 224)
    c = prepared.cameras[0]
    assert (c.width, c.height) == (cw, ch) and c.distortion is None
    expected = np.diag([rw / W, rh / H, 1.0]) @ K
    expected[0, 2] -= left
    expected[1, 2] -= top
    np.testing.assert_allclose(c.K, expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(c.w2c, cam.w2c)

    img = prepared.load_image(0)[..., 0]
    assert img.shape == (ch, cw)
    wgt = np.clip(img - 0.02, 0, None)
    cy, cx = [(wgt * g).sum() / wgt.sum() for g in np.meshgrid(np.arange(ch) + 0.5, np.arange(cw) + 0.5, indexing="ij")]
    uv_new = c.project(X)[0][0]
    assert np.hypot(cx - uv_new[0], cy - uv_new[1]) < 0.1, (cx, cy, uv_new)
    # the meta records how it was made; the scene saves and reloads
    assert prepared.meta["max_side"] == 300
    prepared.save(tmp_path / "prep" / "scene.json")
    assert Scene.load(tmp_path / "prep" / "scene.json").load_image(2).shape == (224, 296, 3)


# --------------------------------------------------------------------------- splits
def test_every_nth_split():
    names = [f"img{k:03d}.png" for k in range(20)]
    shuffled = names[:]
    random.Random(1).shuffle(shuffled)
    split = every_nth_split(shuffled)
    assert sorted(n for n, s in split.items() if s == "test") == ["img000.png", "img008.png", "img016.png"]
    assert sum(s == "train" for s in split.values()) == 17
    assert every_nth_split(["b", "a", "c"], n=2) == {"a": "test", "b": "train", "c": "test"}


def test_loader_splits(data_dir):
    fern = load_scene("llff", data_dir / "llff/fern", "llff", "fern", "images_8")
    assert [fern.cameras[i].name for i in fern.test] == ["image000.png", "image008.png", "image016.png"]
    lego = load_scene("nerf", data_dir / "nerf_synthetic/lego", "nerf_synthetic", "lego")
    assert (len(lego.train), len(lego.test)) == (100, 200)  # its own split, not every 8th
    assert all(c.name.startswith(c.split + "/") for c in lego.cameras)


def _fake_scene(n_train_test):
    cams = []
    for split, n in n_train_test:
        cams += [_cam(f"{split}{k:03d}.png", f"{split}{k:03d}.png", split=split) for k in range(n)]
    return Scene("d", "s", cams, None, None)


def _every8_scene(n):
    split = every_nth_split([f"{k:03d}.png" for k in range(n)])
    return Scene("d", "s", [_cam(nm, nm, split=s) for nm, s in sorted(split.items())], None, None)


@pytest.mark.parametrize("make,n,expected", [
    (lambda: _every8_scene(80), 16, (14, 2)),
    (lambda: _every8_scene(80), 8, (7, 1)),
    (lambda: _every8_scene(80), 40, (35, 5)),
    (lambda: _fake_scene([("train", 100), ("test", 200)]), 40, (35, 5)),
    (lambda: _every8_scene(5), 40, (4, 1)),  # fewer than asked: everything stays
])
def test_subsample_keeps_ratio(make, n, expected):
    scene = make()
    sub = subsample(scene, n)
    assert (len(sub.train), len(sub.test)) == expected
    names = [c.name for c in sub.cameras]
    assert names == [c.name for c in scene.cameras if c.name in set(names)]  # original order kept
    assert len(set(names)) == len(names)
    # evenly spaced: the kept training views span the whole sequence
    tr = [c.name for c in scene.cameras if c.split == "train"]
    kept = [tr.index(c.name) for c in sub.cameras if c.split == "train"]
    assert kept[0] == 0 and kept[-1] == len(tr) - 1
    if len(kept) > 2:
        gaps = np.diff(kept)
        assert gaps.max() - gaps.min() <= 1


# --------------------------------------------------------------------------- undistortion
FOX_PARAMS = dict(k1=0.058, k2=-0.08, p1=-0.001, p2=0.00016)


def _fox_camera():
    """instant-ngp fox's camera at 1/4 resolution (270 x 480) with its OPENCV distortion."""
    W, H = 270, 480
    fx, fy, cx, cy = 1375.52 / 4, 1374.49 / 4, 554.558 / 4, 965.268 / 4
    K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
    params = [fx, fy, cx, cy, *FOX_PARAMS.values()]
    return _cam("fox.png", "fox.png", W, H, K, dist=("OPENCV", params))


def _smooth(u, v):
    """A smooth pinhole image, defined at any continuous pixel coordinate."""
    r = 0.5 + 0.22 * np.sin(2 * np.pi * u / 37 + 0.3) * np.cos(2 * np.pi * v / 53)
    g = 0.5 + 0.3 * np.sin(2 * np.pi * (u + v) / 61)
    b = 0.5 + 0.25 * np.cos(2 * np.pi * (u - 0.5 * v) / 45)
    return np.stack([r, g, b], -1)


def test_undistort_image_recovers_pinhole_image():
    cam = _fox_camera()
    W, H = cam.width, cam.height
    ccam = colmap_camera(*cam.distortion, W, H)
    jj, ii = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    # the distorted photo: each pixel shows the ray that COLMAP's model says lands there
    n = ccam.cam_from_img(np.stack([jj.ravel(), ii.ravel()], -1))
    pin = n[:, :2] @ cam.K[:2, :2].T + cam.K[:2, 2]
    distorted = _smooth(pin[:, 0], pin[:, 1]).reshape(H, W, 3).astype(np.float32)
    truth = _smooth(jj, ii)

    out = undistort_image(distorted, cam)
    assert out.shape == distorted.shape and out.dtype == np.float32
    m = (slice(H // 10, H - H // 10), slice(W // 10, W - W // 10))
    assert psnr(out[m], truth[m]) > 30.0
    # control: without undistortion the same comparison is far off
    assert psnr(distorted[m], truth[m]) < psnr(out[m], truth[m]) - 10
    # no distortion: the image is returned as it is
    plain = _cam(w=W, h=H, K=cam.K)
    assert undistort_image(distorted, plain) is distorted


def test_undistort_points_inverts_img_from_cam():
    cam = _fox_camera()
    ccam = colmap_camera(*cam.distortion, cam.width, cam.height)
    rng = np.random.default_rng(0)
    pin = rng.uniform([10, 10], [cam.width - 10, cam.height - 10], size=(200, 2))
    rays = np.c_[(pin - cam.K[:2, 2]) / np.diag(cam.K)[:2], np.ones(len(pin))]
    observed = ccam.img_from_cam(rays)
    assert np.abs(observed - pin).max() > 1.0  # the distortion is not negligible
    np.testing.assert_allclose(undistort_points(observed, cam), pin, atol=1e-3)
    assert undistort_points(np.zeros((0, 2)), cam).shape == (0, 2)


def test_prepare_undistorts(tmp_path):
    """prepare_scene removes the distortion: the prepared pinhole image matches the truth."""
    cam = _fox_camera()
    W, H = cam.width, cam.height
    ccam = colmap_camera(*cam.distortion, W, H)
    jj, ii = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    n = ccam.cam_from_img(np.stack([jj.ravel(), ii.ravel()], -1))
    pin = n[:, :2] @ cam.K[:2, :2].T + cam.K[:2, 2]
    _write_png(tmp_path / "src" / "fox.png", _smooth(pin[:, 0], pin[:, 1]).reshape(H, W, 3))
    scene = Scene("d", "s", [cam] * 3, None, tmp_path / "src")
    prep = prepare_scene(scene, tmp_path / "prep")
    c = prep.cameras[0]
    assert c.distortion is None and (c.width, c.height) == (264, 480)
    img = prep.load_image(0)
    # the crop removed 3 columns on the left: the truth there is the same function, shifted
    truth = _smooth(jj[:, 3:267], ii[:, 3:267])
    m = (slice(H // 10, H - H // 10), slice(W // 10, 264 - W // 10))
    assert psnr(img[m], truth[m]) > 30.0
    np.testing.assert_allclose(c.K[:2, 2], cam.K[:2, 2] - [3, 0])
