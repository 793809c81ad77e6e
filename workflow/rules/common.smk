# Shared helpers: config validation, the scene sheet, paths, resources, and the shell wrapper.
# Every function a rule calls lives here, so the rule files hold rules only.
import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

from snakemake.utils import validate

validate(config, "../../config/schemas/config.schema.yaml")

sys.path.insert(0, str(Path(workflow.basedir)))
from lrf.methods import METHODS, field_name, latent_variant, method_part, part_file, per_scene  # noqa: E402
from lrf.scene.sheet import read_sheet, split_key  # noqa: E402  (the tests read the sheet with it too)
from lrf.settings import check_config  # noqa: E402  (torch-free)

# Every override (field.latent, field.rgb, stage1, stage3, align) against its dataclass, names and
# types, before any job runs: a typo fails `snakemake -n`, not the stage hours later.
check_config(config)

SHARED = Path(os.environ.get("LRF_SHARED", config["shared_dir"]))
DATA_DIR = Path(os.environ.get("LRF_DATA_DIR") or config.get("data_dir") or SHARED / "data")
WEIGHTS_DIR = Path(os.environ.get("LRF_WEIGHTS_DIR") or config.get("weights_dir") or SHARED / "weights")

SCENES = read_sheet(config["scenes"])


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
        missing = [k for k in protocol(which) if k not in SCENES]
        if missing:
            raise ValueError(f"config protocol.{which}: {', '.join(missing)} not in {config['scenes']}")


_check_protocol()


def expand_scenes(pattern, keys=None, **kw):
    keys = selected_scenes() if keys is None else keys
    return [pattern.format(dataset=split_key(k)[0], scene=split_key(k)[1], **kw) for k in keys]


def row(wc):
    return SCENES[f"{wc.dataset}/{wc.scene}"]


def opt(flag, value):
    return "" if value is None else f"{flag} {value}"


def logged(cmd):
    """Run cmd with all its output in {log}; on failure repeat its one-line ERROR to the terminal."""
    return f"{cmd} > {{log}} 2>&1 || {{{{ status=$?; grep -h '^ERROR' {{log}} >&2 || tail -n 5 {{log}} >&2; exit $status; }}}}"


VAE = config["vae"]
TUNED_ENCODER = f"results/{part_file(VAE['name'], 'encoder', 'stage1')}"
STAGE1_DECODER = f"results/{part_file(VAE['name'], 'decoder', 'stage1')}"   # stage 3 starts from it
TUNED_DECODER = f"results/{part_file(VAE['name'], 'decoder', 'stage3')}"


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
    return "|".join(re.escape(m) for m in methods)


# The fields fit_field makes: every field a method starts from (lrf.methods.field_name).
FIELDS = sorted({field_name(m) for m in METHODS if METHODS[m]["kind"] != "ceiling"})


# What a method reads, in one place for evaluate, orbit and align: its field, and the VAE parts.
def method_field(wc):
    if per_scene(wc.method):
        return f"results/{wc.dataset}/{wc.scene}/align/{wc.method}/field.safetensors"
    return f"results/{wc.dataset}/{wc.scene}/fields/{field_name(wc.method)}/field.safetensors"


def method_decoder(wc):
    """The decoder file a method decodes with: None (pretrained), stage 1's or 3's (lrf.methods),
    or the per-scene copy."""
    if per_scene(wc.method):
        return f"results/{wc.dataset}/{wc.scene}/align/{wc.method}/decoder.safetensors"
    dec = method_part(VAE["name"], wc.method, "decoder")
    return f"results/{dec}" if dec else None


def method_encoder(wc):
    enc = method_part(VAE["name"], wc.method, "encoder")
    return f"results/{enc}" if enc else None


def method_vae_files(wc):
    return [f for f in (method_encoder(wc), method_decoder(wc)) if f]


def base_of(wc):
    """The wildcards of a per-scene method's starting point (its `base` method)."""
    return SimpleNamespace(dataset=wc.dataset, scene=wc.scene, method=METHODS[wc.method]["base"])


def method_vae_spec(wc):
    return vae_spec(method_encoder(wc) is not None, method_decoder(wc) or False)


def field_targets(wc):
    """The latent cache a field is fitted to (none for the RGB field)."""
    if wc.field == "rgb-3dgs":
        return []
    return [f"results/{wc.dataset}/{wc.scene}/latents/{latent_variant(VAE['name'], wc.field)}.safetensors"]


def eval_inputs(wc):
    ins = {"scene": f"results/{wc.dataset}/{wc.scene}/prepared/scene.json", "vae": method_vae_files(wc)}
    if METHODS[wc.method]["kind"] != "ceiling":
        ins["field"] = method_field(wc)
    return ins


# ----------------------------------------------------------------------------- resources
# Every rule's threads, mem_mb, runtime and gpu come from config.yaml's `resources:`: the rule's
# own entry, else `resources.default`. gpu > 0 adds a GPU request (the SLURM executor's --gpus)
# and makes the step run on CUDA or fail with one ERROR line.
def res(rule_name, key):
    table = config["resources"]
    return table.get(rule_name, {}).get(key, table["default"][key])


def resources_of(rule_name):
    out = {"mem_mb": res(rule_name, "mem_mb"), "runtime": res(rule_name, "runtime")}
    if res(rule_name, "gpu"):
        out["gpu"] = res(rule_name, "gpu")
    return out


# Where a step computes (lrf.device) and which rasteriser renders (lrf.render), passed the same
# way to every step that trains or renders: `--device cuda` where its rule requests a GPU (no
# GPU: the step fails with one ERROR line rather than run on the CPU), else `auto`.
BACKEND = config.get("backend", "auto")


def device_flags(rule_name, renders=True):
    flags = f"--device {'cuda' if res(rule_name, 'gpu') else 'auto'}"
    return f"{flags} --backend {BACKEND}" if renders else flags


def overrides(section):
    """A settings section (stage1, stage3, align, field.latent, ...) as the step's --cfg JSON."""
    node = config
    for part in section.split("."):
        node = (node or {}).get(part) or {}
    return json.dumps(node)


# ----------------------------------------------------------------------------- report and store
def report_config():
    return json.dumps({"scenes": selected_scenes(), "methods": config["methods"], "vae": {"name": VAE["name"]},
                       "protocol": config.get("protocol") or {}})


def store_items():
    """{source file: path inside results/store} for everything DVC versions: each scene's
    cameras and SfM points (at SfM's and the working resolution), every fitted field, and the
    fine-tuned VAE parts in use."""
    items = {}
    fields = {field_name(m) for m in config["methods"] if METHODS[m]["kind"] != "ceiling"}
    for key in selected_scenes():
        for f in ("scene.json", "points.npz"):
            items[f"results/{key}/sfm/{f}"] = f"scenes/{key}/sfm/{f}"        # poses and points at SfM's resolution
            items[f"results/{key}/prepared/{f}"] = f"scenes/{key}/{f}"       # the same, mapped to the working images
        for fld in sorted(fields):
            items[f"results/{key}/fields/{fld}/field.safetensors"] = f"fields/{key}/{fld}.safetensors"
            items[f"results/{key}/fields/{fld}/field.json"] = f"fields/{key}/{fld}.json"
    for m in config["methods"]:
        for part in ("encoder", "decoder"):
            # a per-scene method decodes with its own copy (under align/, not stored)
            if (f := method_part(VAE["name"], m, part)) and not (per_scene(m) and part == "decoder"):
                items[f"results/{f}"] = f
    return items


# For `--sdm conda`: every rule runs in this environment (same pins as pyproject.toml).
CONDA_ENV = str(Path(workflow.basedir) / "envs" / "lrf.yaml")
