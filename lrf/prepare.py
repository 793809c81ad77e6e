"""Make a scene's images: from a dataset in its own format, or from an SfM scene.

Two uses, one resampling (`lrf.scene.prepare.prepare_scene`):

* SfM's input, from the dataset: undistorted photos at `sfm.max_side` (no crop), so poses and
  tracks come from the sharpest images available, whatever the working resolution;

      python -m lrf.prepare --format llff --root ../shared/data/llff/fern --dataset llff --name fern \\
          --max-side 1024 --multiple 1 --out results/llff/fern/sfm/input

* the working images, from SfM's scene: resized and cropped to multiples of 8, with the
  cameras and the SfM points' track pixels mapped exactly to them.

      python -m lrf.prepare --scene results/llff/fern/sfm/scene.json --max-side 256 \\
          --out results/llff/fern/prepared
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from lrf.cli import run_main
from lrf.scene.loaders import FORMATS, load_scene
from lrf.scene.model import Scene
from lrf.scene.prepare import prepare_scene

log = logging.getLogger("lrf.prepare")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--format", choices=FORMATS, help="load a dataset from --root in this format")
    src.add_argument("--scene", type=Path, help="an SfM scene.json (with points.npz) to resample")
    ap.add_argument("--root", type=Path)
    ap.add_argument("--dataset")
    ap.add_argument("--name")
    ap.add_argument("--images", default=None, help="image sub-folder (default: images/ or the least downscaled images_N/)")
    ap.add_argument("--max-side", type=int, default=None, help="longest side in pixels (0 or unset: as the input)")
    ap.add_argument("--downscale", type=float, default=None)
    ap.add_argument("--multiple", type=int, default=8, help="centre-crop both sides to multiples of this (1: no crop)")
    ap.add_argument("--max-images", type=int, default=None, help="keep every k-th image so at most this many remain")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    if args.format and not (args.root and args.dataset and args.name):
        ap.error("--format needs --root, --dataset and --name")

    def go():
        if args.scene:
            scene = Scene.load(args.scene)
        else:
            scene = load_scene(args.format, args.root, args.dataset, args.name, args.images)
            if args.max_images and len(scene.cameras) > args.max_images:
                scene = subsample(scene, args.max_images)
        prepared = prepare_scene(scene, args.out, args.max_side or None, args.downscale, multiple=args.multiple)
        c0, c = scene.cameras[0], prepared.cameras[0]
        if args.scene and args.max_side and args.max_side > max(c0.width, c0.height):
            log.warning("%s: %s: working max_side %d is above SfM's %dx%d images; raise sfm.max_side "
                        "to work at this resolution", scene.key, args.scene, args.max_side, c0.width, c0.height)
        prepared.save(args.out / "scene.json")
        pts = f", {len(prepared.points)} points" if prepared.points is not None else ""
        return (f"{prepared.key}: prepared {len(prepared.cameras)} images at {c.width}x{c.height} "
                f"({len(prepared.train)} train / {len(prepared.test)} test){pts}")

    return run_main(go)


def subsample(scene, n: int):
    """At most n views, 7/8 of them training views (the every-8th protocol's ratio), evenly spaced.

    Datasets with their own split (NeRF-synthetic: 100 train, 200 test) keep that ratio too.
    """
    quota = {"test": max(1, n // 8)}
    quota["train"] = n - quota["test"]
    keep = []
    for split in ("train", "test"):
        idx = scene.split(split)
        if len(idx) > quota[split]:
            idx = [idx[int(k)] for k in np.linspace(0, len(idx) - 1, quota[split]).round()]
        keep += idx
    keep.sort()
    return Scene(scene.dataset, scene.name, [scene.cameras[i] for i in keep], None, scene.root, dict(scene.meta))


if __name__ == "__main__":
    raise SystemExit(main())
