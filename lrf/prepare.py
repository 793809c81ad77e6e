"""Load one scene in its own format and write its working images and scene.json.

    python -m lrf.prepare --format llff --root ../shared/data/llff/fern --dataset llff --name fern \
        --max-side 512 --out results/llff/fern/prepared
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lrf.cli import run_main
from lrf.scene.loaders import FORMATS, load_scene
from lrf.scene.prepare import prepare_scene


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--images", default=None, help="image sub-folder (default: images/ or the least downscaled images_N/)")
    ap.add_argument("--max-side", type=int, default=None)
    ap.add_argument("--downscale", type=float, default=None)
    ap.add_argument("--max-images", type=int, default=None, help="keep every k-th image so at most this many remain")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)

    def go():
        scene = load_scene(args.format, args.root, args.dataset, args.name, args.images)
        if args.max_images and len(scene.cameras) > args.max_images:
            scene = subsample(scene, args.max_images)
        prepared = prepare_scene(scene, args.out, args.max_side, args.downscale)
        prepared.save(args.out / "scene.json")
        c = prepared.cameras[0]
        return (f"{prepared.key}: prepared {len(prepared.cameras)} images at {c.width}x{c.height} "
                f"({len(prepared.train)} train / {len(prepared.test)} test)")

    return run_main(go)


def subsample(scene, n: int):
    """At most n views, 7/8 of them training views (the every-8th protocol's ratio), evenly spaced.

    Datasets with their own split (NeRF-synthetic: 100 train, 200 test) keep that ratio too.
    """
    from lrf.scene.model import Scene

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
