"""SfM: estimated poses against Strecha ground truth, COLMAP model round trip, images-only
scenes, and correspondence mining (real tracks and handmade ones)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import subset
from lrf import correspondences as corr
from lrf.scene.loaders import load_scene
from lrf.scene.model import Camera, Points, Scene, SceneError
from lrf.scene.prepare import prepare_scene
from lrf.sfm import rotation_angle_deg, run_sfm


# --------------------------------------------------------------------------- (a) poses vs ground truth
pytestmark = pytest.mark.slow  # SfM on real scenes

def test_herz_jesu_sfm_matches_ground_truth(data_dir, tmp_path):
    gt = load_scene("strecha", data_dir / "strecha/herz-jesu-p25", "strecha", "herz-jesu-p25", "images_4")
    prepared = prepare_scene(subset(gt, gt.cameras[:10]), tmp_path / "prepared", max_side=384)
    assert (prepared.cameras[0].width, prepared.cameras[0].height) == (384, 256)
    result, stats = run_sfm(prepared, tmp_path / "sfm", poses="sfm", max_features=2048)

    assert stats["registered"] == stats["images"] == 10
    acc = json.loads((tmp_path / "sfm" / "pose_accuracy.json").read_text())
    assert acc["cameras_compared"] == 10 and acc["reference_is_ground_truth"] is True
    assert acc["rotation_deg_median"] < 1.0, acc
    assert acc["center_rel_median"] < 0.01, acc
    assert abs(acc["focal_rel_error"]) < 0.03, acc
    assert stats["mean_reprojection_error_px"] < 1.0

    # re-derive the numbers from the written scene: same world frame as the ground truth
    saved = Scene.load(tmp_path / "sfm" / "scene.json")
    by = {c.name: c for c in prepared.cameras}
    rot = [rotation_angle_deg(c.w2c[:3, :3], by[c.name].w2c[:3, :3]) for c in saved.cameras]
    assert np.median(rot) == pytest.approx(acc["rotation_deg_median"], abs=1e-6)
    for c in saved.cameras:  # undistorted pinhole cameras on the working images
        assert c.distortion is None and saved.image_path(saved.cameras.index(c)).exists()
        assert abs(c.K[0, 0] / by[c.name].K[0, 0] - 1) < 0.03


# --------------------------------------------------------------------------- (b) COLMAP format
@pytest.mark.parametrize("kind", ["binary", "text"])
def test_colmap_model_round_trip(kind, given_runs, tmp_path):
    import pycolmap

    run = given_runs("herz-jesu")
    model = run.out / "work" / "model"
    assert (model / "cameras.bin").exists() and (model / "images.bin").exists()
    root = tmp_path / "colmap_scene"
    sparse = root / "sparse" / "0"
    sparse.mkdir(parents=True)
    if kind == "binary":
        for f in model.iterdir():
            shutil.copy2(f, sparse / f.name)
    else:
        pycolmap.Reconstruction(model).write_text(sparse)
        assert (sparse / "cameras.txt").exists() and not (sparse / "cameras.bin").exists()
    (root / "images").mkdir()
    for i in range(len(run.prepared.cameras)):
        shutil.copy2(run.prepared.image_path(i), root / "images")

    loaded = load_scene("colmap", root, "strecha", "herz-jesu-p25")
    assert loaded.meta["format"] == "colmap"
    by = {c.name: c for c in loaded.cameras}
    assert len(by) == len(run.prepared.cameras)
    for c in run.prepared.cameras:
        name = c.name.rsplit(".", 1)[0] + ".png"   # prepared images are PNGs
        d = by[name]
        assert (d.width, d.height) == (c.width, c.height) and d.distortion is None
        np.testing.assert_allclose(d.K, c.K, atol=1e-6)
        np.testing.assert_allclose(d.w2c, c.w2c, atol=1e-6)
    pts = loaded.points
    assert len(pts) == run.stats["points"]
    assert len(pts.track_point) == run.stats["observations"]
    # the model's points reproject onto their observations through the loaded cameras
    err = np.concatenate([np.linalg.norm(cam.project(pts.xyz[pts.track_point[pts.track_image == i]])[0]
                                         - pts.track_xy[pts.track_image == i], axis=1)
                          for i, cam in enumerate(loaded.cameras)])
    assert err.mean() == pytest.approx(run.stats["mean_reprojection_error_px"], abs=1e-3)


def test_colmap_model_with_distortion_is_undistorted(given_runs, tmp_path):
    """A SIMPLE_RADIAL camera at another resolution: K and distortion are rescaled, prepare removes it."""
    import pycolmap

    run = given_runs("herz-jesu")
    c = run.prepared.cameras[0]
    rec = pycolmap.Reconstruction()
    cam = pycolmap.Camera(model="SIMPLE_RADIAL", width=2 * c.width, height=2 * c.height,
                          params=[2 * c.K[0, 0], 2 * c.K[0, 2], 2 * c.K[1, 2], 0.03], camera_id=1)
    rec.add_camera_with_trivial_rig(cam)
    for k, cc in enumerate(run.prepared.cameras[:3]):
        im = pycolmap.Image(name=f"{k}.png", keypoints=np.zeros((0, 2)), camera_id=1, image_id=k + 1)
        rec.add_image_with_trivial_frame(im, pycolmap.Rigid3d(cc.w2c[:3, :4]))
    root = tmp_path / "s"
    (root / "sparse").mkdir(parents=True)
    rec.write_binary(root / "sparse")
    (root / "images").mkdir()
    for k in range(3):
        shutil.copy2(run.prepared.image_path(k), root / "images" / f"{k}.png")
    scene = load_scene("colmap", root, "d", "s")
    d = scene.cameras[0]
    f, cx, cy = c.K[0, 0], c.K[0, 2], c.K[1, 2]
    np.testing.assert_allclose(d.K, [[f, 0, cx], [0, f, cy], [0, 0, 1]], atol=1e-6)  # one focal
    assert d.distortion[0] == "SIMPLE_RADIAL"
    assert d.distortion[1] == pytest.approx([c.K[0, 0], c.K[0, 2], c.K[1, 2], 0.03])
    prepared = prepare_scene(scene, tmp_path / "prep")
    assert all(x.distortion is None for x in prepared.cameras)


# --------------------------------------------------------------------------- (c) images only
def test_images_format_needs_sfm(data_dir, tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for n in ("0003.jpg", "0004.jpg", "0005.jpg", "0006.jpg", "0007.jpg"):
        shutil.copy2(data_dir / "strecha/herz-jesu-p25/images_4" / n, root / n)
    scene = load_scene("images", root, "photos", "herz")
    assert scene.meta["poses_unknown"] and len(scene.cameras) == 5
    prepared = prepare_scene(scene, tmp_path / "prepared", max_side=320)

    with pytest.raises(SceneError, match=r"^photos/herz: .*: format has no camera poses; set poses: sfm$"):
        run_sfm(prepared, tmp_path / "given", poses="given")

    result, stats = run_sfm(prepared, tmp_path / "sfm", poses="sfm", max_features=2048)
    assert stats["registered"] == 5 and stats["points"] > 200
    assert stats["mean_reprojection_error_px"] < 1.0
    assert not (tmp_path / "sfm" / "pose_accuracy.json").exists()  # nothing to compare with
    # the focal length COLMAP found is the real one (ground truth 2759.5 px at 3072 wide)
    f = result.cameras[0].K[0, 0]
    assert f == pytest.approx(2759.48 * 320 / 3072, rel=0.05)


# --------------------------------------------------------------------------- (d) correspondences
def test_correspondences_on_real_tracks(given_runs, tmp_path):
    run = given_runs("herz-jesu")
    scene = Scene.load(run.out / "scene.json")  # what the workflow hands to the correspondence step
    m, pairs = corr.mine(scene, max_reproj_px=2.0, min_track=2)
    s = corr.summarize(scene, m, pairs)
    n = len(scene.cameras)

    assert list(m.columns) == corr.MATCH_COLUMNS
    assert s["images"] == n and 0 < s["pairs"] <= n * (n - 1) // 2
    # the run holds training views only (0000.jpg, the test view, was not picked)
    assert s["pairs_train"] == s["pairs"] and s["pairs_heldout"] == 0 and (pairs["split"] == "train").all()
    assert s["matches"] == len(m) == pairs["matches"].sum() > 500
    assert 0 < s["median_reprojection_error_px"] < 1.0
    assert 1.0 < s["median_tri_angle_deg"] < 60
    assert (m["image_i"] < m["image_j"]).all()
    assert not m.duplicated(["image_i", "image_j", "point_id"]).any()
    assert pairs["weight"].mean() == pytest.approx(1.0, abs=0.02)
    assert (pairs["weight"] >= 0.1).all() and (pairs["weight"] <= 5.0).all()
    assert ((pairs["baseline_rel"] > 0) & (pairs["view_angle_deg"] >= 0)).all()
    assert list(pairs["name_i"]) == [scene.cameras[i].name for i in pairs["image_i"]]

    # every match: both pixels inside their images, and the 3D point reprojects onto both
    row_of = {pid: k for k, pid in enumerate(scene.points.ids)}
    X = scene.points.xyz[[row_of[p] for p in m["point_id"]]]
    for side in ("i", "j"):
        idx = m[f"image_{side}"].to_numpy()
        xy = m[[f"x_{side}", f"y_{side}"]].to_numpy(np.float64)
        W = np.array([scene.cameras[k].width for k in idx]); H = np.array([scene.cameras[k].height for k in idx])
        assert ((xy >= 0) & (xy <= np.c_[W, H])).all()
        uv = np.empty_like(xy)
        for k in np.unique(idx):
            sel = idx == k
            uv[sel], z = scene.cameras[k].project(X[sel])
            assert (z > 0).all()
        d = np.linalg.norm(uv - xy, axis=1)
        assert d.max() <= 2.0 + 1e-3
        np.testing.assert_allclose(d, m[f"err_{side}"], atol=1e-3)

    corr.write(tmp_path / "c", m, pairs, s)
    m2, p2 = corr.load(tmp_path / "c")
    pd.testing.assert_frame_equal(m2, m)
    pd.testing.assert_frame_equal(p2, pairs)
    assert json.loads((tmp_path / "c" / "summary.json").read_text()) == s

    fewer, _ = corr.mine(scene, max_reproj_px=0.3)
    assert 0 < len(fewer) < len(m) and (fewer[["err_i", "err_j"]].to_numpy() <= 0.3).all()
    capped, cp = corr.mine(scene, max_per_pair=5)
    assert (cp["matches"] <= 5).all() and len(capped) == np.minimum(pairs["matches"], 5).sum()


def _handmade_scene() -> Scene:
    """Three cameras on the x axis looking down +z; four points with crafted tracks."""
    K = np.array([[100.0, 0, 50.0], [0, 100.0, 50.0], [0, 0, 1]])
    cams = []
    for k, x in enumerate([-1.0, 0.0, 1.0]):
        w2c = np.eye(4)
        w2c[0, 3] = -x
        cams.append(Camera(f"c{k}.png", f"c{k}.png", 100, 100, K, w2c, "test" if k == 2 else "train"))
    xyz = np.array([[0.0, 0.0, 5.0], [0.2, 0.1, 4.0], [0.3, -0.2, 6.0], [-0.1, 0.3, 5.0]])
    ids = np.array([10, 20, 30, 40])
    obs = []  # (point row, image, offset in px)
    obs += [(0, 0, 0.0), (0, 1, 0.5), (0, 2, 0.0), (0, 0, 1.5)]  # A: 3 views (+ a worse duplicate in 0)
    obs += [(1, 0, 0.0), (1, 1, 1.0)]                            # B: 2 views
    obs += [(2, 2, 0.0)]                                         # C: seen once
    obs += [(3, 0, 0.0), (3, 1, 5.0)]                            # D: second view is 5 px off
    tp = np.array([o[0] for o in obs]); ti = np.array([o[1] for o in obs])
    xy = np.stack([cams[i].project(xyz[p][None])[0][0] + [off, 0.0] for p, i, off in obs])
    pts = Points(xyz, np.zeros((4, 3), np.uint8), np.zeros(4), ids, tp, ti, xy)
    return Scene("hand", "made", cams, pts, None)


def test_correspondences_handmade_tracks():
    scene = _handmade_scene()
    m, pairs = corr.mine(scene, max_reproj_px=2.0, min_track=2)
    got = [tuple(r) for r in m[["image_i", "image_j", "point_id"]].itertuples(index=False)]
    assert got == [(0, 1, 10), (0, 1, 20), (0, 2, 10), (1, 2, 10)]
    a01 = m.iloc[0]
    np.testing.assert_allclose([a01.err_i, a01.err_j], [0.0, 0.5], atol=1e-5)  # the better duplicate kept
    uv0 = scene.cameras[0].project(scene.points.xyz[:1])[0][0]
    np.testing.assert_allclose([a01.x_i, a01.y_i], uv0, atol=1e-4)

    assert list(pairs["matches"]) == [2, 1, 1]
    assert list(pairs["split"]) == ["train", "heldout", "heldout"]
    assert list(pairs["name_j"]) == ["c1.png", "c2.png", "c2.png"]
    # triangulation angle of point A between cameras 0 and 2 (x = -1 and +1, depth 5)
    assert pairs["tri_angle_deg"].iloc[1] == pytest.approx(np.degrees(2 * np.arctan(1 / 5)), rel=1e-6)
    assert pairs["weight"].mean() == pytest.approx(1.0)
    assert pairs["baseline_rel"].tolist() == pytest.approx([1.0, 2.0, 1.0])

    # a looser reprojection limit lets D's 5 px view through
    loose, _ = corr.mine(scene, max_reproj_px=6.0)
    assert (0, 1, 40) in {tuple(r) for r in loose[["image_i", "image_j", "point_id"]].itertuples(index=False)}
    # min_track 3 keeps only A
    m3, p3 = corr.mine(scene, min_track=3)
    assert set(m3["point_id"]) == {10} and len(m3) == 3 and len(p3) == 3
    # nothing left -> one clear error
    with pytest.raises(SceneError, match=r"^hand/made: points.npz: no correspondences survive the filters"):
        corr.mine(scene, min_track=4)
    with pytest.raises(SceneError, match="scene has no SfM tracks"):
        corr.mine(Scene("hand", "made", scene.cameras, None, None))


def test_sfm_that_drops_every_heldout_view_fails_at_sfm():
    """A mapping that registers the training views but none of the held-out ones could be
    fitted and never scored: it fails at the SfM step with one line naming the views."""
    from lrf.sfm import check_heldout_registered

    scene = _handmade_scene()                       # c2.png is the test view
    names = [c.name for c in scene.cameras]
    check_heldout_registered(scene, names, {"c0.png", "c1.png", "c2.png"}, "imgs")
    check_heldout_registered(scene, names, {"c0.png", "c2.png"}, "imgs")     # a train view lost: fine
    with pytest.raises(SceneError) as e:
        check_heldout_registered(scene, names, {"c0.png", "c1.png"}, "imgs")
    msg = str(e.value)
    assert "none of the 1 held-out views (c2.png)" in msg and "imgs" in msg and "\n" not in msg
