"""Undistort to pinhole, resize, and (for working images) centre-crop to multiples of 8.

Used twice per scene: the dataset's photos -> SfM's images (at `sfm.max_side`, no crop), then
SfM's scene -> the working images, with cameras and track pixels mapped exactly. Every later
stage reads only the working images, so the pinhole / multiple-of-8 assumptions of the VAE
(one latent cell = 8x8 pixels) and of the rasterizer hold by construction.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from lrf.scene.images import read_rgb, save_png, working_size
from lrf.scene.model import Camera, Points, Scene, SceneError


def colmap_camera(model: str, params: list[float], width: int, height: int):
    import pycolmap

    return pycolmap.Camera(model=model, width=width, height=height, params=list(params))


def undistort_image(img: np.ndarray, cam: Camera) -> np.ndarray:
    """Resample `img` so it is seen by the pinhole K of `cam` (same size, same K).

    For each output pixel, the ray K^-1 [u, v, 1] is pushed through the distortion model
    (pycolmap's own) to find where it landed in the distorted photo.
    """
    from scipy.ndimage import map_coordinates

    if cam.distortion is None:
        return img
    model, params = cam.distortion
    ccam = colmap_camera(model, params, cam.width, cam.height)
    H, W = img.shape[:2]
    jj, ii = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    rays = np.stack([(jj - cam.K[0, 2]) / cam.K[0, 0], (ii - cam.K[1, 2]) / cam.K[1, 1], np.ones_like(jj)], -1)
    src = ccam.img_from_cam(rays.reshape(-1, 3)).reshape(H, W, 2) - 0.5  # back to index coords
    out = np.stack([map_coordinates(img[..., c], [src[..., 1], src[..., 0]], order=1, mode="nearest")
                    for c in range(img.shape[2])], -1)
    return out.astype(np.float32)


def undistort_points(xy: np.ndarray, cam: Camera) -> np.ndarray:
    """Observed (distorted) pixels -> where the pinhole K of `cam` sees the same rays."""
    if cam.distortion is None or len(xy) == 0:
        return xy
    model, params = cam.distortion
    n = colmap_camera(model, params, cam.width, cam.height).cam_from_img(np.asarray(xy, np.float64))
    return n @ cam.K[:2, :2].T + cam.K[:2, 2]


def prepare_scene(scene: Scene, out_dir: Path, max_side: int | None = None, downscale: float | None = None,
                  min_images: int = 3, multiple: int = 8) -> Scene:
    """Write undistorted, resized images to `out_dir/images/` and return the scene that describes them.

    `multiple` = 8 centre-crops to the VAE's latent grid (working images); SfM's own images use 1
    (no crop: every pixel of the photo stays available to feature matching).
    """
    if len(scene.cameras) < min_images:
        raise SceneError(scene.key, scene.root, f"only {len(scene.cameras)} images; need at least {min_images}")
    out_dir = Path(out_dir)
    img_dir = out_dir / "images"
    new_cams = []
    for i, cam in enumerate(scene.cameras):
        img = read_rgb(scene.image_path(i), scene.key)
        if img.shape[:2] != (cam.height, cam.width):
            raise SceneError(scene.key, scene.image_path(i),
                             f"image is {img.shape[1]}x{img.shape[0]}, expected {cam.width}x{cam.height}")
        img = undistort_image(img, cam)
        (rw, rh), (left, top, cw, ch) = working_size(cam.width, cam.height, max_side, downscale, multiple)
        if (rw, rh) != (cam.width, cam.height):
            pil = Image.fromarray(np.clip(np.round(img * 255), 0, 255).astype(np.uint8))
            img = np.asarray(pil.resize((rw, rh), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
        img = img[top:top + ch, left:left + cw]
        sx, sy = rw / cam.width, rh / cam.height
        K = np.diag([sx, sy, 1.0]) @ cam.K
        K[0, 2] -= left
        K[1, 2] -= top
        fname = Path(cam.name.replace("/", "__")).stem + ".png"
        save_png(img_dir / fname, img)
        new_cams.append(Camera(cam.name, str((img_dir / fname).resolve()), cw, ch, K, cam.w2c.copy(), cam.split, None))
    points = None
    if scene.points is not None and len(scene.points):
        points = _map_points(scene, new_cams)
    meta = dict(scene.meta)
    meta.update({"max_side": max_side, "downscale": downscale})
    meta.setdefault("source_root", str(scene.root))  # the dataset's folder, kept through SfM
    return Scene(scene.dataset, scene.name, new_cams, points, out_dir, meta)


def _map_points(scene: Scene, new_cams: list[Camera]) -> Points:
    """Carry track observations through the same undistort/resize/crop as the images."""
    p = scene.points
    xy = p.track_xy.copy()
    for i, (old, new) in enumerate(zip(scene.cameras, new_cams)):
        m = p.track_image == i
        if not m.any():
            continue
        und = undistort_points(xy[m], old)
        # pinhole old K -> new K (scale + crop): apply new K o old K^-1 in the image plane
        A = new.K @ np.linalg.inv(old.K)
        xy[m] = und @ A[:2, :2].T + A[:2, 2]
    return replace(p, track_xy=xy)
