"""Every stage's settings, in one torch-free module: the dataclasses whose defaults are the only
defaults (config.yaml holds overrides), and the check Snakemake runs on every override before
the DAG starts (`check_config`, from workflow/rules/common.smk), so that a typo under `stage3:`
fails in `snakemake -n`, not hours later when stage 3 starts.

    DensifyConfig -> FieldConfig (field.latent / field.rgb: the trainer's settings and its schedule)
    TrainConfig -> Stage1Config (stage1), Stage3Config (stage3), AlignConfig (align)
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import ClassVar

from lrf.errors import InputError

DOWNSCALE = 8      # the VAEs' latent grid: 1/8 of the image
EPS2D = 0.3        # 3DGS' screen-space blur (pixels^2), every rasteriser's default (lrf.render)


# Settings renamed since earlier releases: an old config fails with a line naming the new key.
RENAMED = {"iterations": "steps"}


def check_overrides(cls, overrides: dict | None) -> dict:
    """`overrides` checked against dataclass `cls`: unknown keys and wrong types raise a one-line
    InputError; ints given for float settings become floats. Returns the checked dict."""
    if overrides is not None and not isinstance(overrides, dict):
        raise InputError(f"{cls.__name__}: overrides must be a mapping, got {type(overrides).__name__}")
    overrides = dict(overrides or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    old = sorted(k for k in overrides if k in RENAMED and RENAMED[k] in fields and k not in fields)
    if old:
        raise InputError(f"{cls.__name__}: " + ", ".join(f"{k!r} is now called {RENAMED[k]!r}" for k in old)
                         + "; rename it in the config")
    bad = sorted(set(overrides) - set(fields))
    if bad:
        raise InputError(f"{cls.__name__}: unknown key(s) {', '.join(bad)}; "
                         f"known: {', '.join(sorted(fields))}")
    defaults = cls()
    for k, v in overrides.items():
        ref = getattr(defaults, k)
        ok = (isinstance(v, bool) if isinstance(ref, bool)
              else isinstance(v, int) and not isinstance(v, bool) if isinstance(ref, int)
              else isinstance(v, (int, float)) and not isinstance(v, bool) if isinstance(ref, float)
              else isinstance(v, str) if isinstance(ref, str) else True)
        if not ok:
            raise InputError(f"{cls.__name__}: {k} must be {type(ref).__name__}, got {v!r}")
        if isinstance(ref, float):
            overrides[k] = float(v)
    return overrides


class Resumable:
    """A trainer's config whose RESUME_FREE keys may change between a run and its resumption;
    every other setting is in the checkpoint's fingerprint."""

    RESUME_FREE: ClassVar[frozenset] = frozenset()

    def fingerprint(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.RESUME_FREE}

    @classmethod
    def from_overrides(cls, overrides: dict | None = None):
        """Config from JSON overrides, with a one-line InputError for unknown keys, bad types or
        values out of range."""
        cfg = cls(**check_overrides(cls, overrides))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Ranges a type check cannot see (subclasses add theirs)."""
        if getattr(self, "steps", 0) < 0:
            raise InputError(f"{type(self).__name__}: steps must be >= 0")


# ----------------------------------------------------------------------------- fields
@dataclass
class DensifyConfig:
    """3DGS / gsplat DefaultStrategy defaults; scene_scale is 1.1x the camera radius."""

    refine_start: int = 500
    refine_stop: int = 15_000
    refine_every: int = 100
    reset_every: int = 3_000
    pause_refine_after_reset: int = 0
    grow_grad2d: float = 2e-4
    grow_scale3d: float = 0.01
    prune_scale3d: float = 0.1
    prune_opa: float = 0.005
    split_scale_div: float = 1.6
    max_gaussians: int = 1_000_000


@dataclass
class FieldConfig(DensifyConfig, Resumable):
    """Training settings; learning rates follow 3DGS (means scaled by the scene extent).

    The densification schedule is DensifyConfig's own fields (inherited, so their defaults live
    there only); config.yaml keeps them flat under field.latent / field.rgb."""

    steps: int = 30_000                  # the run's length, as every trainer's config names it
    sh_degree: int = 0
    sh_degree_interval: int = 1000       # raise the active SH degree every this many steps
    rgb: bool = False                    # RGB field: +0.5 SH offset and clamp (off for latents)
    means_lr: float = 1.6e-4             # x scene extent, decays exponentially ...
    means_lr_final: float = 1.6e-6       # ... to this x extent at the last step
    features_lr: float = 2.5e-3
    features_rest_lr_div: float = 20.0
    opacities_lr: float = 0.05
    scales_lr: float = 5e-3
    quats_lr: float = 1e-3
    adam_eps: float = 1e-15
    lambda_dssim: float = 0.2
    eps2d: float = EPS2D                 # screen-space blur (pixels^2 of the fitted map; 3DGS' 0.3), saved
                                         # with the field so every render of it uses the same
    normalize: bool = True               # ChannelNorm the maps before the loss
    ssim_data_range: float | None = None  # None: 4.0 on normalised maps, 1.0 on raw ones
    densify: bool = True                 # the schedule: DensifyConfig's fields
    # initialisation
    init_opacity: float = 0.1
    init_scale: float = 1.0
    random_init_n: int = 100_000
    random_init_extent: float = 3.0      # x scene extent, cube half-size around the scene focus
    background: list[float] | str | None = None   # None (renderer default), "mean" (target mean), or [C]
    seed: int = 0
    checkpoint_every: int = 1000
    log_every: int = 100
    keep_checkpoint: bool = False        # keep ckpt.safetensors after the final field is written
    eval_loss: bool = True               # mean loss over all training views at start and end
    export_ply: bool = False             # also write point_cloud.ply
    backend: str = "auto"
    device: str = "auto"

    # Keys that may change between a run and its resumption without invalidating it (not
    # `steps`: the means' learning rate decays over the whole run).
    RESUME_FREE: ClassVar[frozenset] = frozenset({"checkpoint_every", "log_every", "keep_checkpoint", "eval_loss",
                                                  "backend", "device", "export_ply"})

    def densify_config(self) -> DensifyConfig:
        """The densification schedule: this config's DensifyConfig fields."""
        return DensifyConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DensifyConfig)})


# ----------------------------------------------------------------------------- stages 1 and 3, alignment
@dataclass
class TrainConfig(Resumable):
    """Settings both stages share; stages subclass it with their own loss weights."""

    steps: int = 2000
    lr: float = 1e-4              # Adam
    batch: int = 4                # stage 1: image pairs (2 crops each); stage 3: crops
    crop: int = 128               # crop side in pixels (a multiple of 8)
    w_lpips: float = 1.0          # recon = L1 + w_lpips * LPIPS (as in the LDM autoencoder recipe)
    lpips_net: str = "alex"
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 25
    keep_checkpoint: bool = False  # keep ckpt.safetensors once the final weights are written
    device: str = "auto"          # lrf.device.resolve_device
    # Checkpoint selection (stages 1 and 3, the per-scene alignment): score the weights on
    # validation views carved out of the tuning scenes' TRAINING views (lrf.scene.model.
    # validation_views; training no longer reads them) at step 0, every `validate_every` steps and
    # at the end, and ship the best eligible step; step 0 is a candidate, so a stage never ships
    # weights worse than its start by its own criterion. 0: off (every training view trains).
    validate_every: int = 0
    val_views: int = 3            # at most this many validation views per tuning scene (at least 1)
    val_max_drop_db: float = 0.3  # eligible: clean encode-decode PSNR at the validation views at
    #                               most this far below step 0's

    # Keys that may change between a run and its resumption without invalidating it: `steps`
    # only moves the end (the learning rate is constant), the rest do not touch the maths.
    RESUME_FREE: ClassVar[frozenset] = frozenset({"steps", "checkpoint_every", "log_every",
                                                  "keep_checkpoint", "device"})
    WHOLE_VIEWS: ClassVar[bool] = False  # crop 0 means whole views (the alignment only)

    def validate(self) -> None:
        name = type(self).__name__
        if self.crop < 0 or self.crop % DOWNSCALE or (self.crop == 0 and not self.WHOLE_VIEWS):
            what = "0 (whole views) or a positive" if self.WHOLE_VIEWS else "a positive"
            raise InputError(f"{name}: crop must be {what} multiple of {DOWNSCALE}, got {self.crop}")
        for k in ("steps", "checkpoint_every", "log_every", "validate_every"):
            if getattr(self, k) < 0:
                raise InputError(f"{name}: {k} must be >= 0")
        if self.batch < 1:
            raise InputError(f"{name}: batch must be >= 1")
        if self.lr <= 0:
            raise InputError(f"{name}: lr must be > 0")
        if self.val_views < 1:
            raise InputError(f"{name}: val_views must be >= 1")
        if self.val_max_drop_db < 0:
            raise InputError(f"{name}: val_max_drop_db must be >= 0")
        if self.lpips_net not in ("alex", "vgg"):
            raise InputError(f"{name}: lpips_net must be 'alex' or 'vgg'")


PAIR_SAMPLING = ("matches", "weight_matches", "uniform")
CORR_LOSSES = ("l1", "ratio")


@dataclass
class Stage1Config(TrainConfig):
    lr: float = 2e-5              # 1e-4 cost fern 1-2.5 dB recon PSNR within 5 steps (Adam's first
    #                               steps move every weight by ~lr); a pretrained encoder wants less
    lambda_corr: float = 1.0
    w_stats: float = 1.0          # deterministic encoders (TAESD family)
    w_kl: float = 1e-6            # KL autoencoders (the LDM autoencoder's KL weight)
    pair_sampling: str = "matches"
    corr_margin: float = 8.0      # px: matches nearer a crop edge are skipped (zero padding there)
    w_equiv: float = 0.0          # warp equivariance (EQ-VAE style): E(warp(x)) vs warp(E(x)) for a
    equiv_shift: float = 8.0      # random sub-cell shift (px, up to), scale and rotation per crop;
    equiv_scale: float = 0.1      # dense, needs no correspondences: the aliasing that makes latents
    equiv_rotate_deg: float = 5.0  # of one 3D point disagree between views
    corr_loss: str = "ratio"      # matched L1 / L1 of the same latents at non-matching pixels (scale-
    #                               free: shrinking latents cannot lower it); "l1": matched L1 alone.
    #                               docs/experiments.md E2: unseen-scene ratio 0.646 (l1) -> 0.632
    w_anchor: float = 1.0         # L1 to the pretrained encoder's latents (0: off). Lego-tuned,
    #                               150 steps, fern never seen: off -> held-out corr ratio
    #                               0.506 -> 0.481 but recon 27.39 -> 25.66 dB; 1.0 -> 0.495 and 26.91
    # Latents a field can hold (issue 18, docs/experiments.md E9): the decoder may train too, and
    # three more losses make averaged / resampled latents decodable.
    tune_decoder: bool = False    # train the decoder with the encoder (saves decoder.safetensors)
    tune_encoder: bool = True     # False with tune_decoder: the decoder alone learns to decode what the
    #                               pretrained encoder gives (corr/stats/anchor terms are then constants)
    decoder_lr: float = 0.0       # Adam lr of the decoder; 0: the same as lr
    w_shift_avg: float = 0.0      # L1(D(mean of shifted encodings, each moved back), x) on one crop per
    shift_avg_step: int = 0       # pair: the 2x2 grid of window shifts {0, s} x {0, t} px, s and t
    #                               drawn from 1..7 per step (0) or fixed (1..7)
    shift_avg_lpips: bool = False  # the shift-averaged term is L1 + w_lpips * LPIPS, as recon is
    w_dec_equiv: float = 0.0      # decoder equivariance: D(warp z) vs warp(x), the same random warps
    #                               (equiv_shift / equiv_scale / equiv_rotate_deg) as w_equiv
    w_out_anchor: float = 0.0     # L1 between D(E(x)) and the pretrained D0(E0(x)) (an anchor on the
    #                               decoded image instead of on the latents)
    val_grid: int = 4             # shifts per axis of the validation's shift-averaged ceiling: 4 is the
    #                               measure's 4x4 grid of 0/2/4/6 px; 2 (0/4 px) costs a quarter of the encodes
    shift_measure: str = "all"    # consistency.json's shift-averaged ceiling (16 encodes per held-out
    #                               view) on "all" scenes, only the --measure-scene ones ("measure"), "none"

    RESUME_FREE = TrainConfig.RESUME_FREE | {"shift_measure"}  # measures only

    def validate(self) -> None:
        super().validate()
        if self.pair_sampling not in PAIR_SAMPLING:
            raise InputError(f"Stage1Config: pair_sampling must be one of {', '.join(PAIR_SAMPLING)}")
        if self.w_equiv > 0 and self.crop < 48:
            raise InputError("Stage1Config: w_equiv needs crop >= 48 (the term skips 2 latent cells at each border)")
        if self.corr_loss not in CORR_LOSSES:
            raise InputError(f"Stage1Config: corr_loss must be one of {', '.join(CORR_LOSSES)}")
        if not 0 <= self.corr_margin < self.crop / 2:
            raise InputError("Stage1Config: corr_margin must be in [0, crop/2)")
        if not 0 <= self.shift_avg_step <= 7:
            raise InputError("Stage1Config: shift_avg_step must be in 0..7 (px within one latent cell; 0: random)")
        if self.w_dec_equiv > 0 and self.crop < 48:
            raise InputError("Stage1Config: w_dec_equiv needs crop >= 48 (the term skips the warped border)")
        if not (self.tune_encoder or self.tune_decoder):
            raise InputError("Stage1Config: tune_encoder and tune_decoder are both false: nothing to train")
        if self.decoder_lr < 0:
            raise InputError("Stage1Config: decoder_lr must be >= 0")
        if self.val_grid not in (1, 2, 4, 8):
            raise InputError("Stage1Config: val_grid must be 1, 2, 4 or 8 (shifts per axis, evenly within a cell)")
        if self.shift_measure not in ("all", "measure", "none"):
            raise InputError("Stage1Config: shift_measure must be all, measure or none")


@dataclass
class Stage3Config(TrainConfig):
    lr: float = 2e-5              # lego-tuned, 150 steps, fern never seen (rendered / clean test
    clean_fraction: float = 0.5   # PSNR, before 19.37 / 24.94): lr 5e-5 + clean 0.25 -> 18.47 /
    #                               21.34; lr 2e-5 + clean 0.5 -> 18.94 / 22.73 (in-domain clean
    #                               28.11 -> 27.81 instead of 25.59). One tuning scene drifts the
    #                               decoder; more and more varied scenes are the real remedy.
    w_lpips: float = 0.1          # L1 + 0.1 LPIPS (docs/experiments.md E4: 1.0 sharpened but cost PSNR;
    #                               0.1 raised held-out PSNR of `full` on all three unseen scenes,
    #                               fern 19.46 -> 19.89, and kept clean decoding 0.5-0.7 dB better)
    backend: str = "auto"         # rasteriser for the one-off renders

    RESUME_FREE = TrainConfig.RESUME_FREE | {"backend"}  # renders are pinned by their hash instead

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.clean_fraction <= 1.0:
            raise InputError("Stage3Config: clean_fraction must be in [0, 1]")


@dataclass
class AlignConfig(TrainConfig):
    steps: int = 300
    batch: int = 1                # views per step
    crop: int = 128               # photo crop side (pixels); the latent crop is crop // 8 cells; 0: whole views
    lr: float = 5e-5              # the decoder copy (Adam)
    w_lpips: float = 0.0          # photometric loss: L1 + w_dssim * D-SSIM + w_lpips * LPIPS
    w_dssim: float = 0.2
    features_lr: float = 2.5e-3   # the field's parameters (Adam), as 3DGS' late-phase rates
    opacities_lr: float = 0.01
    scales_lr: float = 1e-3
    quats_lr: float = 1e-3
    means_lr: float = 1.6e-6      # x scene extent (3DGS' final means rate)
    tune_decoder: bool = True     # False: only the field moves (the decoder stays as given)
    backend: str = "auto"
    # validate_every > 0: a few of the scene's training views leave the alignment and choose the step
    # shipped (decoded PSNR there; step 0, the field and decoder as given, is a candidate)

    WHOLE_VIEWS = True

    def validate(self) -> None:
        super().validate()
        for k in ("w_dssim", "features_lr", "opacities_lr", "scales_lr", "quats_lr", "means_lr"):
            if getattr(self, k) < 0:
                raise InputError(f"AlignConfig: {k} must be >= 0")


# ----------------------------------------------------------------------------- the workflow's check
# config section -> its dataclass; each section is built and validated (names, types, ranges such
# as a crop that is a multiple of 8).
SECTIONS = {"field.latent": FieldConfig, "field.rgb": FieldConfig, "stage1": Stage1Config,
            "stage3": Stage3Config, "align": AlignConfig}


def check_config(config: dict) -> None:
    """Check every override section of a workflow config; raise ValueError naming the section."""
    for section, cls in SECTIONS.items():
        node = config
        for part in section.split("."):
            node = (node or {}).get(part) if isinstance(node, dict) else None
        try:
            checked = check_overrides(cls, node)
            cls(**checked).validate()
        except (InputError, TypeError) as e:
            raise ValueError(f"config {section}: {e}") from None
