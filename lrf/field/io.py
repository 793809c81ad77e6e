"""Field I/O, in one place: a fitted field's safetensors file (save/load), the background it was
fitted with, rendering it at 1/k of a camera's size, and the standard 3DGS point_cloud.ply.

PLY: the standard 3DGS point_cloud.ply layout, for any channel count C. Stored raw (as 3DGS
does): opacity logits, log scales, unnormalised wxyz quaternions, SH coefficients. f_rest is
channel-major: f_rest_{c*(K-1)+k} is coefficient k+1 of channel c. A header comment records the
RGB offset flag so latent fields read back the same way.

    python -m lrf.field.io FIELD.safetensors OUT.ply    # export a fitted field for 3DGS viewers
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load, save

from lrf.checkpoint import safetensors_header
from lrf.field.gaussians import GaussianField, sh_degree_from_coeffs
from lrf.io import atomic_write_bytes
from lrf.render.project import EPS2D


# ----------------------------------------------------------------------------- safetensors
def save_field(field: GaussianField, path: str | Path, meta: dict | None = None) -> None:
    """Parameters as safetensors (raw: log-scales, logits, SH coeffs) with JSON metadata."""
    md = {"rgb_offset": json.dumps(field.rgb_offset), "sh_degree": str(field.sh_degree),
          "channels": str(field.channels), "eps2d": repr(field.eps2d)}
    if meta:
        md["lrf"] = json.dumps(meta)
    atomic_write_bytes(path, save(field.tensors(), metadata=md))


def load_field(path: str | Path, device="cpu") -> GaussianField:
    raw = Path(path).read_bytes()
    md = safetensors_header(raw).get("__metadata__", {})
    f = GaussianField.from_tensors(load(raw), rgb_offset=json.loads(md.get("rgb_offset", "false")),
                                   eps2d=float(md.get("eps2d", EPS2D)))  # fields saved before eps2d: 3DGS' 0.3
    return f.to(device)


def field_background(field_path: Path, channels: int) -> torch.Tensor | None:
    """The background the field was fitted with (stored beside it), so renders match training."""
    meta_path = field_path.with_suffix(".json")
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        bg = meta.get("background_value")
        if bg is not None:
            return torch.tensor(bg, dtype=torch.float32)
    return None


def render_at(field: GaussianField, cam, k: int, background=None, backend: str = "auto",
              w2c=None):
    """Render `cam` (or pose `w2c` with cam's intrinsics) at 1/k of its size: K's first two rows
    divided by k, width // k x height // k. Latent fields render at 1/vae.downscale, RGB fields
    fitted at 1/rgb_downscale at that. Returns the renderer's output (`.image` is [H, W, C])."""
    K = cam.K.copy()
    K[:2] /= k
    return field.render(cam.w2c if w2c is None else w2c, K, cam.width // k, cam.height // k, background, backend)


# ----------------------------------------------------------------------------- PLY
_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "<i2", "int16": "<i2",
              "ushort": "<u2", "uint16": "<u2", "int": "<i4", "int32": "<i4", "uint": "<u4",
              "uint32": "<u4", "float": "<f4", "float32": "<f4", "double": "<f8", "float64": "<f8"}


def _columns(field: GaussianField) -> tuple[list[str], np.ndarray]:
    t = field.tensors()
    n, c = t["features_dc"].shape
    k1 = t["features_rest"].shape[1]
    rest = t["features_rest"].transpose(1, 2).reshape(n, c * k1)   # channel-major
    names = (["x", "y", "z", "nx", "ny", "nz"] + [f"f_dc_{i}" for i in range(c)]
             + [f"f_rest_{i}" for i in range(c * k1)] + ["opacity"]
             + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)])
    data = torch.cat([t["means"], torch.zeros(n, 3), t["features_dc"], rest, t["opacities"][:, None],
                      t["scales"], t["quats"]], 1).numpy().astype("<f4")
    return names, data


def save_ply(field: GaussianField, path: str | Path) -> None:
    names, data = _columns(field)
    header = ["ply", "format binary_little_endian 1.0",
              f"comment lrf rgb_offset={int(field.rgb_offset)} channels={field.channels}",
              f"element vertex {data.shape[0]}"]
    header += [f"property float {nm}" for nm in names] + ["end_header"]
    atomic_write_bytes(path, ("\n".join(header) + "\n").encode("ascii") + np.ascontiguousarray(data).tobytes())


def read_ply(path: str | Path, rgb_offset: bool | None = None) -> GaussianField:
    """Read a 3DGS PLY (ours or the reference code's). rgb_offset=None: from our header comment,
    else assumed for C == 3 (a stock 3DGS file)."""
    raw = Path(path).read_bytes()
    end = raw.find(b"end_header")
    if not raw.startswith(b"ply") or end < 0:
        raise ValueError(f"{path}: not a PLY file")
    body_start = raw.index(b"\n", end) + 1
    lines = raw[:end].decode("ascii").splitlines()
    n, props, flag, in_vertex = None, [], None, False
    for ln in lines:
        parts = ln.split()
        if not parts:
            continue
        if parts[0] == "format" and parts[1] != "binary_little_endian":
            raise ValueError(f"{path}: only binary_little_endian PLY is supported, not {parts[1]}")
        if parts[0] == "comment" and len(parts) > 1 and parts[1] == "lrf":
            for kv in parts[2:]:
                if kv.startswith("rgb_offset="):
                    flag = kv.split("=", 1)[1] == "1"
        elif parts[0] == "element":
            in_vertex = parts[1] == "vertex"
            if in_vertex:
                n = int(parts[2])
            elif n is not None:
                break   # only the vertex element is read; it comes first in 3DGS files
        elif parts[0] == "property" and in_vertex:
            if parts[1] == "list":
                raise ValueError(f"{path}: list properties in the vertex element are not supported")
            props.append((parts[2], _PLY_TYPES[parts[1]]))
    if n is None:
        raise ValueError(f"{path}: no vertex element")
    arr = np.frombuffer(raw, dtype=np.dtype(props), count=n, offset=body_start)
    names = arr.dtype.names

    def cols(prefix: str) -> np.ndarray:
        ks = sorted((nm for nm in names if nm.startswith(prefix)), key=lambda s: int(s[len(prefix):]))
        return np.stack([arr[k].astype(np.float32) for k in ks], 1) if ks else np.zeros((n, 0), np.float32)

    dc = cols("f_dc_")
    c = dc.shape[1]
    rest = cols("f_rest_")
    k1 = rest.shape[1] // c if c else 0
    sh_degree_from_coeffs(k1 + 1)
    rest = rest.reshape(n, c, k1).transpose(0, 2, 1)
    t = {"means": np.stack([arr[k] for k in "xyz"], 1).astype(np.float32), "features_dc": dc,
         "features_rest": np.ascontiguousarray(rest), "opacities": arr["opacity"].astype(np.float32),
         "scales": cols("scale_"), "quats": cols("rot_")}
    if rgb_offset is None:
        rgb_offset = flag if flag is not None else c == 3
    return GaussianField.from_tensors({k: torch.from_numpy(np.array(v)) for k, v in t.items()}, rgb_offset)


def main(argv=None) -> int:
    """`python -m lrf.field.io FIELD.safetensors OUT.ply`: export a fitted field for 3DGS viewers."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m lrf.field.io FIELD.safetensors OUT.ply", file=sys.stderr)
        return 2
    save_ply(load_field(args[0]), args[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
