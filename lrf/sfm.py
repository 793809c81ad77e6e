"""Structure from motion with pycolmap: SIFT, matching, then mapping or triangulation.

Given poses: the prepared pinhole cameras are fixed and only points are triangulated
(`pycolmap.triangulate_points`). Unknown (or re-estimated) poses: incremental mapping with one
shared SIMPLE_RADIAL camera, undistortion to pinhole, and, where the loader had poses, a
similarity alignment onto them so the world frame stays the dataset's and pose errors can be
reported (`pose_accuracy.json`; ground truth for Strecha, a reference elsewhere).

It runs on the images of `lrf.prepare --format ... --multiple 1` at `sfm.max_side`, not on the
working images: poses and tracks come from the sharpest images available, and one SfM serves
every working resolution (`lrf.prepare --scene` maps cameras and tracks onto it exactly).

    python -m lrf.sfm --scene results/D/S/sfm/input/scene.json --out results/D/S/sfm --poses given
"""
from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from lrf.io import atomic_write_json
from lrf.scene.loaders import points_from_reconstruction
from lrf.scene.model import Camera, Scene, SceneError
from lrf.scene.prepare import prepare_scene

log = logging.getLogger("lrf.sfm")


def quiet_colmap() -> None:
    """COLMAP logs every image at INFO through glog; keep warnings and errors only."""
    import pycolmap

    if hasattr(pycolmap, "logging"):
        pycolmap.logging.minloglevel = 1


def _rigid(w2c: np.ndarray):
    import pycolmap

    return pycolmap.Rigid3d(w2c[:3, :4])


def _extract(db: Path, image_dir: Path, names: list[str], single_camera: bool, threads: int,
             max_features: int, camera_model: str, params: str = "") -> None:
    import pycolmap

    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = camera_model
    if params:
        reader.camera_params = params
    ext = pycolmap.FeatureExtractionOptions()
    ext.num_threads = threads
    ext.sift.max_num_features = max_features
    pycolmap.extract_features(db, image_dir, image_names=names,
                              camera_mode=pycolmap.CameraMode.SINGLE if single_camera else pycolmap.CameraMode.PER_IMAGE,
                              reader_options=reader, extraction_options=ext, device=pycolmap.Device.cpu)


def _match(db: Path, matcher: str, n_images: int, threads: int, seed: int = 0) -> str:
    """Match and verify; RANSAC is seeded so two runs give the same inliers (and points)."""
    import pycolmap

    pycolmap.set_random_seed(seed)
    vo = pycolmap.TwoViewGeometryOptions()
    vo.ransac.random_seed = seed

    if matcher == "auto":
        matcher = "exhaustive" if n_images <= 120 else "sequential"
    mo = pycolmap.FeatureMatchingOptions()
    mo.num_threads = threads
    if matcher == "exhaustive":
        pycolmap.match_exhaustive(db, matching_options=mo, verification_options=vo, device=pycolmap.Device.cpu)
    elif matcher == "sequential":
        po = pycolmap.SequentialPairingOptions()
        po.overlap = 15
        pycolmap.match_sequential(db, matching_options=mo, pairing_options=po, verification_options=vo,
                                  device=pycolmap.Device.cpu)
    elif matcher == "spatial":
        pycolmap.match_spatial(db, matching_options=mo, verification_options=vo, device=pycolmap.Device.cpu)
    else:
        raise ValueError(f"unknown matcher {matcher!r}")
    return matcher


def _image_dir(scene: Scene) -> tuple[Path, list[str]]:
    paths = [scene.image_path(i).resolve() for i in range(len(scene.cameras))]
    dirs = {p.parent for p in paths}
    if len(dirs) != 1:
        raise SceneError(scene.key, scene.root, "prepared images must share one folder")
    return dirs.pop(), [p.name for p in paths]


def _features_and_matches(scene: Scene, work: Path, matcher: str, threads: int, max_features: int, seed: int,
                          known_cameras: bool):
    """SIFT + matching into work/database.db, timed. Known cameras: one PINHOLE per image (its K is
    set later); unknown: one shared SIMPLE_RADIAL camera for the mapper to refine."""
    image_dir, names = _image_dir(scene)
    db = work / "database.db"
    t = {}
    t0 = time.perf_counter()
    _extract(db, image_dir, names, single_camera=not known_cameras, threads=threads, max_features=max_features,
             camera_model="PINHOLE" if known_cameras else "SIMPLE_RADIAL")
    t["extract_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    used = _match(db, matcher, len(names), threads, seed)
    t["match_s"] = time.perf_counter() - t0
    return image_dir, names, db, t, used


def triangulate_given(scene: Scene, work: Path, matcher: str, threads: int, max_features: int, seed: int):
    """Fixed cameras and poses from the loader; points from matches + triangulation."""
    import pycolmap

    image_dir, names, db, t, used = _features_and_matches(scene, work, matcher, threads, max_features, seed,
                                                          known_cameras=True)
    t0 = time.perf_counter()
    database = pycolmap.Database.open(db)
    by_name = {im.name: im for im in database.read_all_images()}
    rec = pycolmap.Reconstruction()
    for cam, name in zip(scene.cameras, names):
        dbim = by_name[name]
        K = cam.K
        rc = pycolmap.Camera(model="PINHOLE", width=cam.width, height=cam.height,
                             params=[K[0, 0], K[1, 1], K[0, 2], K[1, 2]], camera_id=dbim.camera_id)
        rec.add_camera_with_trivial_rig(rc)
        kps = database.read_keypoints(dbim.image_id)[:, :2].astype(np.float64)
        im = pycolmap.Image(name=name, keypoints=kps, camera_id=dbim.camera_id, image_id=dbim.image_id)
        rec.add_image_with_trivial_frame(im, _rigid(cam.w2c))
    database.close()
    opts = pycolmap.IncrementalPipelineOptions()
    opts.num_threads = 1  # multi-threaded bundle adjustment is not bit-repeatable; this step is short
    opts.random_seed = seed
    tri_dir = work / "model"
    tri_dir.mkdir(parents=True, exist_ok=True)
    rec = pycolmap.triangulate_points(rec, db, image_dir, tri_dir, options=opts)
    t["triangulate_s"] = time.perf_counter() - t0
    index = {iid: names.index(rec.image(iid).name) for iid in rec.reg_image_ids()}
    points = points_from_reconstruction(rec, index)
    out = Scene(scene.dataset, scene.name, scene.cameras, points, scene.root, dict(scene.meta))
    return out, rec, t, used


def check_heldout_registered(scene: Scene, names: list[str], registered: set[str], where: Path) -> None:
    """Fail at SfM, not at evaluation, when mapping dropped every held-out view: the scene
    could be fitted but never scored. names[i] is the image file of scene.cameras[i]."""
    test = [n for cam, n in zip(scene.cameras, names) if cam.split == "test"]
    if test and not any(n in registered for n in test):
        raise SceneError(scene.key, where, f"SfM registered none of the {len(test)} held-out views "
                                           f"({', '.join(test[:4])}{', ...' if len(test) > 4 else ''}); "
                                           "nothing to evaluate")


def map_unknown(scene: Scene, work: Path, matcher: str, threads: int, max_features: int, seed: int,
                min_registered: float):
    """Incremental mapping; returns a scene whose cameras are the registered images."""
    import pycolmap

    image_dir, names, db, t, used = _features_and_matches(scene, work, matcher, threads, max_features, seed,
                                                          known_cameras=False)
    t0 = time.perf_counter()
    opts = pycolmap.IncrementalPipelineOptions()
    opts.num_threads = 1  # multi-threaded bundle adjustment is not bit-repeatable; this step is short
    opts.random_seed = seed
    opts.multiple_models = False
    maps_dir = work / "mapping"
    maps_dir.mkdir(parents=True, exist_ok=True)
    recs = pycolmap.incremental_mapping(db, image_dir, maps_dir, options=opts)
    t["map_s"] = time.perf_counter() - t0
    rec = max(recs.values(), key=lambda r: r.num_reg_images()) if recs else None
    n_reg = rec.num_reg_images() if rec is not None else 0
    if n_reg < min_registered * len(names):
        raise SceneError(scene.key, image_dir, f"SfM registered only {n_reg} of {len(names)} images "
                                               f"(need at least {min_registered:.0%})")
    reg = {rec.image(i).name: i for i in rec.reg_image_ids()}
    check_heldout_registered(scene, names, set(reg), image_dir)
    missing = [n for n in names if n not in reg]
    if missing:
        log.warning("%s: %s: %d images not registered, dropped: %s", scene.key, image_dir, len(missing),
                    ", ".join(missing[:8]))
    cams, index = [], {}
    from lrf.scene.loaders import camera_from_colmap

    for cam, name in zip(scene.cameras, names):
        if name not in reg:
            continue
        im = rec.image(reg[name])
        K, dist = camera_from_colmap(rec.camera(im.camera_id), scene.key, maps_dir)
        w2c = np.eye(4)
        w2c[:3, :] = im.cam_from_world().matrix()
        index[reg[name]] = len(cams)
        cams.append(Camera(cam.name, str(scene.image_path(names.index(name)).resolve()), cam.width, cam.height,
                           K, w2c, cam.split, dist))
    points = points_from_reconstruction(rec, index)
    est = Scene(scene.dataset, scene.name, cams, points, scene.root, dict(scene.meta))
    return est, rec, t, used


def similarity_align(src: np.ndarray, tgt: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Umeyama: (s, R, t) minimising |s R src + t - tgt|^2 over corresponding points."""
    mu_s, mu_t = src.mean(0), tgt.mean(0)
    a, b = src - mu_s, tgt - mu_t
    U, S, Vt = np.linalg.svd(b.T @ a / len(src))
    D = np.eye(3)
    D[2, 2] = np.sign(np.linalg.det(U @ Vt))
    R = U @ D @ Vt
    s = float(np.trace(np.diag(S) @ D) / (a ** 2).sum(1).mean())
    return s, R, mu_t - s * R @ mu_s


def transform_scene(scene: Scene, s: float, R: np.ndarray, t: np.ndarray) -> Scene:
    """Apply X' = s R X + t to cameras and points (world-to-camera: R_cw' = R_cw R^T)."""
    cams = []
    for c in scene.cameras:
        w2c = np.eye(4)
        w2c[:3, :3] = c.w2c[:3, :3] @ R.T
        w2c[:3, 3] = -w2c[:3, :3] @ (s * R @ c.center + t)
        cams.append(Camera(c.name, c.image_path, c.width, c.height, c.K.copy(), w2c, c.split, c.distortion))
    pts = scene.points
    if pts is not None:
        from dataclasses import replace

        pts = replace(pts, xyz=pts.xyz @ (s * R).T + t)
    return Scene(scene.dataset, scene.name, cams, pts, scene.root, dict(scene.meta))


def rotation_angle_deg(Ra: np.ndarray, Rb: np.ndarray) -> float:
    c = (np.trace(Ra @ Rb.T) - 1) / 2
    return float(np.degrees(np.arccos(np.clip(c, -1, 1))))


def pose_accuracy(est: Scene, ref: Scene) -> dict:
    """Errors of `est` against `ref` (same world frame already), for the cameras both have.

    Camera-centre errors are relative to the camera extent: the largest distance between two
    reference camera centres.
    """
    ref_by = {c.name: c for c in ref.cameras}
    pairs = [(c, ref_by[c.name]) for c in est.cameras if c.name in ref_by]
    rot = np.array([rotation_angle_deg(a.w2c[:3, :3], b.w2c[:3, :3]) for a, b in pairs])
    cen_ref = np.stack([b.center for _, b in pairs])
    extent = float(max(np.linalg.norm(cen_ref[:, None] - cen_ref[None], axis=-1).max(), 1e-12))
    cen = np.array([np.linalg.norm(a.center - b.center) for a, b in pairs]) / extent
    f_est = np.array([a.K[0, 0] for a, _ in pairs]); f_ref = np.array([b.K[0, 0] for _, b in pairs])
    return {"cameras_compared": len(pairs), "cameras_reference": len(ref.cameras),
            "rotation_deg_median": float(np.median(rot)), "rotation_deg_max": float(rot.max()),
            "center_rel_median": float(np.median(cen)), "center_rel_max": float(cen.max()),
            "center_extent": extent,
            "focal_rel_error": float(np.mean(f_est / f_ref) - 1.0),
            "reference_is_ground_truth": bool(ref.meta.get("ground_truth", False))}


def run_sfm(scene: Scene, out_dir: Path, poses: str = "given", matcher: str = "auto", threads: int = 2,
            max_features: int = 8192, seed: int = 0, min_registered: float = 0.5) -> tuple[Scene, dict]:
    out_dir = Path(out_dir)
    work = out_dir / "work"
    if work.exists():
        shutil.rmtree(work)  # colmap databases are not resumable mid-write; start clean
    work.mkdir(parents=True)
    if scene.meta.get("poses_unknown") and poses == "given":
        raise SceneError(scene.key, scene.root, "format has no camera poses; set poses: sfm")
    quiet_colmap()
    t_all = time.perf_counter()
    accuracy = None
    if poses == "given":
        result, rec, times, used = triangulate_given(scene, work, matcher, threads, max_features, seed)
    elif poses == "sfm":
        result, rec, times, used = map_unknown(scene, work, matcher, threads, max_features, seed, min_registered)
        if any(c.distortion for c in result.cameras):
            t0 = time.perf_counter()
            result = prepare_scene(result, out_dir / "undistorted", multiple=1)  # SfM resolution, no crop
            times["undistort_s"] = time.perf_counter() - t0
        if not scene.meta.get("poses_unknown"):
            ref_by = {c.name: c for c in scene.cameras}
            src = np.stack([c.center for c in result.cameras])
            tgt = np.stack([ref_by[c.name].center for c in result.cameras])
            result = transform_scene(result, *similarity_align(src, tgt))
            accuracy = pose_accuracy(result, scene)
    else:
        raise ValueError(f"poses must be 'given' or 'sfm', not {poses!r}")
    if result.points is None or len(result.points) == 0:
        raise SceneError(scene.key, work / "database.db", "SfM produced no 3D points")
    pts = result.points
    obs_err = reprojection_errors(result)
    c0 = scene.cameras[0]
    stats = {"scene": scene.key, "poses": poses, "matcher": used, "images": len(scene.cameras),
             "image_size": [c0.width, c0.height],
             "registered": len(result.cameras), "points": int(len(pts)), "observations": int(len(pts.track_point)),
             "mean_track_length": float(len(pts.track_point) / max(len(pts), 1)),
             "mean_reprojection_error_px": float(obs_err.mean()) if len(obs_err) else float("nan"),
             "colmap_mean_reprojection_error_px": float(rec.compute_mean_reprojection_error()),
             **{k: round(v, 3) for k, v in times.items()}, "total_s": round(time.perf_counter() - t_all, 3)}
    result.meta.update({"sfm": stats})
    result.save(out_dir / "scene.json")
    if accuracy is not None:
        atomic_write_json(out_dir / "pose_accuracy.json", accuracy)
    atomic_write_json(out_dir / "stats.json", stats)
    return result, stats


def reprojection_errors(scene: Scene) -> np.ndarray:
    """Per-observation pixel error of the stored points through the stored (pinhole) cameras."""
    p = scene.points
    err = np.zeros(len(p.track_point))
    for i, cam in enumerate(scene.cameras):
        m = p.track_image == i
        if m.any():
            uv, _ = cam.project(p.xyz[p.track_point[m]])
            err[m] = np.linalg.norm(uv - p.track_xy[m], axis=1)
    return err


def main(argv=None) -> int:
    from lrf.cli import run_main

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scene", required=True, type=Path, help="prepared scene.json")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--poses", choices=["given", "sfm"], default="given")
    ap.add_argument("--matcher", choices=["auto", "exhaustive", "sequential", "spatial"], default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-features", type=int, default=8192)
    ap.add_argument("--min-registered", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    def go():
        scene = Scene.load(args.scene)
        _, stats = run_sfm(scene, args.out, args.poses, args.matcher, args.threads, args.max_features,
                           args.seed, args.min_registered)
        return (f"{stats['scene']}: sfm {stats['poses']}: {stats['registered']}/{stats['images']} registered, "
                f"{stats['points']} points, reproj {stats['mean_reprojection_error_px']:.2f} px, {stats['total_s']:.0f} s")

    return run_main(go)


if __name__ == "__main__":
    raise SystemExit(main())
