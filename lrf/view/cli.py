"""`python -m lrf.view` / `lrf-view`: serve the viewer on localhost, or benchmark its live path."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see lrf.bench

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

from lrf.view.sources import default_vae, default_weights  # noqa: E402 - light: no torch


def check_port(host: str, port: int) -> None:
    """viser moves to the next free port by itself; a viewer must be where it says, so refuse."""
    from lrf.cli import InputError

    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen(1)
        except OSError as e:
            raise InputError(f"{host}:{port}: port is busy ({e.strerror or e}); "
                             f"stop what uses it or pick another with --port") from None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="lrf-view", description="Interactive web viewer for fitted latent (and RGB) fields.",
        epilog="Over SSH: ssh -L 8080:localhost:8080 user@host, then open http://localhost:8080 here.")
    ap.add_argument("path", nargs="?", type=Path,
                    help="a results folder, one results/<dataset>/<scene> folder, or a field.safetensors")
    ap.add_argument("--scene", default=None, help="dataset/scene to open first (results folder)")
    ap.add_argument("--method", default=None, help="method to show first (default: the first found)")
    ap.add_argument("--scene-json", type=Path, default=None, help="field file: its scene (cameras, photos)")
    ap.add_argument("--decoder", type=Path, default=None, help="field file: a fine-tuned decoder.safetensors")
    ap.add_argument("--name", default=None, help="field file: the method name to show")
    ap.add_argument("--vae", default=None, help="JSON VAE spec (lrf.vae.factory); default: config/config.yaml's")
    ap.add_argument("--vae-name", default=None, help="results/vae/<name>/ of the tuned decoder (default: config's)")
    ap.add_argument("--weights-dir", type=Path, default=None, help="default: $LRF_WEIGHTS_DIR or <shared>/weights")
    ap.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--max-px", type=int, default=512, help="longer side of a still frame")
    ap.add_argument("--moving-px", type=int, default=256, help="longer side while moving, first guess")
    ap.add_argument("--fps", type=float, default=6.0, help="target while moving (resolution adapts)")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="live decode (held-out PSNR is always float32); auto: bf16 where the CPU has it")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--bench", action="store_true", help="print the live path's frames per second and exit")
    ap.add_argument("--frames", type=int, default=30, help="--bench: timed frames")
    ap.add_argument("--gaussians", type=int, default=30_000, help="--bench: synthetic field size")
    ap.add_argument("--px", type=int, default=256, help="--bench: image side in pixels")
    args = ap.parse_args(argv)
    if args.path is None and not args.bench:
        ap.error("give a results folder or a field file (or --bench)")
    return args


def build_sources(args, vae_name: str):
    from lrf.cli import InputError
    from lrf.view import sources

    p = args.path
    if p.suffix == ".safetensors" or p.is_file():
        return sources.single(p, args.scene_json, args.decoder, args.name)
    if not p.exists():
        raise InputError(f"{p}: no such results folder or field file")
    scenes = sources.discover(p, vae_name)
    if args.scene is not None and args.scene not in scenes:
        raise InputError(f"{p}: no fitted field for scene {args.scene} (found: {', '.join(scenes)})")
    return scenes


def serve(args) -> str | None:
    import torch

    from lrf.cli import InputError
    from lrf.view.app import Viewer, ViewSettings
    from lrf.view.render import Renderer
    from lrf.view.sources import check_channels
    from lrf.vae.factory import load_vae

    if args.threads:
        torch.set_num_threads(args.threads)
    spec, name = default_vae()
    if args.vae:
        try:
            spec = json.loads(args.vae)
        except ValueError as e:
            raise InputError(f"--vae: not JSON: {e}") from None
    vae_name = args.vae_name or (name if not args.vae else spec.get("kind", name))
    weights = args.weights_dir or default_weights()
    scenes = build_sources(args, vae_name)
    vae = load_vae(spec, weights)       # a WeightsError here is one line too
    check_channels(scenes, vae.latent_channels, spec.get("kind", "?"))
    check_port(args.host, args.port)
    renderer = Renderer(spec, weights, args.precision)
    first = args.scene or next(iter(scenes))
    m0 = scenes[first].methods.get(args.method) or next(iter(scenes[first].methods.values()))
    renderer.warm(m0)                   # a broken field or decoder fails here, before serving
    settings = ViewSettings(max_px=args.max_px, moving_px=args.moving_px, fps=args.fps)
    viewer = Viewer(scenes, renderer, settings, args.host, args.port, first, args.method)
    port = viewer.server.get_port()
    if port != args.port:               # lost a race for the port after check_port
        viewer.stop()
        raise InputError(f"{args.host}:{args.port}: port is busy; pick another with --port")
    n = sum(len(s.methods) for s in scenes.values())
    url_host = "localhost" if args.host in ("127.0.0.1", "localhost", "::1") else args.host
    print(f"lrf.view: {len(scenes)} scene(s), {n} field(s) "
          f"({', '.join(f'{k}: ' + ' '.join(s.methods) for k, s in scenes.items())}); "
          f"live decode {renderer.precision}", file=sys.stderr)
    print(f"lrf.view: serving at http://{url_host}:{port}  (over SSH: ssh -L {port}:localhost:{port} "
          f"<this host>, then open http://localhost:{port}); Ctrl-C stops", file=sys.stderr, flush=True)
    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        viewer.stop()
    return "lrf.view: stopped"


def main(argv=None) -> int:
    from lrf.cli import run_main

    args = parse_args(argv)
    try:
        if args.bench:
            from lrf.view.bench import run_bench

            return run_main(lambda: run_bench(args))
        return run_main(lambda: serve(args))
    except KeyboardInterrupt:   # Ctrl-C before the server was up (loading): no traceback
        print("lrf.view: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
