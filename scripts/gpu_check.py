#!/usr/bin/env python
"""Helpers of scripts/gpu_check.sh: the check's config and VAE, and its JSON summary.

    python scripts/gpu_check.py prepare --out DIR [--dry] [--steps 3000] [--vae-source DIR]
    python scripts/gpu_check.py summary --out DIR [--dry]

`prepare` writes DIR/scenes.tsv, DIR/config.yaml (a --configfile for the repository's Snakefile)
and, unless --vae-source is given, a randomly initialised diffusers AutoencoderKL in DIR/vae
(`save_pretrained`; Stable Diffusion's VAE architecture, or a tiny one with --dry): the paper's
VAE path (kind diffusers-kl, 4 latent channels, the KL term in stage 1) without its weights or
any download. One tuning scene (lego) and one evaluation scene (fern) run through every stage:
encode, stage 1, latent fields at the paper preset's field settings (`--steps` iterations),
stage 3, evaluation and the report. Full mode asks for a GPU for every heavy rule (a run
without CUDA fails in one line); --dry is the same run on the CPU at tiny sizes.

`summary` gathers the versions, the render check, fern's vanilla field fit (iterations per
second) and the report into DIR/summary.json, and prints the report's table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TUNE, EVAL = "nerf_synthetic/lego", "llff/fern"
METHODS = ["vae-ceiling", "vanilla", "enc", "dec", "full"]
SHEET = ["dataset", "scene", "format", "path", "images", "poses", "max_side", "downscale", "max_images"]


def scene_rows(dry: bool) -> list[dict]:
    side = 64 if dry else 512  # the paper preset's working resolution (config/scenes_paper.tsv)
    return [
        {"dataset": "llff", "scene": "fern", "format": "llff", "path": "llff/fern", "images": "images_8",
         "poses": "given", "max_side": side, "max_images": 8 if dry else None},
        {"dataset": "nerf_synthetic", "scene": "lego", "format": "nerf", "path": "nerf_synthetic/lego",
         "images": None, "poses": "given", "max_side": side, "max_images": 8 if dry else 40},
    ]


def make_vae(path: Path, dry: bool) -> dict:
    """A randomly initialised AutoencoderKL saved with save_pretrained (no hub access)."""
    import diffusers
    import torch

    torch.manual_seed(0)
    if dry:
        arch = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)
    else:  # Stable Diffusion's VAE (sd-vae-ft-mse) architecture
        arch = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
    model = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                                    up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                                    scaling_factor=0.18215, **arch)
    model.save_pretrained(path)
    return {"random_init": True, "params": sum(p.numel() for p in model.parameters()), **{
        k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()}}


def check_config(out: Path, dry: bool, steps: int, vae_source: str | None) -> dict:
    paper = yaml.safe_load((REPO / "config" / "presets" / "paper.yaml").read_text())
    shared = Path(os.environ.get("LRF_SHARED") or REPO.parent / "shared").resolve()
    latent = dict(paper["field"]["latent"], steps=steps)
    if dry:  # the same schedule shape, scaled down: densification still runs
        latent.update(refine_start=10, refine_stop=30, refine_every=10, checkpoint_every=20, log_every=10)
    stage = ({"steps": 3, "batch": 1, "crop": 32, "checkpoint_every": 2, "log_every": 1} if dry else
             {"steps": 300, "batch": 8, "crop": 256, "checkpoint_every": 100, "log_every": 50})
    if dry:
        resources = {"default": {"threads": 1, "mem_mb": 2000, "runtime": 30, "gpu": 0}}
    else:
        resources = dict(paper["resources"], sfm={"threads": 4})  # gpu: 1 for every heavy rule: no CUDA, no run
    return {
        "shared_dir": str(shared),
        "scenes": str(out / "scenes.tsv"),
        "select": [EVAL, TUNE],
        "protocol": {"tune": [TUNE], "eval": [EVAL]},
        "vae": {"name": "kl-check", "kind": "diffusers-kl", "source": vae_source or str(out / "vae")},
        # --dry: a method of each kind (no field, pretrained VAE, both tuned parts) keeps CI short
        "methods": ["vae-ceiling", "vanilla", "full"] if dry else METHODS,
        "backend": "auto",
        "rgb_downscale": 1,
        "field": {"latent": latent, "rgb": dict(paper["field"]["rgb"], steps=steps)},
        # the paper preset's stage 1 tunes the encoder (and so takes the KL posterior's term)
        "stage1": dict(stage, tune_encoder=paper["stage1"]["tune_encoder"]),
        "stage3": dict(stage),
        "sfm": ({"max_side": 320, "matcher": "exhaustive", "max_features": 1024, "min_registered": 0.5}
                if dry else {"max_side": 1024, "matcher": "auto", "max_features": 4096, "min_registered": 0.5}),
        "evaluate": {"lpips": ["alex"] if dry else ["alex", "vgg"]},
        "resources": resources,
    }


def merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def prepare(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = scene_rows(args.dry)
    lines = ["\t".join(SHEET)] + ["\t".join("" if r.get(c) is None else str(r[c]) for c in SHEET) for r in rows]
    (out / "scenes.tsv").write_text("\n".join(lines) + "\n")
    steps = args.steps or (40 if args.dry else 3000)
    # complete (the repository's config with the check's settings over it): Snakemake runs in
    # DIR/run, where the Snakefile's own `configfile: config/config.yaml` does not exist
    cfg = merged(yaml.safe_load((REPO / "config" / "config.yaml").read_text()),
                 check_config(out, args.dry, steps, args.vae_source))
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    vae = {"source": args.vae_source} if args.vae_source else make_vae(out / "vae", args.dry)
    (out / "vae.json").write_text(json.dumps(vae))
    print(out / "config.yaml")
    return 0


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def overall_table(md: str) -> str:
    """The report's claims and overall sections (by their headings), else the whole summary."""
    wanted = ("The paper's claims", "Overall")
    found = ["### " + sec.strip() for sec in md.split("\n### ")[1:] if sec.startswith(wanted)]
    return "\n\n".join(found) if found else md.strip()


def summary(args) -> int:
    out = Path(args.out).resolve()
    run = out / "run"
    ds, sc = EVAL.split("/")
    field = _read(run / "results" / ds / sc / "fields" / "vanilla" / "field.json") or {}
    fit = None
    if field.get("steps") and field.get("seconds"):
        cfg = field.get("config") or {}
        fit = {"scene": EVAL, "method": "vanilla", "steps": field["steps"], "seconds": round(field["seconds"], 2),
               "it_per_s": round(field["steps"] / field["seconds"], 1), "gaussians": field.get("num_gaussians"),
               "device": cfg.get("device"), "backend": cfg.get("backend"),
               "loss": [field.get("initial_loss"), field.get("final_loss")]}
    report = run / "results" / "report"
    table = (report / "summary.md").read_text() if (report / "summary.md").exists() else None
    phases = {}
    if (out / "phases.tsv").exists():
        for ln in (out / "phases.tsv").read_text().splitlines():
            name, secs, rc = ln.split("\t")
            phases[name] = {"seconds": int(secs), "rc": int(rc)}
    render = _read(out / "render_check.json")
    doc = {
        "dry": args.dry,
        "versions": _read(out / "versions.json"),
        "vae": {"kind": "diffusers-kl", **(_read(out / "vae.json") or {})},
        "render_check": None if render is None else {
            "ok": render.get("ok"), "tol": render.get("tol"), "error": render.get("error"),
            "candidate": "reference (dry)" if args.dry else "gsplat",
            "scenes": [{k: s.get(k) for k in ("n", "channels", "width", "height", "image_max_abs", "alpha_max_abs",
                                                "grad_rel", "ok")} for s in render.get("scenes", [])]},
        "fit": fit,
        "report": {"summary_json": str(report / "summary.json"), "table_md": str(report / "summary.md")},
        "phases": phases,
        "seconds": sum(p["seconds"] for p in phases.values()),
    }
    doc["ok"] = bool(phases) and all(p["rc"] == 0 for p in phases.values()) and bool(
        render and render.get("ok")) and fit is not None and table is not None
    (out / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
    if fit:
        print(f"fit: {EVAL} vanilla, {fit['steps']} steps in {fit['seconds']} s = {fit['it_per_s']} it/s "
              f"on {fit['device']} with {fit['backend']}, {fit['gaussians']} Gaussians")
    if table:
        print(overall_table(table))
    return 0 if doc["ok"] else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", required=True)
    p.add_argument("--dry", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="latent field steps (3000; --dry: 40)")
    p.add_argument("--vae-source", default=None, help="a diffusers AutoencoderKL folder instead of a random one")
    p.set_defaults(fn=prepare)
    s = sub.add_parser("summary")
    s.add_argument("--out", required=True)
    s.add_argument("--dry", action="store_true")
    s.set_defaults(fn=summary)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
