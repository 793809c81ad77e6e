"""Collect the run's versioned artefacts into one folder that DVC tracks as a single output.

Snakemake keeps its per-scene layout; DVC wants a fixed path. Files are hard-linked (copied
where the file system refuses), so the store costs no space and cannot drift from the run.

    python -m lrf.store --out results/store SRC=REL [SRC=REL ...]
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path


def collect(out: Path, pairs: list[tuple[Path, str]]) -> list[Path]:
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    written = []
    for src, rel in pairs:
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        written.append(out / rel)
    if out.exists():
        shutil.rmtree(out)
    tmp.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("items", nargs="*", help="SRC=REL")
    args = ap.parse_args(argv)
    pairs = []
    for it in args.items:
        src, _, rel = it.partition("=")
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            ap.error(f"bad item {it!r}: want SRC=RELATIVE_PATH")
        pairs.append((Path(src), rel))
    written = collect(args.out, pairs)
    print(f"store: {len(written)} files in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
