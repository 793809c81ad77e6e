"""The one scene model every stage reads.

Convention, everywhere in lrf: OpenCV camera axes (x right, y down, z forward), extrinsics
stored world-to-camera, pinhole intrinsics in pixels of the *working* image, and pixel
(row i, col j) centred at continuous coordinates (j + 0.5, i + 0.5) as in COLMAP and gsplat.
Loaders convert from each dataset's convention at the edge; nothing downstream converts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrf.errors import SceneError
from lrf.io import atomic_write_bytes, atomic_write_text
from lrf.scene.images import read_rgb

SPLITS = ("train", "test")


@dataclass
class Camera:
    """One image and its pinhole camera at the working resolution."""

    name: str                 # image file name, unique within the scene
    image_path: str           # where the image lives (absolute, or relative to the scene file)
    width: int
    height: int
    K: np.ndarray             # [3, 3] float64
    w2c: np.ndarray           # [4, 4] float64, OpenCV world-to-camera
    split: str = "train"
    # Lens distortion still present in the image file: (COLMAP model name, params at this
    # resolution). None once undistorted; the prepare step removes it.
    distortion: tuple[str, list[float]] | None = None

    @property
    def c2w(self) -> np.ndarray:
        return np.linalg.inv(self.w2c)

    @property
    def center(self) -> np.ndarray:
        R, t = self.w2c[:3, :3], self.w2c[:3, 3]
        return -R.T @ t

    def project(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points [P,3] -> (pixels [P,2], depth [P]) with the pixel-centre convention above."""
        cam = xyz @ self.w2c[:3, :3].T + self.w2c[:3, 3]
        z = cam[:, 2]
        uv = (cam[:, :2] / np.where(np.abs(z) < 1e-12, 1e-12, z)[:, None]) @ self.K[:2, :2].T + self.K[:2, 2]
        return uv, z

    def scaled(self, sx: float, sy: float | None = None) -> "Camera":
        """The same camera for an image resized by (sx, sy); exact with corner-origin pixels."""
        sy = sx if sy is None else sy
        S = np.diag([sx, sy, 1.0])
        return Camera(self.name, self.image_path, int(round(self.width * sx)), int(round(self.height * sy)),
                      S @ self.K, self.w2c.copy(), self.split, self.distortion)

    def to_dict(self) -> dict:
        return {"name": self.name, "image_path": self.image_path, "width": self.width,
                "height": self.height, "K": self.K.tolist(), "w2c": self.w2c.tolist(),
                "split": self.split,
                "distortion": None if self.distortion is None else [self.distortion[0], list(self.distortion[1])]}

    @classmethod
    def from_dict(cls, d: dict) -> "Camera":
        dist = d.get("distortion")
        return cls(d["name"], d["image_path"], int(d["width"]), int(d["height"]),
                   np.asarray(d["K"], dtype=np.float64), np.asarray(d["w2c"], dtype=np.float64),
                   d.get("split", "train"), None if dist is None else (dist[0], list(dist[1])))


@dataclass
class Points:
    """Sparse SfM points and their tracks (flat arrays, one row per observation)."""

    xyz: np.ndarray                 # [P, 3] float64
    rgb: np.ndarray                 # [P, 3] uint8
    error: np.ndarray               # [P] mean reprojection error in pixels
    ids: np.ndarray                 # [P] int64 point ids (stable across files)
    track_point: np.ndarray         # [T] int64 index into the P points (not the id)
    track_image: np.ndarray         # [T] int64 index into Scene.cameras
    track_xy: np.ndarray            # [T, 2] float64 observed pixel (working image, undistorted)

    def __len__(self) -> int:
        return len(self.xyz)

    def save(self, path: Path) -> None:
        import io

        buf = io.BytesIO()
        np.savez_compressed(buf, xyz=self.xyz, rgb=self.rgb, error=self.error, ids=self.ids,
                            track_point=self.track_point, track_image=self.track_image,
                            track_xy=self.track_xy)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> "Points":
        with np.load(path) as z:
            return cls(**{k: z[k] for k in ("xyz", "rgb", "error", "ids", "track_point",
                                            "track_image", "track_xy")})

    @classmethod
    def empty(cls) -> "Points":
        return cls(np.zeros((0, 3)), np.zeros((0, 3), np.uint8), np.zeros(0), np.zeros(0, np.int64),
                   np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2)))


@dataclass
class Scene:
    """Cameras (+ optional points) of one scene; `dataset/name` is its identity in results/."""

    dataset: str
    name: str
    cameras: list[Camera]
    points: Points | None = None
    root: Path | None = None          # folder that relative image paths are resolved against
    meta: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.name}"

    def split(self, which: str) -> list[int]:
        return [i for i, c in enumerate(self.cameras) if c.split == which]

    @property
    def train(self) -> list[int]:
        return self.split("train")

    @property
    def test(self) -> list[int]:
        return self.split("test")

    def image_path(self, i: int) -> Path:
        p = Path(self.cameras[i].image_path)
        return p if p.is_absolute() or self.root is None else self.root / p

    def load_image(self, i: int) -> np.ndarray:
        """RGB float32 [H, W, 3] in [0, 1] (alpha composited on white)."""
        img = read_rgb(self.image_path(i), scene=self.key)
        c = self.cameras[i]
        if img.shape[:2] != (c.height, c.width):
            raise SceneError(self.key, self.image_path(i),
                             f"image is {img.shape[1]}x{img.shape[0]}, camera says {c.width}x{c.height}")
        return img

    def extent(self) -> float:
        """Radius of the camera centres around their mean (3DGS' 'scene extent' uses 1.1x this)."""
        centers = np.stack([c.center for c in self.cameras])
        return float(np.linalg.norm(centers - centers.mean(0), axis=1).max())

    # ---- persistence: scene.json (+ points.npz beside it) ----
    def save(self, path: Path) -> None:
        import os

        path = Path(path)
        cams = []
        for i, c in enumerate(self.cameras):
            d = c.to_dict()
            d["image_path"] = os.path.relpath(self.image_path(i).resolve(), path.parent.resolve())
            cams.append(d)
        doc = {"dataset": self.dataset, "name": self.name, "meta": self.meta, "cameras": cams,
               "points": None if self.points is None else "points.npz"}
        if self.points is not None:
            self.points.save(path.parent / "points.npz")
        atomic_write_text(path, json.dumps(doc, indent=1))

    @classmethod
    def load(cls, path: Path) -> "Scene":
        path = Path(path)
        doc = json.loads(path.read_text())
        pts = Points.load(path.parent / doc["points"]) if doc.get("points") else None
        return cls(doc["dataset"], doc["name"], [Camera.from_dict(c) for c in doc["cameras"]],
                   pts, path.parent, doc.get("meta", {}))


def every_nth_split(names: list[str], n: int = 8) -> dict[str, str]:
    """The LLFF/Mip-NeRF 360 protocol: every n-th image by sorted file name is a test view."""
    return {name: ("test" if k % n == 0 else "train") for k, name in enumerate(sorted(names))}


def validation_views(scene: Scene, most: int, every: int = 8) -> list[int]:
    """Training views a fine-tuning stage holds back to choose its checkpoint on (it trains on the
    rest): one per `every` training views, at least 1 and at most `most`, spread evenly over the
    training views in scene order, each from the middle of its stretch; never all of them. Held-out
    views are never among them (they stay out of everything)."""
    train = scene.train
    n = min(max(len(train) // every, 1), most, len(train) - 1)
    return [train[int((k + 0.5) * len(train) / n)] for k in range(max(n, 0))]
