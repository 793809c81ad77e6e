"""What each method name means: which field kind, which encoder and decoder.

One table, read by the workflow and the report, so that adding a method is one entry here.
"""
from __future__ import annotations

# The order here is the report's order (lrf.report), and every other list of method names (the
# config schema's enums, the workflow's wildcard constraints) is derived from this table or checked
# against it (tests/test_config.py).
# kind: latent (a field of VAE latents), rgb (a colour field), ceiling (no field)
# encoder / decoder: "pretrained", or "tuned" (stage 1 encoder / stage 3 decoder)
# per_scene: the field and a copy of the decoder are then refined on this scene's training
#   photos (lrf.align), starting from the method named by `base`.
METHODS = {
    "vae-ceiling": {"kind": "ceiling", "encoder": "pretrained", "decoder": "pretrained"},
    "rgb-3dgs": {"kind": "rgb", "encoder": None, "decoder": None},
    "vanilla": {"kind": "latent", "encoder": "pretrained", "decoder": "pretrained"},
    "enc": {"kind": "latent", "encoder": "tuned", "decoder": "pretrained"},
    "dec": {"kind": "latent", "encoder": "pretrained", "decoder": "tuned"},
    "full": {"kind": "latent", "encoder": "tuned", "decoder": "tuned"},
    "vanilla-ps": {"kind": "latent", "encoder": "pretrained", "decoder": "pretrained", "per_scene": True,
                   "base": "vanilla"},
    "full-ps": {"kind": "latent", "encoder": "tuned", "decoder": "tuned", "per_scene": True, "base": "full"},
}


def per_scene(method: str) -> bool:
    return bool(METHODS[method].get("per_scene"))


def latent_variant(vae_name: str, method: str) -> str:
    """Name of the latent cache a method's field is fitted to (depends on the encoder only)."""
    return vae_name if METHODS[method]["encoder"] != "tuned" else f"{vae_name}-enc"


def field_name(method: str) -> str:
    """The fitted field a method starts from: `dec` reuses `vanilla`'s field, `full` `enc`'s,
    and a per-scene method its base's (then refines a copy of it)."""
    m = METHODS[method]
    if m["kind"] == "rgb":
        return "rgb-3dgs"
    return "vanilla" if m["encoder"] != "tuned" else "enc"
