"""The one step that touches the network: fetch weights and public scenes for a fresh machine.

    python -m lrf.download --what weights,nerf_example --data-dir DATA --weights-dir WEIGHTS

Everything else in lrf reads these folders only. Downloads go to a temporary name and are
renamed when complete, so an interrupted download is never mistaken for a finished one.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from lrf.errors import DownloadError
from lrf.io import atomic_path

TAESD = "https://github.com/madebyollin/taesd/raw/main/{name}"
TORCHVISION = {"alexnet": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
               "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth"}
ARCHIVES = {
    # NeRF's example archive holds nerf_synthetic/lego and nerf_llff_data/fern.
    "nerf_example": ("http://cseweb.ucsd.edu/~viscomp/projects/LF/papers/ECCV20/nerf/nerf_example_data.zip",
                     {"nerf_synthetic/lego": "nerf_synthetic/lego", "nerf_llff_data/fern": "llff/fern"}),
    "mipnerf360": ("http://storage.googleapis.com/gresearch/refraw360/360_v2.zip", {"": "mipnerf360"}),
}
WHAT = ("weights", *ARCHIVES)


def fetch(url: str, dest: Path, timeout: float = 60.0) -> Path:
    if dest.exists():
        return dest
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, atomic_path(dest) as tmp:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(r, f, length=1 << 20)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise DownloadError(f"download: {url}: unreachable (offline?): {getattr(e, 'reason', e)}") from None
    return dest


def features_to_safetensors(pth: Path, out: Path) -> None:
    """torchvision classifier checkpoint -> the `features.*` convolutions that lpips needs."""
    import torch
    from safetensors.torch import save_file

    sd = torch.load(pth, map_location="cpu", weights_only=True)
    feats = {k[len("features."):]: v.contiguous() for k, v in sd.items() if k.startswith("features.")}
    if not feats:
        raise DownloadError(f"download: {pth}: no features.* tensors")
    with atomic_path(out) as tmp:
        save_file(feats, str(tmp))


def get_weights(weights_dir: Path) -> None:
    for name in ("taef2_encoder.pth", "taef2_decoder.pth"):
        fetch(TAESD.format(name=name), weights_dir / "taef2" / name)
    for net, url in TORCHVISION.items():
        out = weights_dir / "lpips" / f"{net}_features.safetensors"
        if not out.exists():
            with tempfile.TemporaryDirectory() as td:
                features_to_safetensors(fetch(url, Path(td) / "ckpt.pth"), out)


def get_archive(key: str, data_dir: Path) -> None:
    url, mapping = ARCHIVES[key]
    if all((data_dir / dst).exists() for dst in mapping.values()):
        return
    with tempfile.TemporaryDirectory(dir=data_dir.parent if data_dir.parent.exists() else None) as td:
        z = fetch(url, Path(td) / "archive.zip", timeout=600)
        with zipfile.ZipFile(z) as zf:
            zf.extractall(td)
        for src, dst in mapping.items():
            cands = [p for p in Path(td).rglob(src.split("/")[-1]) if p.is_dir() and str(p).endswith(src)] if src else [Path(td)]
            if not cands:
                raise DownloadError(f"download: {url}: archive has no {src}")
            (data_dir / dst).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(cands[0]), data_dir / dst)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", default="weights,nerf_example", help=f"comma list of: {', '.join(WHAT)}")
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--weights-dir", type=Path, required=True)
    args = ap.parse_args(argv)
    items = [w for w in args.what.split(",") if w]
    bad = [w for w in items if w not in WHAT]
    if bad:
        print(f"ERROR download: unknown item(s) {', '.join(bad)} (known: {', '.join(WHAT)})", file=sys.stderr)
        return 2
    try:
        for w in items:
            get_weights(args.weights_dir) if w == "weights" else get_archive(w, args.data_dir)
            print(f"download: {w}: ok", file=sys.stderr)
    except DownloadError as e:
        print(f"ERROR {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
