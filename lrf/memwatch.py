"""Run a command and record the peak memory of its whole process tree.

A Snakemake run is a tree: snakemake itself, one shell per job, one Python per job. The
kernel's per-process maximum (`ru_maxrss`, what `/usr/bin/time` prints) says nothing about
jobs running side by side, so this samples the resident set of every live descendant
every `--interval` seconds and keeps the largest sum (what the machine had to hold at once)
and the largest single process (what one job needs: the number for `mem_mb`).

    python -m lrf.memwatch --out results/scale/memory.json -- snakemake --cores 2 --keep-going ...

Prints one summary line; the JSON adds the largest process's command line. The command's
exit status is passed through. Sampling misses spikes shorter than the interval.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import psutil

from lrf.io import atomic_write_json


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def sample(root: psutil.Process) -> tuple[int, int, str]:
    """(sum of RSS over the tree, largest single RSS, that process's command line), bytes."""
    total, top, top_cmd = 0, 0, ""
    for p in _tree(root):
        try:
            rss = p.memory_info().rss
            if rss > top:
                top, top_cmd = rss, " ".join(p.cmdline())[:300]
            total += rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total, top, top_cmd


def watch(cmd: list[str], interval: float = 0.5) -> dict:
    """Run `cmd` to completion; return its exit code, wall time and peak memory (MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    root = psutil.Process(proc.pid)
    peak_total = peak_one = samples = 0
    peak_cmd = ""
    while proc.poll() is None:
        total, one, one_cmd = sample(root)
        samples += 1
        peak_total = max(peak_total, total)
        if one > peak_one:
            peak_one, peak_cmd = one, one_cmd
        time.sleep(interval)
    mib = 1024 ** 2
    return {"command": cmd, "returncode": proc.returncode, "wall_s": time.perf_counter() - t0,
            "peak_tree_rss_mib": peak_total / mib, "peak_process_rss_mib": peak_one / mib,
            "peak_process_cmd": peak_cmd, "samples": samples, "interval_s": interval}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the measurement here (JSON)")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give a command after --")
    res = watch(cmd, args.interval)
    if args.out:
        atomic_write_json(args.out, res)
    print(f"memwatch: exit {res['returncode']}, {res['wall_s']:.0f} s, peak tree RSS "
          f"{res['peak_tree_rss_mib']:.0f} MiB, peak single process {res['peak_process_rss_mib']:.0f} MiB",
          file=sys.stderr)
    return res["returncode"]


if __name__ == "__main__":
    raise SystemExit(main())
