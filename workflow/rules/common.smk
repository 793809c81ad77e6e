# Shared helpers: config validation, the scene sheet, paths, and the shell wrapper.
import json
import os
import sys
from pathlib import Path

import pandas as pd
from snakemake.utils import validate

validate(config, "../../config/schemas/config.schema.yaml")

sys.path.insert(0, str(Path(workflow.basedir)))
from lrf.methods import METHODS, field_name, latent_variant, per_scene  # noqa: E402
from lrf.settings import check_config  # noqa: E402  (torch-free)

# Every override (field.latent, field.rgb, stage1, stage3, align) against its dataclass, names and
# types, before any job runs: a typo fails `snakemake -n`, not the stage hours later.
check_config(config)

SHARED = Path(os.environ.get("LRF_SHARED", config["shared_dir"]))
DATA_DIR = Path(os.environ.get("LRF_DATA_DIR") or config.get("data_dir") or SHARED / "data")
WEIGHTS_DIR = Path(os.environ.get("LRF_WEIGHTS_DIR") or config.get("weights_dir") or SHARED / "weights")
PY = "python -m"

# Names reach file paths and shell commands: only safe characters (the schemas enforce it too).
wildcard_constraints:
    dataset="[A-Za-z0-9][A-Za-z0-9_.-]*",
    scene="[A-Za-z0-9][A-Za-z0-9_.-]*",


def _read_sheet(path):
    sheet = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    rows = {}
    for rec in sheet.to_dict("records"):
        row = {k: (v if v != "" else None) for k, v in rec.items()}
        for k in ("max_side", "max_images"):
            if row.get(k) is not None:
                row[k] = int(row[k])
        if row.get("downscale") is not None:
            row["downscale"] = float(row["downscale"])
        validate(row, "../../config/schemas/scenes.schema.yaml")
        key = f"{row['dataset']}/{row['scene']}"
        if key in rows:
            raise ValueError(f"{path}: scene {key} is listed twice")
        rows[key] = row
    return rows


SCENES = _read_sheet(config["scenes"])


def selected_scenes():
    sel = config["select"]
    keys = config["groups"][sel] if isinstance(sel, str) else sel
    if isinstance(sel, str) and sel not in config["groups"]:
        raise ValueError(f"config select: unknown group {sel!r}")
    missing = [k for k in keys if k not in SCENES]
    if missing:
        raise ValueError(f"config select: {', '.join(missing)} not in {config['scenes']}")
    return keys


def protocol(which):
    return list((config.get("protocol") or {}).get(which) or [])


# Scheduling: the fine-tuning chain (SfM of the protocol scenes -> stage 1 -> `enc` latents and
# fields -> stage 3) is the critical path of a run; everything else (baselines, vanilla fields,
# evaluations) fills the remaining cores. Without these priorities Snakemake may fit a whole
# scene's baselines before stage 1 starts (a 2-core default run: 32 min instead of ~20).
CRITICAL = 50


def protocol_priority(wc):
    return CRITICAL if f"{wc.dataset}/{wc.scene}" in protocol("tune") + protocol("eval") else 0


def _check_protocol():
    for which in ("tune", "eval"):
        missing = [k for k in (config.get("protocol") or {}).get(which) or [] if k not in SCENES]
        if missing:
            raise ValueError(f"config protocol.{which}: {', '.join(missing)} not in {config['scenes']}")


_check_protocol()


def expand_scenes(pattern, keys=None, **kw):
    keys = selected_scenes() if keys is None else keys
    return [pattern.format(dataset=k.split("/")[0], scene=k.split("/")[1], **kw) for k in keys]


def row(wc):
    return SCENES[f"{wc.dataset}/{wc.scene}"]


def opt(flag, value):
    return "" if value is None else f"{flag} {value}"


def logged(cmd):
    """Run cmd with all its output in {log}; on failure repeat its one-line ERROR to the terminal."""
    return (cmd + " > {log} 2>&1 || {{ status=$?; grep -h '^ERROR' {log} >&2 || tail -n 5 {log} >&2; exit $status; }}")


import re as _re  # noqa: E402

VAE = config["vae"]
TUNED_ENCODER = f"results/vae/{VAE['name']}/stage1/encoder.safetensors"
TUNED_DECODER = f"results/vae/{VAE['name']}/stage3/decoder.safetensors"


def vae_spec(encoder=False, decoder=False):
    """JSON for lrf.vae.factory.load_vae; fine-tuned parts are file paths produced by the workflow
    (`decoder` may be a path itself: a per-scene decoder)."""
    spec = {"kind": VAE["kind"], "source": VAE["source"]}
    if encoder:
        spec["encoder"] = TUNED_ENCODER
    if decoder:
        spec["decoder"] = decoder if isinstance(decoder, str) else TUNED_DECODER
    return json.dumps(spec)


def method_regex(methods):
    """A wildcard constraint matching exactly these method names (they may hold '+' or '.')."""
    return "|".join(_re.escape(m) for m in methods)


# The fields fit_field makes: every field a method starts from (lrf.methods.field_name).
FIELDS = sorted({field_name(m) for m in METHODS if METHODS[m]["kind"] != "ceiling"})


# What a method reads, in one place for evaluate, orbit and align: its field, and the VAE parts.
def method_field(wc):
    if per_scene(wc.method):
        return f"results/{wc.dataset}/{wc.scene}/align/{wc.method}/field.safetensors"
    return f"results/{wc.dataset}/{wc.scene}/fields/{field_name(wc.method)}/field.safetensors"


def method_decoder(wc):
    """The decoder file a method decodes with: None (pretrained), stage 3's, or the per-scene copy."""
    if per_scene(wc.method):
        return f"results/{wc.dataset}/{wc.scene}/align/{wc.method}/decoder.safetensors"
    return TUNED_DECODER if METHODS[wc.method].get("decoder") == "tuned" else None


def method_vae_files(wc):
    files = [TUNED_ENCODER] if METHODS[wc.method].get("encoder") == "tuned" else []
    dec = method_decoder(wc)
    return files + ([dec] if dec else [])


def base_of(wc):
    """The wildcards of a per-scene method's starting point (its `base` method)."""
    from types import SimpleNamespace

    return SimpleNamespace(dataset=wc.dataset, scene=wc.scene, method=METHODS[wc.method]["base"])


def method_vae_spec(wc):
    return vae_spec(METHODS[wc.method].get("encoder") == "tuned", method_decoder(wc) or False)


def res(rule_name, key, default):
    return config.get("resources", {}).get(rule_name, {}).get(key, default)


def gpu_resources(rule_name):
    n = res(rule_name, "gpu", 0)
    return {"gpu": n} if n else {}  # the SLURM executor turns this into --gpus


# Rasterizer for the steps that render (lrf.gpu): auto = gsplat on CUDA, our rasterizer on the CPU.
BACKEND = config.get("backend", "auto")


def device_of(rule_name):
    """--device for a step: `cuda` where the rule requests a GPU (no GPU: the step fails with one
    ERROR line rather than run on the CPU), else `auto` (CUDA when one is visible)."""
    return "cuda" if res(rule_name, "gpu", 0) else "auto"


def stage_cfg(rule_name):
    """stage1/stage3 overrides; a GPU request makes the stage run on CUDA (or fail without it)."""
    cfg = dict(config.get(rule_name) or {})
    if res(rule_name, "gpu", 0):
        cfg["device"] = "cuda"
    return json.dumps(cfg)

# For `--sdm conda`: every rule runs in this environment (same pins as pyproject.toml).
CONDA_ENV = str(Path(workflow.basedir) / "envs" / "lrf.yaml")
