"""What there is to view: scenes, their methods' fields and decoders, found on disk.

Methods come from lrf.methods.METHODS (field and decoder resolved as the workflow does) and from
what exists under a scene folder: `fields/<name>/field.safetensors` and per-scene
`align/<name>/{field,decoder}.safetensors` that no table entry names are listed under their
folder name. Only headers are read here (channels, RGB flag), so a large results tree is cheap.
Also the defaults both the viewer and its benchmark start from: the configured VAE and the weights folder.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from lrf.errors import InputError

FIELD = "field.safetensors"
DECODER = "decoder.safetensors"
REPO = Path(__file__).resolve().parents[2]


def default_vae() -> tuple[dict, str]:
    """(spec, name) of the repository config's VAE (TAEF2 if there is none)."""
    spec, name = {"kind": "taef2", "source": "{weights}/taef2"}, "taef2"
    cfg = REPO / "config" / "config.yaml"
    if cfg.is_file():
        try:
            import yaml

            vae = (yaml.safe_load(cfg.read_text()) or {}).get("vae") or {}
            if vae.get("kind") and vae.get("source"):
                spec, name = {"kind": vae["kind"], "source": vae["source"]}, vae.get("name", vae["kind"])
        except Exception:  # noqa: BLE001 - an unreadable config falls back to TAEF2
            pass
    return spec, name


def default_weights() -> Path:
    """$LRF_WEIGHTS_DIR, else the shared folder's weights ($LRF_SHARED or ../shared beside the repository)."""
    if os.environ.get("LRF_WEIGHTS_DIR"):
        return Path(os.environ["LRF_WEIGHTS_DIR"])
    shared = Path(os.environ["LRF_SHARED"]) if os.environ.get("LRF_SHARED") else REPO.parent / "shared"
    return shared / "weights"


@dataclass
class FieldInfo:
    channels: int
    rgb: bool
    gaussians: int


@dataclass
class MethodSource:
    name: str
    kind: str                    # latent | rgb
    field: Path
    decoder: Path | None = None  # latent: None = the VAE's own decoder
    info: FieldInfo | None = None
    metrics: Path | None = None  # eval/<method>/metrics.json, when the workflow scored it

    def per_view_psnr(self) -> dict[str, float]:
        if self.metrics is None or not self.metrics.exists():
            return {}
        try:
            doc = json.loads(self.metrics.read_text())
            return {r["view"]: float(r["psnr"]) for r in doc.get("per_view", []) if "psnr" in r}
        except (ValueError, KeyError, TypeError):
            return {}

    def rgb_downscale(self) -> int:
        """RGB fields are scored rendered at 1/k and upsampled (lrf.evaluate): k from its metrics."""
        if self.kind != "rgb" or self.metrics is None or not self.metrics.exists():
            return 1
        try:
            return int(json.loads(self.metrics.read_text()).get("rgb_downscale") or 1)
        except (ValueError, TypeError):
            return 1


@dataclass
class SceneSource:
    key: str                      # dataset/scene (or the field's folder name)
    scene_json: Path | None       # cameras and photos at the working resolution
    methods: dict[str, MethodSource] = field(default_factory=dict)


def read_field_info(path: Path, who: str) -> FieldInfo:
    """Channels / RGB flag / count from a field file's safetensors header; one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{who}: {path}: field file is missing")
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(f.read(n).decode("utf-8"))
        md = header.get("__metadata__") or {}
        dc = header["features_dc"]["shape"]
        return FieldInfo(channels=int(dc[1]), rgb=json.loads(md.get("rgb_offset", "false")) is True,
                         gaussians=int(dc[0]))
    except (OSError, ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError):
        raise InputError(f"{who}: {path}: not a field file (no readable safetensors header with features_dc)") from None


def scene_json_of(scene_dir: Path) -> Path | None:
    """The working-resolution scene file: prepared/scene.json, else (older layout) sfm/scene.json."""
    for rel in ("prepared/scene.json", "sfm/scene.json"):
        p = Path(scene_dir) / rel
        if p.is_file():
            return p
    return None


def _table_methods():
    from lrf.methods import METHODS, field_name

    out = []
    for name, spec in METHODS.items():
        if spec.get("kind") not in ("latent", "rgb"):
            continue
        try:
            fname = field_name(name)
        except Exception:  # noqa: BLE001 - a table entry this viewer does not understand
            fname = name
        out.append((name, spec, fname))
    return out


def scene_methods(scene_dir: Path, results: Path, vae_name: str) -> dict[str, MethodSource]:
    """{method: source} for one results/<dataset>/<scene> folder, in METHODS order, then extras."""
    from lrf.methods import method_part

    scene_dir, results = Path(scene_dir), Path(results)
    found: dict[str, MethodSource] = {}
    used: set[Path] = set()
    for name, spec, fname in _table_methods():
        if spec.get("per_scene"):
            f, dec = scene_dir / "align" / name / FIELD, scene_dir / "align" / name / DECODER
        else:
            f = scene_dir / "fields" / fname / FIELD
            dec = results / d if (d := method_part(vae_name, name, "decoder")) else None
        if spec["kind"] == "rgb":
            dec = None
        if f.is_file() and (dec is None or dec.is_file()):
            found[name] = MethodSource(name, spec["kind"], f, dec, metrics=scene_dir / "eval" / name / "metrics.json")
            used.add(f)
    # on disk but in no table entry (a per-scene method added later, a field fitted by hand)
    for sub in ("align", "fields"):
        for f in sorted((scene_dir / sub).glob(f"*/{FIELD}")):
            name = f.parent.name
            if f in used or name in found or (sub == "fields" and any(fn == name for _, _, fn in _table_methods())):
                continue
            dec = f.parent / DECODER
            info = read_field_info(f, f"{scene_dir.parent.name}/{scene_dir.name}")
            found[name] = MethodSource(name, "rgb" if info.rgb else "latent", f, dec if dec.is_file() else None,
                                       info, metrics=scene_dir / "eval" / name / "metrics.json")
    return found


def discover(results: Path, vae_name: str) -> dict[str, SceneSource]:
    """Scenes under a results folder (results/<dataset>/<scene>/...) or one scene folder."""
    results = Path(results)
    if not results.is_dir():
        raise InputError(f"{results}: no such folder")
    scenes: dict[str, SceneSource] = {}
    if (results / "fields").is_dir() or (results / "align").is_dir():   # a single scene folder
        root = results.parent.parent
        dirs = [results]
    else:
        root = results
        dirs = sorted({p.parents[2] for sub in ("fields", "align") for p in results.glob(f"*/*/{sub}/*/{FIELD}")})
    for d in dirs:
        methods = scene_methods(d, root, vae_name)
        if methods:
            key = f"{d.parent.name}/{d.name}"
            scenes[key] = SceneSource(key, scene_json_of(d), methods)
    if not scenes:
        raise InputError(f"{results}: no fitted field (looked for <dataset>/<scene>/fields/<method>/{FIELD}); "
                         f"run the workflow first, or point at a field file")
    return scenes


def single(field_path: Path, scene_json: Path | None, decoder: Path | None, name: str | None) -> dict[str, SceneSource]:
    """One field file (and optionally a scene file and a decoder): one scene with one method."""
    field_path = Path(field_path)
    info = read_field_info(field_path, name or field_path.parent.name)
    if scene_json is None:   # results/<d>/<s>/fields/<m>/field.safetensors: the scene is two levels up
        scene_json = scene_json_of(field_path.parent.parent.parent)
    elif not Path(scene_json).is_file():
        raise InputError(f"{field_path.parent.name}: {scene_json}: scene file is missing")
    if decoder is not None and not Path(decoder).is_file():
        raise InputError(f"{field_path.parent.name}: {decoder}: decoder file is missing")
    key = field_path.parent.name
    if scene_json is not None:
        try:
            doc = json.loads(Path(scene_json).read_text())
            key = f"{doc['dataset']}/{doc['name']}"
        except (OSError, ValueError, KeyError, TypeError):
            raise InputError(f"{key}: {scene_json}: not a scene file") from None
    method = name or field_path.parent.name
    kind = "rgb" if info.rgb else "latent"
    src = MethodSource(method, kind, field_path, Path(decoder) if decoder else None, info)
    return {key: SceneSource(key, Path(scene_json) if scene_json else None, {method: src})}


def check_channels(scenes: dict[str, SceneSource], latent_channels: int, vae_kind: str) -> None:
    """Every field must fit its method's kind: latent fields the VAE's channels, RGB fields 3."""
    for key, sc in scenes.items():
        for m in sc.methods.values():
            if m.info is None:
                m.info = read_field_info(m.field, key)
            want = 3 if m.kind == "rgb" else latent_channels
            if m.info.channels != want:
                what = "an RGB field has 3" if m.kind == "rgb" else f"{vae_kind} latents have {latent_channels}"
                raise InputError(f"{key}: {m.field}: field has {m.info.channels} channels, {what} "
                                 f"(method {m.name}; wrong --vae?)")
