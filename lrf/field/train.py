"""Fit a Gaussian field to per-view target maps (latents or RGB), resumably and reproducibly.

Resumption is exact: with a fixed seed on one device the checkpoint holds everything the next
step depends on (params, Adam moments and step counts, strategy accumulators and generator,
torch/numpy global RNG states, channel-norm stats, the loss accumulator). The view order is a
pure function of (seed, step) (a fresh seeded permutation per epoch), so it needs no state.
"""
from __future__ import annotations

import csv
import io
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field as dc_field
from pathlib import Path

import numpy as np
import torch

from lrf.field.gaussians import GaussianField, init_features_from_tracks
from lrf.field.io import save_field, save_ply
from lrf.field.losses import ChannelNorm, DEFAULT_SSIM_RANGE, field_loss
from lrf.field.strategy import DensifyStrategy
from lrf.settings import FieldConfig
from lrf.checkpoint import CKPT_META, CKPT_NAME, load_checkpoint, save_checkpoint
from lrf.io import atomic_write_json, atomic_write_text

FIELD_NAME, FIELD_META, LOG_NAME = "field.safetensors", "field.json", "train_log.csv"
# Settings that may change between a run and its resumption without invalidating it.
_RESUME_FREE = {"checkpoint_every", "log_every", "keep_checkpoint", "eval_loss", "backend", "device", "export_ply"}


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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _fingerprint(cfg: FieldConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in _RESUME_FREE}


def _view_at(seed: int, step: int, n: int, cache: dict) -> int:
    """Index into the training views for `step`: a seeded permutation per epoch (stateless)."""
    epoch, k = divmod(step, n)
    if cache.get("epoch") != epoch:
        cache["epoch"] = epoch
        cache["perm"] = np.random.default_rng([int(seed), 0x5EED, epoch]).permutation(n)
    return int(cache["perm"][k])


def _np_state_to_json(st) -> list:
    return [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]


def _np_state_from_json(js) -> tuple:
    return (js[0], np.asarray(js[1], dtype=np.uint32), js[2], js[3], js[4])


def _build_optimizer(field: GaussianField, cfg: FieldConfig, extent: float) -> torch.optim.Adam:
    lrs = {"means": cfg.means_lr * extent, "scales": cfg.scales_lr, "quats": cfg.quats_lr,
           "opacities": cfg.opacities_lr, "features_dc": cfg.features_lr,
           "features_rest": cfg.features_lr / cfg.features_rest_lr_div}
    groups = [{"params": [field.params[k]], "lr": lr, "name": k} for k, lr in lrs.items()]
    return torch.optim.Adam(groups, eps=cfg.adam_eps)


def _means_lr(cfg: FieldConfig, extent: float, step: int) -> float:
    frac = min(step / max(cfg.iterations, 1), 1.0)
    return cfg.means_lr * extent * (cfg.means_lr_final / cfg.means_lr) ** frac



def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- checkpoints


def _save_checkpoint(out_dir: Path, field: GaussianField, opt: torch.optim.Optimizer,
                     strategy: DensifyStrategy | None, norm: ChannelNorm, state: dict) -> None:
    t = {f"param/{k}": v for k, v in field.tensors().items()}
    for g in opt.param_groups:
        st = opt.state.get(g["params"][0], {})
        for key, v in st.items():
            if torch.is_tensor(v):
                t[f"adam/{g['name']}/{key}"] = v.detach().cpu().contiguous()
    if strategy is not None:
        t.update({f"strategy/{k}": v.contiguous() for k, v in strategy.state_dict().items()})
    t["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and field.device.type == "cuda":
        t["rng/cuda"] = torch.cuda.get_rng_state(field.device)
    t["norm/mean"], t["norm/std"] = norm.mean.contiguous(), norm.std.contiguous()
    t["log"] = torch.tensor(state["log"], dtype=torch.float64).reshape(-1, 4)
    meta = {k: v for k, v in state.items() if k != "log"}
    meta["numpy_rng"] = _np_state_to_json(np.random.get_state())
    meta["rgb_offset"] = field.rgb_offset
    save_checkpoint(out_dir, t, meta, side={"n_gaussians": field.num_gaussians})


def _load_checkpoint(out_dir: Path, fingerprint: dict) -> tuple[dict, dict] | None:
    """(tensors, metadata) of a valid, compatible checkpoint, else None (with a warning)."""
    return load_checkpoint(out_dir, fingerprint)


def _write_log(out_dir: Path, rows: list) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", "loss", "n_gaussians", "seconds"])
    for s, l, n, sec in rows:
        w.writerow([int(s), f"{l:.6g}", int(n), f"{sec:.3f}"])
    atomic_write_text(out_dir / LOG_NAME, buf.getvalue())


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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = _device(cfg.device)
    train_ids = [i for i in scene.train if i in targets]
    if not train_ids:
        raise ValueError(f"{scene.key}: no training view has a target")
    tg = {i: targets[i].detach().to(dev, torch.float32) for i in train_ids}
    chans = {t.shape[0] for t in tg.values()}
    if len(chans) != 1:
        raise ValueError(f"{scene.key}: targets disagree on the channel count: {sorted(chans)}")
    C = chans.pop()
    views = []
    for i in train_ids:
        cam, t = scene.cameras[i], tg[i]
        h, w = t.shape[1:]
        S = np.diag([w / cam.width, h / cam.height, 1.0])
        views.append((torch.as_tensor(cam.w2c, dtype=torch.float32, device=dev),
                      torch.as_tensor(S @ cam.K, dtype=torch.float32, device=dev), t))
    extent = scene_scale(scene)
    norm = ChannelNorm.from_targets(tg.values()) if cfg.normalize else ChannelNorm.identity(C)
    data_range = cfg.ssim_data_range or (DEFAULT_SSIM_RANGE if cfg.normalize else 1.0)
    fp = _fingerprint(cfg)
    fp.update(init=init, train_ids=train_ids, channels=C, shapes=[list(tg[i].shape) for i in train_ids],
              norm=[round(float(x), 5) for x in torch.cat([norm.mean, norm.std])])
    fp = json.loads(json.dumps(fp))   # the form it takes after a round trip through the checkpoint

    strategy = DensifyStrategy(cfg.densify_config(), extent, seed=cfg.seed, device=dev) if cfg.densify else None
    ck = _load_checkpoint(out_dir, fp)
    if ck is not None:
        tens, meta = ck
        field = GaussianField.from_tensors({k[6:]: v for k, v in tens.items() if k.startswith("param/")},
                                           rgb_offset=meta["rgb_offset"], eps2d=cfg.eps2d).to(dev)
        opt = _build_optimizer(field, cfg, extent)
        for g in opt.param_groups:
            st = {k.split("/")[2]: v.to(dev) if v.dim() > 0 else v
                  for k, v in tens.items() if k.startswith(f"adam/{g['name']}/")}
            if st:
                opt.state[g["params"][0]] = st
        if strategy is not None:
            strategy.load_state_dict({k[9:]: v for k, v in tens.items() if k.startswith("strategy/")}, dev)
        torch.set_rng_state(tens["rng/torch"])
        if "rng/cuda" in tens and dev.type == "cuda":
            torch.cuda.set_rng_state(tens["rng/cuda"], dev)
        np.random.set_state(_np_state_from_json(meta["numpy_rng"]))
        norm = ChannelNorm(tens["norm/mean"], tens["norm/std"])
        state = {k: meta[k] for k in ("step", "seconds", "loss_acc", "initial_loss", "fingerprint")}
        state["log"] = [tuple(r) for r in tens["log"].tolist()]
        resumed_from = state["step"]
        if progress:
            _say(f"[field] {scene.key}: resuming from step {resumed_from} ({field.num_gaussians} Gaussians)")
    else:
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2 ** 32)
        field = init_field(scene, tg, cfg, init).to(dev)
        opt = _build_optimizer(field, cfg, extent)
        state = {"step": 0, "seconds": 0.0, "loss_acc": [0.0, 0], "log": [], "fingerprint": fp,
                 "initial_loss": None}
        resumed_from = None

    background = cfg.background
    if isinstance(background, str):
        if background != "mean":
            raise ValueError(f"background must be None, 'mean' or a list, not {background!r}")
        background = norm.mean.to(dev)
    elif background is not None:
        background = torch.as_tensor(background, dtype=torch.float32, device=dev)

    if state["initial_loss"] is None and cfg.eval_loss:
        state["initial_loss"] = evaluate_loss(field, views, norm, cfg, background)

    end = cfg.iterations if stop_at is None else min(stop_at, cfg.iterations)
    tty = progress and sys.stderr.isatty()
    bar = None
    if tty:
        from tqdm import tqdm

        bar = tqdm(total=cfg.iterations, initial=state["step"], desc=f"field {scene.key}", dynamic_ncols=True)
    perm_cache: dict = {}
    groups = {g["name"]: g for g in opt.param_groups}
    step = state["step"]
    loss_sum = torch.tensor(float(state["loss_acc"][0]), dtype=torch.float64, device=dev)  # no per-step sync
    while step < end:
        t0 = time.perf_counter()
        groups["means"]["lr"] = _means_lr(cfg, extent, step)
        field.active_sh_degree = min(cfg.sh_degree, step // max(cfg.sh_degree_interval, 1))
        vm, K, tgt = views[_view_at(cfg.seed, step, len(views), perm_cache)]
        h, w = tgt.shape[1:]
        out = field.render(vm, K, w, h, background, cfg.backend)
        if strategy is not None:
            strategy.step_pre_backward(out)
        loss = field_loss(out.image.permute(2, 0, 1), tgt, norm, cfg.lambda_dssim, data_range)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if strategy is not None:
            strategy.step_post_backward(field, opt, step, out, w, h)
            groups = {g["name"]: g for g in opt.param_groups}
        step += 1
        state["step"] = step
        state["seconds"] += time.perf_counter() - t0
        loss_sum += loss.detach()
        state["loss_acc"][1] += 1
        if step % max(cfg.log_every, 1) == 0 or step == cfg.iterations:
            mean_loss = loss_sum.item() / max(state["loss_acc"][1], 1)
            loss_sum.zero_()
            state["log"].append((step, mean_loss, field.num_gaussians, state["seconds"]))
            state["loss_acc"] = [0.0, 0]
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.4f}", n=field.num_gaussians)
            elif progress:
                _say(f"[field] {scene.key} step {step}/{cfg.iterations} loss {mean_loss:.4f} "
                     f"N {field.num_gaussians} {state['seconds']:.1f}s")
        if bar is not None:
            bar.update(1)
        if cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0 and step < cfg.iterations:
            state["loss_acc"][0] = loss_sum.item()
            _save_checkpoint(out_dir, field, opt, strategy, norm, state)
            _write_log(out_dir, state["log"])
    if bar is not None:
        bar.close()

    completed = step >= cfg.iterations
    final_loss = None
    if completed:
        if cfg.eval_loss:
            final_loss = evaluate_loss(field, views, norm, cfg, background)
        summary = {"config": asdict(cfg), "n_gaussians": field.num_gaussians,
                   "num_gaussians": field.num_gaussians, "channels": C,
                   "background_value": None if background is None else background.detach().cpu().tolist(),
                   "sh_degree": field.sh_degree, "rgb_offset": field.rgb_offset,
                   "channel_norm": norm.to_dict(), "seconds": state["seconds"], "steps": step,
                   "initial_loss": state["initial_loss"], "final_loss": final_loss,
                   "last_logged_loss": state["log"][-1][1] if state["log"] else None,
                   "train_views": train_ids, "scene": scene.key, "resumed_from": resumed_from}
        save_field(field, out_dir / FIELD_NAME, {k: summary[k] for k in ("channel_norm", "sh_degree", "channels")})
        if cfg.export_ply:
            save_ply(field, out_dir / "point_cloud.ply")
        _write_log(out_dir, state["log"])
        atomic_write_json(out_dir / FIELD_META, summary)
        if not cfg.keep_checkpoint:
            (out_dir / CKPT_NAME).unlink(missing_ok=True)
            (out_dir / CKPT_META).unlink(missing_ok=True)
        elif cfg.checkpoint_every > 0:
            state["loss_acc"][0] = loss_sum.item()
            _save_checkpoint(out_dir, field, opt, strategy, norm, state)
        if progress:
            _say(f"[field] {scene.key}: done, {field.num_gaussians} Gaussians, loss "
                 f"{state['initial_loss']} -> {final_loss}, {state['seconds']:.1f}s")
    return FitResult(field, norm, out_dir, step, completed, state["seconds"], state["initial_loss"],
                     final_loss, resumed_from, list(state["log"]))
