"""Collect every scene's evaluation into tables, figures, image grids and one self-contained HTML.

    python -m lrf.report --results results --config-json '{"scenes": [...], "methods": [...]}' \
        --out results/report

The expected scene/method list comes from the config, not from what happens to be on disk, so a
run that failed (no metrics.json) shows up as a marked row with the ERROR line of its log instead
of silently shrinking the averages. Outputs (all written atomically):
metrics.csv (long form), tables.md, summary.json (flat, for DVC), summary.md, report.html,
figures/*.png, grids/*.png.

Wall-clock numbers (render/decode ms, fit seconds) come from the timing.json beside each
metrics.json (lrf.evaluate keeps them apart so metrics files are repeatable); older metrics files
that still hold them inline are read as they are.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lrf.report.build import build_report


def parse_config(text: str) -> dict:
    """JSON text, or a path to a JSON file (long scene lists do not fit a command line well)."""
    t = text.strip()
    if not t.startswith("{") and Path(t).is_file():
        t = Path(t).read_text()
    cfg = json.loads(t) if t else {}
    if not isinstance(cfg, dict):
        raise ValueError("--config-json must be a JSON object")
    return cfg


def main(argv=None) -> int:
    from lrf.cli import InputError, run_main

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--config-json", default="{}",
                    help='{"scenes": ["dataset/scene", ...], "methods": [...], "protocol": {"tune": [...], '
                         '"eval": [...]}, "vae": {"name": ...}} (or a path to such a file)')
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-views", type=int, default=3, help="test views per scene in the image grids")
    args = ap.parse_args(argv)

    def go():
        try:
            cfg = parse_config(args.config_json)
        except ValueError as e:
            raise InputError(f"report: --config-json: {e}") from None
        for k in ("scenes", "methods"):
            if k in cfg and not isinstance(cfg[k], list):
                raise InputError(f"report: --config-json: '{k}' must be a list, got {type(cfg[k]).__name__}")
        bad = [s for s in cfg.get("scenes") or [] if not isinstance(s, str) or "/" not in s]
        if bad:
            raise InputError(f"report: --config-json: scenes must be 'dataset/scene', got {bad[:3]}")
        rep = build_report(args.results, cfg, args.out, args.max_views)
        s = rep.summary
        head = " ".join(f"{m} {s[f'psnr/{m}']:.2f}" for m in rep.methods if f"psnr/{m}" in s)
        return (f"report: {s['runs_ok']}/{s['runs_total']} runs ok, {s['scenes_failed']} scenes with failures; "
                f"PSNR {head or 'n/a'} -> {args.out}/report.html")

    return run_main(go)


if __name__ == "__main__":
    raise SystemExit(main())
