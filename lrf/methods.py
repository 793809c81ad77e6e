"""What each method name means: which field kind, which encoder and decoder.

One table, read by the workflow and the report, so that adding a method is one entry here.
"""
from __future__ import annotations

# The order here is the report's order (lrf.report), and every other list of method names (the
# config schema's enums, the workflow's wildcard constraints) is derived from this table or checked
# against it (tests/test_config.py).
# kind: latent (a field of VAE latents), rgb (a colour field), ceiling (no field: decode(encode(photo))
#   and the shift-averaged ceiling, lrf.vae.shift, of the autoencoder named by encoder/decoder)
# encoder / decoder: which weights: "pretrained", or the stage that tuned them. Stage 1 tunes the
#   encoder and, with stage1.tune_decoder, the decoder (otherwise its decoder file is the pretrained
#   one); stage 3 starts from stage 1's decoder. So `enc` decodes with stage 1's decoder, and
#   `dec`/`full` with stage 3's.
# per_scene: the field and a copy of the decoder are then refined on this scene's training
#   photos (lrf.align), starting from the method named by `base`.
METHODS = {
    "vae-ceiling": {"kind": "ceiling", "encoder": "pretrained", "decoder": "pretrained"},
    "stage1-ceiling": {"kind": "ceiling", "encoder": "stage1", "decoder": "stage1"},
    "rgb-3dgs": {"kind": "rgb", "encoder": None, "decoder": None},
    "vanilla": {"kind": "latent", "encoder": "pretrained", "decoder": "pretrained"},
    "enc": {"kind": "latent", "encoder": "stage1", "decoder": "stage1"},
    "dec": {"kind": "latent", "encoder": "pretrained", "decoder": "stage3"},
    "full": {"kind": "latent", "encoder": "stage1", "decoder": "stage3"},
    "vanilla-ps": {"kind": "latent", "encoder": "pretrained", "decoder": "pretrained", "per_scene": True,
                   "base": "vanilla"},
    "full-ps": {"kind": "latent", "encoder": "stage1", "decoder": "stage3", "per_scene": True, "base": "full"},
}

# The file of each tuned part, under results/vae/<vae name>/ (written by lrf.finetune.stage1/3;
# the workflow, the store and the viewer all find them here).
PART_FILES = {("stage1", "encoder"): "stage1/encoder.safetensors",
              ("stage1", "decoder"): "stage1/decoder.safetensors",
              ("stage3", "decoder"): "stage3/decoder.safetensors"}


def part_file(vae_name: str, part: str, which: str) -> str | None:
    """vae/<vae name>/<stage>/<part>.safetensors for a tuned part, None for the pretrained one
    (relative to the results folder)."""
    return None if which == "pretrained" else f"vae/{vae_name}/{PART_FILES[(which, part)]}"


def method_part(vae_name: str, method: str, part: str) -> str | None:
    """The tuned `part` (encoder | decoder) a method uses, relative to results/; None: pretrained."""
    which = METHODS[method].get(part)
    return None if which is None else part_file(vae_name, part, which)


_WHOSE = {"pretrained": "the pretrained", "stage1": "stage 1's", "stage3": "stage 3's"}


def describe(method: str) -> str:
    """One line for the report: what the method fits and what decodes it."""
    m = METHODS[method]
    if m["kind"] == "rgb":
        return f"{method}: a colour 3DGS field"
    if m["kind"] == "ceiling":
        return f"{method}: no field, {_WHOSE[m['decoder']]} decoder on {_WHOSE[m['encoder']]} encoder's latents"
    text = (f"{method}: a field of {_WHOSE[m['encoder']]} encoder's latents, decoded by "
            f"{_WHOSE[m['decoder']]} decoder")
    if m["decoder"] == "stage1":
        text += " (the pretrained one unless stage1.tune_decoder)"
    if m["decoder"] == "stage3":
        text += " (which starts from stage 1's)"
    if m.get("per_scene"):
        text = (f"{method}: {m['base']}'s field and decoder, refined on this scene's training photos "
                "(lrf.align)")
    return text


def per_scene(method: str) -> bool:
    return bool(METHODS[method].get("per_scene"))


def latent_variant(vae_name: str, method: str) -> str:
    """Name of the latent cache a method's field is fitted to (depends on the encoder only)."""
    return vae_name if METHODS[method]["encoder"] == "pretrained" else f"{vae_name}-enc"


def field_name(method: str) -> str:
    """The fitted field a method starts from: `dec` reuses `vanilla`'s field, `full` `enc`'s,
    and a per-scene method its base's (then refines a copy of it)."""
    m = METHODS[method]
    if m["kind"] == "rgb":
        return "rgb-3dgs"
    return "vanilla" if m["encoder"] == "pretrained" else "enc"
