"""Novel-view camera paths and a dependency-free video writer (Pillow GIF/WebP; no ffmpeg)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lrf.io import atomic_path


def look_at_w2c(position, target, down) -> np.ndarray:
    """OpenCV world-to-camera (x right, y down, z forward) at `position` looking at `target`;
    `down` is the world direction that should appear downward on screen."""
    pos = np.asarray(position, dtype=np.float64)
    f = np.asarray(target, dtype=np.float64) - pos
    f /= np.linalg.norm(f)
    x = np.cross(np.asarray(down, dtype=np.float64), f)
    if np.linalg.norm(x) < 1e-9:   # looking along `down`: pick any perpendicular
        x = np.cross(np.eye(3)[np.argmin(np.abs(f))], f)
    x /= np.linalg.norm(x)
    y = np.cross(f, x)
    w2c = np.eye(4)
    w2c[:3, :3] = np.stack([x, y, f])
    w2c[:3, 3] = -w2c[:3, :3] @ pos
    return w2c


def scene_focus(scene, cameras=None) -> np.ndarray:
    """The point nearest (least squares) to all optical axes: the object centre for inward-facing
    captures. For near-parallel (forward-facing) axes it falls back to the SfM points' median, or
    the mean centre pushed along the mean view direction by the camera spread."""
    cams = [scene.cameras[i] for i in (cameras if cameras is not None else range(len(scene.cameras)))]
    C = np.stack([c.center for c in cams])
    D = np.stack([c.w2c[2, :3] for c in cams])          # optical axes (camera z) in world
    A = np.zeros((3, 3))
    b = np.zeros(3)
    for c, d in zip(C, D):
        P = np.eye(3) - np.outer(d, d)
        A += P
        b += P @ c
    ev = np.linalg.eigvalsh(A)
    mean_dir = D.mean(0)
    if ev[0] > 0.05 * len(cams):
        p = np.linalg.solve(A, b)
        if np.dot(p - C.mean(0), mean_dir) > 0:      # in front of the cameras
            return p
    if scene.points is not None and len(scene.points) > 0:
        return np.median(scene.points.xyz, 0)
    spread = max(np.linalg.norm(C - C.mean(0), axis=1).max(), 1e-3)
    return C.mean(0) + mean_dir / max(np.linalg.norm(mean_dir), 1e-9) * 4 * spread


def orbit_path(scene, n_frames: int = 120, cameras=None, height_wobble: float = 1.0,
               target=None) -> np.ndarray:
    """[n_frames,4,4] OpenCV w2c on an ellipse fitted to the training-camera centres (PCA plane,
    semi-axes sqrt(2) x the std along each axis, which passes through points spread on an
    ellipse), with a spiral wobble out of the plane, all looking at the scene focus."""
    idx = cameras if cameras is not None else (scene.train or list(range(len(scene.cameras))))
    cams = [scene.cameras[i] for i in idx]
    C = np.stack([c.center for c in cams])
    mu = C.mean(0)
    focus = scene_focus(scene, idx) if target is None else np.asarray(target, dtype=np.float64)
    down = np.mean([c.w2c[1, :3] for c in cams], 0)    # camera +y (down) in world
    down /= max(np.linalg.norm(down), 1e-12)
    if len(C) >= 3:
        _, s, vt = np.linalg.svd(C - mu, full_matrices=False)
        std = s / np.sqrt(len(C))
        e1, e2 = vt[0], vt[1]
        e3 = vt[2] if len(vt) > 2 else np.cross(e1, e2)
        a, bb, h = np.sqrt(2) * std[0], np.sqrt(2) * std[1], (std[2] if len(std) > 2 else 0.0)
    else:   # too few cameras for a plane: a circle around the focus in the plane orthogonal to down
        r = max(np.linalg.norm(mu - focus), 1e-3)
        e1 = np.cross(down, np.eye(3)[np.argmin(np.abs(down))])
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(down, e1)
        e3, a, bb, h = down, r, r, 0.0
        mu = focus + ((mu - focus) @ down) * down
    th = 2 * np.pi * np.arange(n_frames) / max(n_frames, 1)
    pos = (mu[None] + a * np.cos(th)[:, None] * e1 + bb * np.sin(th)[:, None] * e2
           + height_wobble * h * np.sin(2 * th)[:, None] * e3)
    return np.stack([look_at_w2c(p, focus, down) for p in pos])


def _to_uint8(frame) -> np.ndarray:
    f = np.asarray(frame)
    if f.dtype != np.uint8:
        f = (np.clip(f.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    if f.ndim == 2:
        f = np.repeat(f[..., None], 3, -1)
    return f[..., :3]


def write_video(frames, path: str | Path, fps: float = 24.0, quality: int = 90) -> Path:
    """Animated GIF or WebP (by suffix; anything else gets .webp) from HxWx3 frames (uint8, or
    float in [0,1]); written atomically."""
    from PIL import Image

    path = Path(path)
    fmt = {".gif": "GIF", ".webp": "WEBP"}.get(path.suffix.lower())
    if fmt is None:
        path, fmt = path.with_suffix(".webp"), "WEBP"
    frames = [Image.fromarray(_to_uint8(f)) for f in frames]
    if not frames:
        raise ValueError("no frames")
    duration = max(int(round(1000.0 / fps)), 1)
    kw = dict(save_all=True, append_images=frames[1:], duration=duration, loop=0)
    if fmt == "WEBP":
        kw.update(quality=quality, method=4)
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format=fmt, **kw)
    return path
