"""Pixel correspondences between image pairs, mined from SfM tracks, for stage 1.

Two observations of one 3D point in images i and j are a correspondence: their latents should
agree. Observations whose reprojection error is large, and points seen too few times, are
dropped. Each pair gets a weight from how far apart its cameras look at the shared points
(the median triangulation angle), normalised to mean 1 over the scene's pairs: nearby cameras
see nearly the same pixels, so their agreement says little about 3D consistency.

A scene that yields no correspondence at all (no SfM tracks, or none left after the filters)
fails this step with one line, `ERROR <dataset>/<scene>: <.../points.npz>: <reason>`, and writes
nothing: empty tables would only move the failure to stage 1, further from its cause.

    python -m lrf.correspondences --scene results/D/S/prepared/scene.json --out results/D/S/correspondences
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from lrf.io import atomic_path, atomic_write_json
from lrf.scene.model import Scene, SceneError

MATCH_COLUMNS = ["image_i", "image_j", "point_id", "x_i", "y_i", "x_j", "y_j", "err_i", "err_j"]


def observation_errors(scene: Scene) -> np.ndarray:
    from lrf.sfm import reprojection_errors

    return reprojection_errors(scene)


def mine(scene: Scene, max_reproj_px: float = 2.0, min_track: int = 2, max_per_pair: int | None = None,
         seed: int = 0, points_file: str | Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(matches, pairs) tables; indices refer to `scene.cameras`.

    points_file: where the scene's points were read from, for the error line (an in-memory scene
    has none, and its `root` is its images' folder, not the points')."""
    p = scene.points
    where = points_file or "points.npz"
    if p is None or len(p.track_point) == 0:
        raise SceneError(scene.key, where, "scene has no SfM tracks")
    err = observation_errors(scene)
    keep = err <= max_reproj_px
    tp, ti, xy, er = p.track_point[keep], p.track_image[keep], p.track_xy[keep], err[keep]
    # one observation per (point, image): a point seen twice in one image is ambiguous
    order = np.lexsort((er, ti, tp))
    tp, ti, xy, er = tp[order], ti[order], xy[order], er[order]
    first = np.ones(len(tp), bool)
    first[1:] = (tp[1:] != tp[:-1]) | (ti[1:] != ti[:-1])
    tp, ti, xy, er = tp[first], ti[first], xy[first], er[first]
    counts = np.bincount(tp, minlength=len(p))
    ok = counts[tp] >= min_track
    tp, ti, xy, er = tp[ok], ti[ok], xy[ok], er[ok]
    # all pairs within each track: group by point, then outer product of its observations
    starts = np.flatnonzero(np.r_[True, tp[1:] != tp[:-1]])
    ends = np.r_[starts[1:], len(tp)]
    rows_a, rows_b = [], []
    for s, e in zip(starts, ends):
        a, b = np.triu_indices(e - s, k=1)
        rows_a.append(a + s); rows_b.append(b + s)
    if sum(len(r) for r in rows_a) == 0:  # no point kept two views (rows_a holds one empty group then)
        raise SceneError(scene.key, where, "no correspondences survive the filters "
                                           f"(max reprojection {max_reproj_px} px, min track {min_track})")
    a, b = np.concatenate(rows_a), np.concatenate(rows_b)
    swap = ti[a] > ti[b]
    a, b = np.where(swap, b, a), np.where(swap, a, b)
    m = pd.DataFrame({"image_i": ti[a].astype(np.int32), "image_j": ti[b].astype(np.int32),
                      "point_id": p.ids[tp[a]], "x_i": xy[a, 0].astype(np.float32), "y_i": xy[a, 1].astype(np.float32),
                      "x_j": xy[b, 0].astype(np.float32), "y_j": xy[b, 1].astype(np.float32),
                      "err_i": er[a].astype(np.float32), "err_j": er[b].astype(np.float32)})
    m = m.sort_values(["image_i", "image_j", "point_id"], kind="stable").reset_index(drop=True)
    if max_per_pair:
        rng = np.random.default_rng(seed)
        m["_r"] = rng.random(len(m))
        m = (m.sort_values(["image_i", "image_j", "_r"]).groupby(["image_i", "image_j"]).head(max_per_pair)
             .drop(columns="_r").sort_values(["image_i", "image_j", "point_id"]).reset_index(drop=True))
    pairs = pair_table(scene, m, p)
    return m, pairs


def pair_table(scene: Scene, m: pd.DataFrame, p) -> pd.DataFrame:
    centers = np.stack([c.center for c in scene.cameras])
    axes = np.stack([c.w2c[2, :3] for c in scene.cameras])  # optical axis in world = third row of R_cw
    id_to_row = pd.Series(np.arange(len(p.ids)), index=p.ids)
    X = p.xyz[id_to_row[m["point_id"].to_numpy()].to_numpy()]
    ci, cj = centers[m["image_i"].to_numpy()], centers[m["image_j"].to_numpy()]
    ri, rj = X - ci, X - cj
    cos = (ri * rj).sum(1) / (np.linalg.norm(ri, axis=1) * np.linalg.norm(rj, axis=1) + 1e-12)
    m_angle = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    g = pd.DataFrame({"image_i": m["image_i"], "image_j": m["image_j"], "angle": m_angle,
                      "err": np.maximum(m["err_i"], m["err_j"])}).groupby(["image_i", "image_j"])
    pairs = g.agg(matches=("angle", "size"), tri_angle_deg=("angle", "median"),
                  median_reproj_px=("err", "median")).reset_index()
    i, j = pairs["image_i"].to_numpy(), pairs["image_j"].to_numpy()
    extent = max(scene.extent(), 1e-12)
    pairs["baseline_rel"] = np.linalg.norm(centers[i] - centers[j], axis=1) / extent
    pairs["view_angle_deg"] = np.degrees(np.arccos(np.clip((axes[i] * axes[j]).sum(1), -1, 1)))
    w = pairs["tri_angle_deg"].to_numpy()
    pairs["weight"] = np.clip(w / max(w.mean(), 1e-12), 0.1, 5.0)
    splits = np.array([c.split for c in scene.cameras])
    pairs["split"] = np.where((splits[i] == "train") & (splits[j] == "train"), "train", "heldout")
    pairs["name_i"] = [scene.cameras[k].name for k in i]
    pairs["name_j"] = [scene.cameras[k].name for k in j]
    return pairs


def summarize(scene: Scene, m: pd.DataFrame, pairs: pd.DataFrame) -> dict:
    return {"scene": scene.key, "images": len(scene.cameras), "pairs": int(len(pairs)),
            "pairs_train": int((pairs["split"] == "train").sum()),
            "pairs_heldout": int((pairs["split"] == "heldout").sum()),
            "matches": int(len(m)),
            "matches_per_pair_median": float(pairs["matches"].median()),
            "matches_per_pair_mean": float(pairs["matches"].mean()),
            "median_reprojection_error_px": float(np.median(np.maximum(m["err_i"], m["err_j"]))),
            "median_tri_angle_deg": float(pairs["tri_angle_deg"].median())}


def write(out_dir: Path, m: pd.DataFrame, pairs: pd.DataFrame, summary: dict) -> None:
    out_dir = Path(out_dir)
    for name, df in (("matches.parquet", m), ("pairs.parquet", pairs)):
        with atomic_path(out_dir / name) as tmp:
            df.to_parquet(tmp, index=False)
    atomic_write_json(out_dir / "summary.json", summary)


def load(out_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    out_dir = Path(out_dir)
    return pd.read_parquet(out_dir / "matches.parquet"), pd.read_parquet(out_dir / "pairs.parquet")


def main(argv=None) -> int:
    from lrf.cli import run_main

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scene", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--max-reproj", type=float, default=2.0)
    ap.add_argument("--min-track", type=int, default=2)
    ap.add_argument("--max-per-pair", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    def go():
        scene = Scene.load(args.scene)
        m, pairs = mine(scene, args.max_reproj, args.min_track, args.max_per_pair or None, args.seed,
                        points_file=(args.scene.parent / "points.npz").resolve())
        s = summarize(scene, m, pairs)
        write(args.out, m, pairs, s)
        return (f"{scene.key}: {s['pairs']} pairs, {s['matches']} matches "
                f"(median {s['matches_per_pair_median']:.0f}/pair), reproj {s['median_reprojection_error_px']:.2f} px")

    return run_main(go)


if __name__ == "__main__":
    raise SystemExit(main())
