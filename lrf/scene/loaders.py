"""Loaders: one per on-disk format, each converting to the OpenCV world-to-camera convention.

A loader returns cameras at the resolution of the image files it finds (camera files that
describe another resolution are rescaled by actual width / file width), with any lens
distortion still attached; `lrf.scene.prepare` makes the working images from that.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np

from lrf.scene.images import image_size
from lrf.scene.model import Camera, Points, Scene, SceneError, every_nth_split

log = logging.getLogger("lrf.scene")

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
FORMATS = ("colmap", "llff", "nerf", "strecha", "middlebury", "images")
# COLMAP camera models we can undistort or use as they are.
SUPPORTED_MODELS = {"SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV"}


def list_images(folder: Path, scene: str) -> list[Path]:
    if not folder.is_dir():
        raise SceneError(scene, folder, "image folder does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
    if not files:
        raise SceneError(scene, folder, "image folder holds no images")
    return files


def pick_image_dir(root: Path, scene: str, images: str | None = None) -> Path:
    """`images` if named, else the LLFF-style folder with the least downscaling present."""
    if images:
        return root / images
    cands = [root / "images"] + sorted(root.glob("images_*"), key=lambda p: _factor(p.name))
    for c in cands:
        if c.is_dir():
            return c
    raise SceneError(scene, root / "images", "no images/ or images_N/ folder")


def _factor(name: str) -> float:
    m = re.fullmatch(r"images_(\d+)", name)
    return float(m.group(1)) if m else 1.0


def check_same_size(scene: str, paths: list[Path]) -> tuple[int, int]:
    sizes = {}
    for p in paths:
        sizes.setdefault(image_size(p, scene), p)
    if len(sizes) > 1:
        (s0, p0), (s1, p1) = list(sizes.items())[:2]
        raise SceneError(scene, p1, f"images differ in size: {p1.name} is {s1[0]}x{s1[1]}, "
                                    f"{p0.name} is {s0[0]}x{s0[1]}")
    return next(iter(sizes))


def _intrinsics(f_x, f_y, c_x, c_y) -> np.ndarray:
    return np.array([[f_x, 0, c_x], [0, f_y, c_y], [0, 0, 1.0]])


def _w2c_from_c2w(R_c2w: np.ndarray, center: np.ndarray) -> np.ndarray:
    w2c = np.eye(4)
    w2c[:3, :3] = R_c2w.T
    w2c[:3, 3] = -R_c2w.T @ center
    return w2c


# --------------------------------------------------------------------------- LLFF
def load_llff(root: Path, dataset: str, name: str, images: str | None = None) -> Scene:
    """`poses_bounds.npy`: rows follow sorted image names; rotation columns are [down, right, back]."""
    key = f"{dataset}/{name}"
    pb_path = root / "poses_bounds.npy"
    if not pb_path.exists():
        raise SceneError(key, pb_path, "camera file is missing")
    try:
        pb = np.load(pb_path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same bad input
        raise SceneError(key, pb_path, f"cannot read ({type(e).__name__})") from None
    if pb.ndim != 2 or pb.shape[1] != 17:
        raise SceneError(key, pb_path, f"expected N x 17, got {pb.shape}")
    img_dir = pick_image_dir(root, key, images)
    files = list_images(img_dir, key)
    if len(files) != len(pb):
        raise SceneError(key, img_dir, f"{len(files)} images but {len(pb)} poses in {pb_path.name}")
    W, H = check_same_size(key, files)
    split = every_nth_split([p.name for p in files])
    cams = []
    for p, row in zip(files, pb):
        m = row[:15].reshape(3, 5)
        h_full, w_full, focal = m[:, 4]
        s = W / w_full
        if abs(H / h_full - s) > 0.01:
            raise SceneError(key, p, f"aspect ratio {W}x{H} does not match poses' {w_full:g}x{h_full:g}")
        R = np.stack([m[:, 1], m[:, 0], -m[:, 2]], axis=1)  # OpenCV c2w axes: right, down, forward
        K = _intrinsics(focal * s, focal * s, W / 2.0, H / 2.0)
        cams.append(Camera(p.name, str(p), W, H, K, _w2c_from_c2w(R, m[:, 3]), split[p.name]))
    return Scene(dataset, name, cams, None, root, {"format": "llff", "bounds": pb[:, 15:].tolist()})


# --------------------------------------------------------------------------- NeRF / instant-ngp
_GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


def _resolve_frame_file(root: Path, fp: str) -> Path:
    p = (root / fp).resolve() if not Path(fp).is_absolute() else Path(fp)
    if p.suffix.lower() in IMAGE_EXTS:
        return p
    for ext in (".png", ".jpg", ".jpeg"):
        if p.with_name(p.name + ext).exists():
            return p.with_name(p.name + ext)
    return p.with_name(p.name + ".png")


def load_nerf(root: Path, dataset: str, name: str, images: str | None = None) -> Scene:
    """`transforms*.json`: OpenGL camera-to-world; the dataset's own train/test files if present."""
    key = f"{dataset}/{name}"
    split_files = {s: root / f"transforms_{s}.json" for s in ("train", "test")}
    if all(p.exists() for p in split_files.values()):
        sources = list(split_files.items())
    elif (root / "transforms.json").exists():
        sources = [(None, root / "transforms.json")]
    else:
        raise SceneError(key, root / "transforms.json", "camera file is missing")
    frames: list[tuple[str | None, dict, dict, Path]] = []
    for split, path in sources:
        try:
            doc = json.loads(path.read_text())
        except Exception as e:  # noqa: BLE001
            raise SceneError(key, path, f"cannot parse JSON ({type(e).__name__})") from None
        for fr in doc.get("frames", []):
            frames.append((split, doc, fr, path))
    if not frames:
        raise SceneError(key, sources[0][1], "lists no frames")
    present, missing = [], []
    for split, doc, fr, path in frames:
        img = _resolve_frame_file(root, fr["file_path"])
        (present if img.exists() else missing).append((split, doc, fr, img))
    if missing:
        names = ", ".join(m[3].name for m in missing[:8]) + (" ..." if len(missing) > 8 else "")
        log.warning("%s: %s: %d of %d listed frames have no image file, skipped: %s",
                    key, sources[0][1], len(missing), len(frames), names)
    if not present:
        raise SceneError(key, sources[0][1], "none of the listed frames has an image file")
    W, H = check_same_size(key, [f[3] for f in present])
    auto_split = every_nth_split([f[3].name for f in present if f[0] is None])
    cams = []
    seen = set()
    for split, doc, fr, img in present:
        merged = {**doc, **{k: v for k, v in fr.items() if k not in ("transform_matrix", "file_path")}}
        w_file = float(merged.get("w", W))
        s = W / w_file
        if "fl_x" in merged:
            fx = float(merged["fl_x"]) * s
            fy = float(merged.get("fl_y", merged["fl_x"])) * s
        elif "camera_angle_x" in merged:
            fx = fy = 0.5 * W / np.tan(0.5 * float(merged["camera_angle_x"]))
        else:
            raise SceneError(key, sources[0][1], "no focal length (fl_x or camera_angle_x)")
        cx = float(merged["cx"]) * s if "cx" in merged else W / 2.0
        cy = float(merged["cy"]) * s if "cy" in merged else H / 2.0
        c2w = np.asarray(fr["transform_matrix"], dtype=np.float64) @ _GL_TO_CV
        dist = None
        k = [float(merged.get(n, 0.0)) for n in ("k1", "k2", "p1", "p2")]
        if any(abs(v) > 0 for v in k):
            dist = ("OPENCV", [fx, fy, cx, cy] + k)
        nm = img.name if split is None else f"{split}/{img.name}"
        if nm in seen:
            raise SceneError(key, img, "image listed twice")
        seen.add(nm)
        cams.append(Camera(nm, str(img), W, H, _intrinsics(fx, fy, cx, cy),
                           np.linalg.inv(c2w), split or auto_split[img.name], dist))
    return Scene(dataset, name, cams, None, root, {"format": "nerf"})


# --------------------------------------------------------------------------- Strecha
def read_strecha_camera(path: Path, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """(K, R camera-to-world, C, (w, h)) from a `.camera` file (9 rows)."""
    try:
        rows = [list(map(float, ln.split())) for ln in path.read_text().splitlines() if ln.strip()]
        K = np.array(rows[0:3]); R = np.array(rows[4:7]); C = np.array(rows[7]); wh = tuple(int(v) for v in rows[8])
        assert K.shape == (3, 3) and R.shape == (3, 3) and C.shape == (3,) and len(wh) == 2
    except Exception:  # noqa: BLE001
        raise SceneError(key, path, "malformed Strecha .camera file (want K, distortion, R, C, size)") from None
    return K, R, C, wh


def load_strecha(root: Path, dataset: str, name: str, images: str | None = None) -> Scene:
    """Ground-truth cameras: X_cam = R^T (X - C), i.e. the file's R is camera-to-world."""
    key = f"{dataset}/{name}"
    img_dir = pick_image_dir(root, key, images)
    files = list_images(img_dir, key)
    W, H = check_same_size(key, files)
    split = every_nth_split([p.name for p in files])
    cams = []
    for p in files:
        cpath = root / "gt_dense_cameras" / f"{p.name}.camera"
        if not cpath.exists():
            raise SceneError(key, cpath, "camera file is missing")
        K, R, C, (wf, hf) = read_strecha_camera(cpath, key)
        s = W / wf
        cams.append(Camera(p.name, str(p), W, H, np.diag([s, s, 1.0]) @ K, _w2c_from_c2w(R, C), split[p.name]))
    return Scene(dataset, name, cams, None, root, {"format": "strecha", "ground_truth": True})


# --------------------------------------------------------------------------- Middlebury
# Middlebury's K puts the centre of the top-left pixel at (0, 0); ours puts it at (0.5, 0.5).
MIDDLEBURY_PIXEL_OFFSET = 0.5
_PAR_FIELDS = 1 + 9 + 9 + 3


def find_par_file(root: Path, key: str) -> Path:
    """The one `*_par.txt` of a Middlebury scene folder (its name carries the scene's prefix)."""
    found = sorted(p for p in root.glob("*_par.txt") if p.is_file())
    if not found:
        raise SceneError(key, root / "*_par.txt", "camera file is missing (no *_par.txt)")
    if len(found) > 1:
        raise SceneError(key, root, f"several camera files: {', '.join(p.name for p in found)}")
    return found[0]


def read_middlebury_par(path: Path, key: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{image name: (K, R, t)} from `*_par.txt`: a count line, then `name k11..k33 r11..r33 t1 t2 t3`."""
    try:
        lines = [(n, ln.split()) for n, ln in enumerate(path.read_text().splitlines(), 1) if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise SceneError(key, path, f"cannot read ({type(e).__name__})") from None
    if not lines:
        raise SceneError(key, path, "camera file is empty")
    count = None
    if len(lines[0][1]) == 1:  # the header: how many lines follow
        n, (tok,) = lines.pop(0)
        if not tok.isdigit():
            raise SceneError(key, path, f"line {n}: expected the number of cameras, got {tok!r}")
        count = int(tok)
    cams: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for n, toks in lines:
        if len(toks) != _PAR_FIELDS:
            raise SceneError(key, path, f"line {n}: {len(toks)} fields, expected {_PAR_FIELDS} "
                                        "(name, K row-major, R row-major, t)")
        try:
            v = np.array([float(x) for x in toks[1:]])
        except ValueError:
            bad = next(x for x in toks[1:] if not _is_float(x))
            raise SceneError(key, path, f"line {n}: not a number: {bad!r}") from None
        K, R, t = v[:9].reshape(3, 3), v[9:18].reshape(3, 3), v[18:]
        if not np.all(np.isfinite(v)):
            raise SceneError(key, path, f"line {n}: non-finite value")
        if K[1, 0] or K[2, 0] or K[2, 1] or K[2, 2] != 1 or K[0, 0] <= 0 or K[1, 1] <= 0:
            raise SceneError(key, path, f"line {n}: K is not an upper-triangular intrinsic matrix")
        if np.abs(R @ R.T - np.eye(3)).max() > 1e-3 or np.linalg.det(R) < 0:
            raise SceneError(key, path, f"line {n}: R is not a rotation (R R^T != I or det < 0)")
        if toks[0] in cams:
            raise SceneError(key, path, f"line {n}: {toks[0]} listed twice")
        cams[toks[0]] = (K, R, t)
    if count is not None and count != len(cams):
        raise SceneError(key, path, f"header says {count} cameras, {len(cams)} lines follow")
    if not cams:
        raise SceneError(key, path, "lists no cameras")
    return cams


def _same_camera(a, b, tol: float = 1e-6) -> bool:
    return all(np.allclose(x, y, rtol=0, atol=tol) for x, y in zip(a, b))


def _is_float(x: str) -> bool:
    try:
        float(x)
        return True
    except ValueError:
        return False


def load_middlebury(root: Path, dataset: str, name: str, images: str | None = None) -> Scene:
    """Middlebury multi-view stereo (`*_par.txt`): x ~ K [R | t] X, R world-to-camera, OpenCV axes.

    The images sit beside the par file (or in `images`; `images_N` = 1/N). Views rotated 180
    degrees in the image plane need nothing: their R says so.

    Pixel centres: the file's K puts them at integers, so the loader adds +0.5 to the principal
    point (MIDDLEBURY_PIXEL_OFFSET). Measured on templeSparseRing, 16 views at 640x480: SIFT
    features (centres at +0.5) triangulated with the file's poses give a mean reprojection error
    of 0.49 / 0.36 / 0.30 / 0.34 px with -0.5 / 0 / +0.5 / +1 added; the least-squares shared
    offset is (+0.24, +1.16) px, so the calibration's own principal point is off by about
    (-0.26, +0.66) px after the +0.5 (the same fit on Blender-rendered lego finds (0.01, -0.05)).
    test_middlebury_pixel_centres in tests/test_loaders_geometry.py repeats the comparison.

    A line with the same camera as an earlier one (templeSR0011 = templeSR0001: longitude 180 and
    -180) is a second photo of one viewpoint: it is skipped with a warning, so that no held-out
    view has a training twin.
    """
    key = f"{dataset}/{name}"
    par = find_par_file(root, key)
    table = read_middlebury_par(par, key)
    img_dir = root / images if images else root
    present = {p.name: p for p in list_images(img_dir, key)}
    for nm in table:
        if nm not in present:
            raise SceneError(key, img_dir / nm, f"image listed in {par.name} is missing")
    extra = sorted(set(present) - set(table))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise SceneError(key, present[extra[0]], f"image has no line in {par.name}{more}")
    kept: list[str] = []
    for nm in sorted(table):
        twin = next((k for k in kept if _same_camera(table[k], table[nm])), None)
        if twin is None:
            kept.append(nm)
        else:
            log.warning("%s: %s: %s has the same camera as %s (one viewpoint photographed twice), skipped",
                        key, par, nm, twin)
    files = [present[nm] for nm in kept]
    W, H = check_same_size(key, files)
    s = 1.0 / _factor(img_dir.name)
    split = every_nth_split([p.name for p in files])
    cams = []
    for p in files:
        K, R, t = table[p.name]
        K = K.copy()
        K[:2, 2] += MIDDLEBURY_PIXEL_OFFSET
        w2c = np.eye(4)
        w2c[:3, :3], w2c[:3, 3] = R, t
        cams.append(Camera(p.name, str(p), W, H, np.diag([s, s, 1.0]) @ K, w2c, split[p.name]))
    return Scene(dataset, name, cams, None, root, {"format": "middlebury", "par_file": par.name})


# --------------------------------------------------------------------------- COLMAP
def camera_from_colmap(cam, key: str, where: Path) -> tuple[np.ndarray, tuple[str, list[float]] | None]:
    """(K, distortion or None) from a pycolmap.Camera."""
    model = cam.model.name
    if model not in SUPPORTED_MODELS:
        raise SceneError(key, where, f"unsupported camera model {model} (supported: {', '.join(sorted(SUPPORTED_MODELS))})")
    p = list(map(float, cam.params))
    if model in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL"):
        K = _intrinsics(p[0], p[0], p[1], p[2])
    else:
        K = _intrinsics(p[0], p[1], p[2], p[3])
    dist = None
    if model in ("SIMPLE_RADIAL", "RADIAL", "OPENCV") and any(abs(v) > 0 for v in p[3 if model != "OPENCV" else 4:]):
        dist = (model, p)
    return K, dist


def load_colmap(root: Path, dataset: str, name: str, images: str | None = None) -> Scene:
    """A COLMAP sparse model (`sparse/0` or `sparse`, binary or text) read with pycolmap."""
    import pycolmap

    key = f"{dataset}/{name}"
    model_dir = next((d for d in (root / "sparse" / "0", root / "sparse") if (d / "cameras.bin").exists()
                      or (d / "cameras.txt").exists()), None)
    if model_dir is None:
        raise SceneError(key, root / "sparse/0", "no COLMAP model (cameras.bin or cameras.txt)")
    try:
        rec = pycolmap.Reconstruction(model_dir)
    except Exception as e:  # noqa: BLE001
        raise SceneError(key, model_dir, f"cannot read COLMAP model ({str(e).splitlines()[0][:120]})") from None
    img_dir = pick_image_dir(root, key, images)
    ids = sorted(rec.reg_image_ids(), key=lambda i: rec.image(i).name)
    paths = [img_dir / rec.image(i).name for i in ids]
    for p in paths:
        if not p.exists():
            raise SceneError(key, p, "image listed in the COLMAP model is missing")
    W, H = check_same_size(key, paths)
    split = every_nth_split([rec.image(i).name for i in ids])
    cams, index = [], {}
    for k, (iid, p) in enumerate(zip(ids, paths)):
        im = rec.image(iid)
        cam = rec.camera(im.camera_id)
        K, dist = camera_from_colmap(cam, key, model_dir)
        s = W / cam.width
        K = np.diag([s, s, 1.0]) @ K
        if dist is not None:
            dist = (dist[0], _scale_params(dist[0], dist[1], s))
        w2c = np.eye(4)
        w2c[:3, :] = im.cam_from_world().matrix()
        cams.append(Camera(im.name, str(p), W, H, K, w2c, split[im.name], dist))
        index[iid] = k
    points = points_from_reconstruction(rec, index, scale=W / rec.camera(rec.image(ids[0]).camera_id).width)
    return Scene(dataset, name, cams, points, root, {"format": "colmap"})


def _scale_params(model: str, p: list[float], s: float) -> list[float]:
    """Scale the pixel-unit parameters (focal, principal point) of a COLMAP model."""
    n_pix = {"SIMPLE_RADIAL": 3, "RADIAL": 3, "OPENCV": 4, "PINHOLE": 4, "SIMPLE_PINHOLE": 3}[model]
    return [v * s for v in p[:n_pix]] + list(p[n_pix:])


def points_from_reconstruction(rec, index: dict[int, int], scale: float = 1.0) -> Points:
    """Flatten pycolmap points and tracks; `index` maps image id -> camera index in the Scene."""
    pids = sorted(rec.point3D_ids())
    xyz = np.zeros((len(pids), 3)); rgb = np.zeros((len(pids), 3), np.uint8); err = np.zeros(len(pids))
    tp, ti, txy = [], [], []
    for k, pid in enumerate(pids):
        pt = rec.point3D(pid)
        xyz[k] = pt.xyz; rgb[k] = pt.color; err[k] = pt.error
        for el in pt.track.elements:
            if el.image_id not in index:
                continue
            tp.append(k); ti.append(index[el.image_id])
            txy.append(np.asarray(rec.image(el.image_id).points2D[el.point2D_idx].xy) * scale)
    return Points(xyz, rgb, err, np.asarray(pids, np.int64), np.asarray(tp, np.int64),
                  np.asarray(ti, np.int64), np.asarray(txy, np.float64).reshape(-1, 2))


# --------------------------------------------------------------------------- images only
def load_images(root: Path, dataset: str, name: str, images: str | None = None) -> Scene:
    """No cameras at all: SfM must estimate them; K and pose are placeholders until then."""
    key = f"{dataset}/{name}"
    img_dir = pick_image_dir(root, key, images) if images or not any(
        p.suffix.lower() in IMAGE_EXTS for p in root.iterdir() if p.is_file()) else root
    files = list_images(img_dir, key)
    W, H = check_same_size(key, files)
    split = every_nth_split([p.name for p in files])
    f = 1.2 * max(W, H)  # COLMAP's default prior
    cams = [Camera(p.name, str(p), W, H, _intrinsics(f, f, W / 2, H / 2), np.eye(4), split[p.name]) for p in files]
    return Scene(dataset, name, cams, None, root, {"format": "images", "poses_unknown": True})


LOADERS = {"llff": load_llff, "nerf": load_nerf, "strecha": load_strecha, "middlebury": load_middlebury,
           "colmap": load_colmap, "images": load_images}


def load_scene(fmt: str, root: str | Path, dataset: str, name: str, images: str | None = None) -> Scene:
    key = f"{dataset}/{name}"
    if fmt not in LOADERS:
        raise SceneError(key, root, f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    root = Path(root).resolve()
    if not root.is_dir():
        raise SceneError(key, root, "scene folder does not exist")
    return LOADERS[fmt](root, dataset, name, images)
