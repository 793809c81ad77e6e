"""One arm of the per-scene alignment A/B (docs/experiments.md E10): lrf.align on one scene with
--cfg overrides, shipped at several lengths from ONE run, each length scored on the held-out views
by lrf.evaluate (LPIPS-alex and -vgg: an arm that trains on LPIPS-alex is also
scored by a network it never saw).

    python scripts/align_arms.py --scene results/D/S/prepared/scene.json --field F/field.safetensors \
        --vae '{"kind":"taef2","source":"{weights}/taef2"}' --weights-dir ../shared/weights \
        --cfg '{"w_lpips": 0.1}' --snapshots 300,600 --max-steps 2000 --out OUT/ARM/D/S

The run is configured for --max-steps (the alignment's rates are constant, so `steps` only moves
the end: AlignConfig.RESUME_FREE) and checkpointed every gcd(snapshots) steps. For each snapshot s
not yet done it resumes OUT/run up to s (stop_at), copies that checkpoint to OUT/s and finishes the
copy as a run of s steps: the same bytes as an s-step run (resumption is exact, tests/test_faults.py),
with validation (validate_every) choosing among steps <= s. Calling it again with longer snapshots
continues OUT/run. OUT/s gets lrf.align's outputs, eval/ (lrf.evaluate) and wall.json.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from functools import reduce
from pathlib import Path

import torch

from lrf.align import align_scene
from lrf.field.io import field_background, load_field
from lrf.metrics import load_lpips
from lrf.scene.model import Scene
from lrf.settings import AlignConfig
from lrf.vae.factory import load_vae


def _run(args, scene, over: dict, out: Path, stop_at: int | None):
    cfg = AlignConfig.from_overrides(over)
    field = load_field(args.field, "cpu")
    meta_path = args.field.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    vae = load_vae(json.loads(args.vae), args.weights_dir, "cpu")
    lp = load_lpips(cfg.lpips_net, args.weights_dir, "cpu") if cfg.w_lpips > 0 else None
    return align_scene(vae, field, scene, field_background(args.field, field.channels), cfg, out, lp,
                       spec=json.loads(args.vae), field_meta=meta, stop_at=stop_at)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scene", required=True, type=Path)
    ap.add_argument("--field", required=True, type=Path)
    ap.add_argument("--vae", required=True)
    ap.add_argument("--weights-dir", required=True, type=Path)
    ap.add_argument("--cfg", default="{}")
    ap.add_argument("--snapshots", required=True, help="comma-separated step counts to ship and score")
    ap.add_argument("--max-steps", type=int, required=True, help="the run's configured length (>= every snapshot)")
    ap.add_argument("--lpips", default="alex,vgg", help="LPIPS nets the evaluation scores")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    snaps = sorted(int(s) for s in args.snapshots.split(","))
    assert snaps[-1] <= args.max_steps
    every = reduce(math.gcd, snaps + [args.max_steps])
    base = {**json.loads(args.cfg), "device": "cpu", "backend": "cpu"}
    scene = Scene.load(args.scene)
    run_dir = args.out / "run"
    for s in snaps:
        dst = args.out / str(s)
        if (dst / "eval" / "metrics.json").is_file():
            continue
        t0 = time.perf_counter()
        if not (dst / "align.json").is_file():
            over = {**base, "steps": args.max_steps, "checkpoint_every": every}
            if s < args.max_steps:
                _run(args, scene, over, run_dir, stop_at=s)   # leaves the checkpoint at step s
                if dst.exists():
                    shutil.rmtree(dst)
                shutil.copytree(run_dir, dst)
                _run(args, scene, {**over, "steps": s}, dst, stop_at=None)
            else:
                _run(args, scene, over, run_dir, stop_at=None)
                if dst.exists():
                    shutil.rmtree(dst)
                shutil.copytree(run_dir, dst)
        t_align = time.perf_counter() - t0
        rep = json.loads((dst / "align.json").read_text())
        spec = {**json.loads(args.vae), "decoder": str(dst / "decoder.safetensors")}
        t1 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lrf.evaluate", "--scene", str(args.scene), "--kind", "latent",
                        "--method", "aligned", "--field", str(dst / "field.safetensors"), "--vae", json.dumps(spec),
                        "--weights-dir", str(args.weights_dir), "--lpips", args.lpips, "--threads", "1",
                        "--out", str(dst / "eval")], check=True)
        m = json.loads((dst / "eval" / "metrics.json").read_text())
        val = rep.get("validation") or {}
        wall = {"steps": s, "align_s_this_call": t_align, "eval_s": time.perf_counter() - t1,
                "step_seconds": rep["seconds"], "s_per_step": rep["s_per_step"],
                "val_seconds": val.get("seconds"), "chosen_step": val.get("chosen_step")}
        (dst / "wall.json").write_text(json.dumps(wall, indent=1))
        print(f"{scene.key} {args.cfg} {s} steps: "
              f"PSNR {m['mean']['psnr']:.2f} " + " ".join(f"LPIPS-{n} {m['mean']['lpips_' + n]:.3f}" for n in args.lpips.split(",")) +
              f" train {m['train']['mean']['psnr']:.2f} chosen {val.get('chosen_step')} "
              f"{rep['s_per_step']:.2f} s/step", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
