"""Fit a Gaussian field to per-view target maps (latents or RGB), resumably and reproducibly.

The loop is lrf.train.loop's TrainLoop, as for the other trainers. Resumption is exact: with a
fixed seed on one device the checkpoint holds everything the next step depends on (params, Adam
moments and step counts per named group, strategy accumulators and generator, every RNG state,
channel-norm stats, the loss accumulator and log). The view order is a pure function of
(seed, step) (a fresh seeded permutation per epoch), so it needs no state.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field as dc_field
from pathlib import Path

import numpy as np
import torch

from lrf.device import resolve_device
from lrf.field.gaussians import GaussianField, init_features_from_tracks
from lrf.field.io import save_field, save_ply
from lrf.field.losses import ChannelNorm, DEFAULT_SSIM_RANGE, field_loss
from lrf.field.strategy import DensifyStrategy
from lrf.io import atomic_write_json
from lrf.settings import FieldConfig
from lrf.train.loop import TrainLoop, fingerprint, load_optimizer_tensors, optimizer_tensors, say

FIELD_NAME, FIELD_META, LOG_NAME = "field.safetensors", "field.json", "train_log.csv"
LOG_COLUMNS = ("step", "loss", "n_gaussians", "seconds")
_LOG_FORMATS = {"n_gaussians": "d", "seconds": ".3f"}
# Bumped when the checkpoint's layout changes: a checkpoint of another layout is then ignored
# (with a warning) instead of half-read. 2: written by TrainLoop.
_CKPT_LAYOUT = 2


@dataclass
class FitResult:
    field: GaussianField
    norm: ChannelNorm
    out_dir: Path
    steps: int                     # completed steps
    completed: bool                # False when stopped early by stop_at
    seconds: float                 # training time over all sessions (excludes evaluation)
    initial_loss: float | None
    final_loss: float | None
    resumed_from: int | None = None
    log: list[tuple] = dc_field(default_factory=list)


# ---------------------------------------------------------------- helpers


def _view_at(seed: int, step: int, n: int, cache: dict) -> int:
    """Index into the training views for `step`: a seeded permutation per epoch (stateless)."""
    epoch, k = divmod(step, n)
    if cache.get("epoch") != epoch:
        cache["epoch"] = epoch
        cache["perm"] = np.random.default_rng([int(seed), 0x5EED, epoch]).permutation(n)
    return int(cache["perm"][k])


def _views(scene, targets: dict[int, torch.Tensor], dev: torch.device) -> tuple[dict, list[tuple]]:
    """({camera index: target on dev} for the training views, [(w2c, K, target)]), with K scaled
    to each target's resolution (targets may be smaller than the photos)."""
    tg = {i: targets[i].detach().to(dev, torch.float32) for i in scene.train if i in targets}
    if not tg:
        raise ValueError(f"{scene.key}: no training view has a target")
    chans = {t.shape[0] for t in tg.values()}
    if len(chans) != 1:
        raise ValueError(f"{scene.key}: targets disagree on the channel count: {sorted(chans)}")
    views = []
    for i, t in tg.items():
        cam = scene.cameras[i]
        S = np.diag([t.shape[2] / cam.width, t.shape[1] / cam.height, 1.0])
        views.append((torch.as_tensor(cam.w2c, dtype=torch.float32, device=dev),
                      torch.as_tensor(S @ cam.K, dtype=torch.float32, device=dev), t))
    return tg, views


def _background(cfg: FieldConfig, norm: ChannelNorm, dev: torch.device) -> torch.Tensor | None:
    bg = cfg.background
    if isinstance(bg, str):
        if bg != "mean":
            raise ValueError(f"background must be None, 'mean' or a list, not {bg!r}")
        return norm.mean.to(dev)
    return None if bg is None else torch.as_tensor(bg, dtype=torch.float32, device=dev)


def _build_optimizer(field: GaussianField, cfg: FieldConfig, extent: float) -> torch.optim.Adam:
    lrs = {"means": cfg.means_lr * extent, "scales": cfg.scales_lr, "quats": cfg.quats_lr,
           "opacities": cfg.opacities_lr, "features_dc": cfg.features_lr,
           "features_rest": cfg.features_lr / cfg.features_rest_lr_div}
    groups = [{"params": [field.params[k]], "lr": lr, "name": k} for k, lr in lrs.items()]
    return torch.optim.Adam(groups, eps=cfg.adam_eps)


def _means_lr(cfg: FieldConfig, extent: float, step: int) -> float:
    frac = min(step / max(cfg.steps, 1), 1.0)
    return cfg.means_lr * extent * (cfg.means_lr_final / cfg.means_lr) ** frac


class _Fit:
    """The trained state: the field, its optimizer (rebuilt whenever the field is, since
    densification replaces the parameter tensors) and the densification strategy."""

    def __init__(self, cfg: FieldConfig, extent: float, norm: ChannelNorm, dev: torch.device):
        self.cfg, self.extent, self.norm, self.dev = cfg, extent, norm, dev
        self.strategy = DensifyStrategy(cfg.densify_config(), extent, seed=cfg.seed, device=dev) if cfg.densify else None

    def start(self, field: GaussianField) -> None:
        self.field, self.opt = field, _build_optimizer(field, self.cfg, self.extent)

    def state(self) -> dict[str, torch.Tensor]:
        t = {f"param/{k}": v for k, v in self.field.tensors().items()}
        t.update(optimizer_tensors(self.opt, named=True))
        if self.strategy is not None:
            t.update({f"strategy/{k}": v.contiguous() for k, v in self.strategy.state_dict().items()})
        t["norm/mean"], t["norm/std"] = self.norm.mean.contiguous(), self.norm.std.contiguous()
        return t

    def load(self, tens: dict[str, torch.Tensor]) -> None:
        params = {k[len("param/"):]: v for k, v in tens.items() if k.startswith("param/")}
        self.start(GaussianField.from_tensors(params, rgb_offset=self.cfg.rgb, eps2d=self.cfg.eps2d).to(self.dev))
        load_optimizer_tensors(self.opt, tens, named=True)
        if self.strategy is not None:
            self.strategy.load_state_dict({k[len("strategy/"):]: v for k, v in tens.items()
                                           if k.startswith("strategy/")}, self.dev)
        self.norm = ChannelNorm(tens["norm/mean"], tens["norm/std"])

    def step(self, step: int, view: tuple, background, data_range: float) -> torch.Tensor:
        """One Adam step on one view, then densification; the loss (not synchronised)."""
        cfg, field = self.cfg, self.field
        for g in self.opt.param_groups:
            if g["name"] == "means":
                g["lr"] = _means_lr(cfg, self.extent, step)
        field.active_sh_degree = min(cfg.sh_degree, step // max(cfg.sh_degree_interval, 1))
        vm, K, tgt = view
        h, w = tgt.shape[1:]
        out = field.render(vm, K, w, h, background, cfg.backend)
        if self.strategy is not None:
            self.strategy.step_pre_backward(out)
        loss = field_loss(out.image.permute(2, 0, 1), tgt, self.norm, cfg.lambda_dssim, data_range)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.strategy is not None:
            self.strategy.step_post_backward(field, self.opt, step, out, w, h)
        return loss.detach()


def _write_outputs(loop: TrainLoop, run: _Fit, scene, train_ids: list[int], background, final_loss,
                   resumed_from: int | None) -> None:
    """field.safetensors (+ PLY) and field.json, the summary of the finished run."""
    cfg, field, initial = loop.cfg, run.field, loop.extra["initial_loss"]
    summary = {"config": asdict(cfg), "n_gaussians": field.num_gaussians,
               "num_gaussians": field.num_gaussians, "channels": field.channels,
               "background_value": None if background is None else background.detach().cpu().tolist(),
               "sh_degree": field.sh_degree, "rgb_offset": field.rgb_offset,
               "channel_norm": run.norm.to_dict(), "seconds": loop.seconds, "steps": loop.step,
               "initial_loss": initial, "final_loss": final_loss,
               "last_logged_loss": loop.rows[-1][1] if loop.rows else None,
               "train_views": train_ids, "scene": scene.key, "resumed_from": resumed_from}
    save_field(field, loop.out_dir / FIELD_NAME, {k: summary[k] for k in ("channel_norm", "sh_degree", "channels")})
    if cfg.export_ply:
        save_ply(field, loop.out_dir / "point_cloud.ply")
    atomic_write_json(loop.out_dir / FIELD_META, summary)
    if loop.progress:
        say(f"[{loop.name}] done, {field.num_gaussians} Gaussians, loss {initial} -> {final_loss}, {loop.seconds:.1f}s")


# ---------------------------------------------------------------- public API
@torch.no_grad()
def evaluate_loss(field: GaussianField, views: list[tuple], norm: ChannelNorm, cfg: FieldConfig,
                  background=None) -> float:
    """Mean field_loss over (viewmat, K, target) triples."""
    data_range = cfg.ssim_data_range or (DEFAULT_SSIM_RANGE if cfg.normalize else 1.0)
    tot = 0.0
    for vm, K, tgt in views:
        out = field.render(vm, K, tgt.shape[2], tgt.shape[1], background, cfg.backend)
        tot += float(field_loss(out.image.permute(2, 0, 1), tgt, norm, cfg.lambda_dssim, data_range))
    return tot / max(len(views), 1)


def scene_scale(scene) -> float:
    """3DGS' scene extent: 1.1x the radius of the camera centres (1 for a degenerate rig)."""
    r = scene.extent() if len(scene.cameras) > 1 else 0.0
    return 1.1 * r if r > 1e-9 else 1.0


def init_field(scene, train_targets: dict[int, torch.Tensor], cfg: FieldConfig, init: str = "points") -> GaussianField:
    """SfM points with track-sampled features, or uniform random points (fallback)."""
    pts = scene.points
    rng = np.random.default_rng([cfg.seed, 0x1217])
    if init == "points" and (pts is None or len(pts) == 0):
        warnings.warn(f"{scene.key}: no SfM points; using random init", RuntimeWarning, stacklevel=2)
        init = "random"
    if init == "points":
        feats = init_features_from_tracks(pts, scene, train_targets)
        xyz = pts.xyz
        if len(xyz) > cfg.max_gaussians:
            keep = np.sort(rng.choice(len(xyz), cfg.max_gaussians, replace=False))
            xyz, feats = xyz[keep], feats[torch.as_tensor(keep)]
    elif init == "random":
        from lrf.field.orbit import scene_focus

        n = min(cfg.random_init_n, cfg.max_gaussians)
        centre = scene_focus(scene, list(train_targets))
        half = cfg.random_init_extent * scene_scale(scene)
        xyz = centre + half * (2 * rng.random((n, 3)) - 1)
        feats = init_features_from_tracks(None, scene, train_targets, xyz=xyz)
    else:
        raise ValueError(f"init must be 'points' or 'random', not {init!r}")
    return GaussianField.from_points(xyz, feats, cfg.sh_degree, cfg.init_opacity, cfg.init_scale, cfg.rgb,
                                     eps2d=cfg.eps2d)


def fit_field(scene, targets: dict[int, torch.Tensor], cfg: FieldConfig, out_dir: str | Path,
              init: str = "points", progress: bool = True, stop_at: int | None = None) -> FitResult:
    """Fit a field to `targets` ({camera index: [C,h,w]}) over the scene's training views.

    Resumes from out_dir/ckpt.safetensors when it is valid and was written with the same
    settings and data. `stop_at` ends the session after that many total steps without writing
    the final field (as if killed; for chunked runs and tests).
    """
    dev = resolve_device(cfg.device, scene.key, renders=True)
    tg, views = _views(scene, targets, dev)
    train_ids, C = list(tg), views[0][2].shape[0]
    norm = ChannelNorm.from_targets(tg.values()) if cfg.normalize else ChannelNorm.identity(C)
    data_range = cfg.ssim_data_range or (DEFAULT_SSIM_RANGE if cfg.normalize else 1.0)
    fp = fingerprint(cfg, init=init, train_ids=train_ids, channels=C, shapes=[list(t.shape) for t in tg.values()],
                     norm=[round(float(x), 5) for x in torch.cat([norm.mean, norm.std])], layout=_CKPT_LAYOUT)
    run = _Fit(cfg, scene_scale(scene), norm, dev)
    # TrainLoop seeds torch / numpy / python's global RNGs before init_field draws from them.
    loop = TrainLoop(f"field {scene.key}", out_dir, fp, cfg, LOG_COLUMNS, run.state, run.load, progress,
                     curve_file=LOG_NAME, formats=_LOG_FORMATS, mean_of=("loss",),
                     side=lambda: {"n_gaussians": run.field.num_gaussians})
    resumed_from = loop.step if loop.resume() is not None else None
    if resumed_from is None:
        run.start(init_field(scene, tg, cfg, init).to(dev))
    background = _background(cfg, run.norm, dev)
    if loop.extra.get("initial_loss") is None:
        loop.extra["initial_loss"] = evaluate_loss(run.field, views, run.norm, cfg, background) if cfg.eval_loss else None
    perm: dict = {}

    def step_fn(rng):
        loss = run.step(loop.step, views[_view_at(cfg.seed, loop.step, len(views), perm)], background, data_range)
        return (loss, run.field.num_gaussians), None

    completed = loop.run(step_fn, stop_at)
    final_loss = None
    if completed:
        final_loss = evaluate_loss(run.field, views, run.norm, cfg, background) if cfg.eval_loss else None
        _write_outputs(loop, run, scene, train_ids, background, final_loss, resumed_from)
        if cfg.keep_checkpoint and cfg.checkpoint_every > 0:
            loop.checkpoint()      # the finished state: a rerun finds nothing left to do
        loop.finish(cfg.keep_checkpoint)
    return FitResult(run.field, run.norm, loop.out_dir, loop.step, completed, loop.seconds,
                     loop.extra["initial_loss"], final_loss, resumed_from, list(loop.rows))
