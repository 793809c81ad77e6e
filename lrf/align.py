"""Per-scene alignment (beyond the paper): refine a fitted latent field AND a copy of the decoder
so that decode(render) matches the photos of this scene's TRAINING views.

Stage 2 fits latents, and stage 3 teaches one decoder to read rendered latents of other
scenes; neither ever compares a decoded render with this scene's photos. Here the loss is
photometric, L1 + w_dssim * D-SSIM (+ w_lpips * LPIPS) between decode(render crop) and the
photo crop, with gradients into the Gaussians (features, opacities, scales, rotations, and
means at a small rate) and into a per-scene copy of the decoder. Held-out views are never
read while training; the field's background and the encoder stay as they were.

Each step: one training view, its field rendered at 1/8 (K[:2] / 8), a random latent crop of
`crop // 8` cells and the photo crop under it (latent cell offset * 8 = pixel offset), or the
whole view with `crop: 0`. Checkpoints, exact resumption and progress are those of the
fine-tuning stages. With `validate_every` > 0 a few training views (lrf.scene.model.
validation_views) leave the alignment and choose the step shipped by their decoded PSNR; step 0,
the field and decoder as given, is a candidate, so a scene whose few views overfit keeps the
best step instead of the last.

    python -m lrf.align --scene results/D/S/prepared/scene.json \
        --field results/D/S/fields/vanilla/field.safetensors --vae '{"kind":"taef2","source":"{weights}/taef2"}' \
        --weights-dir ../shared/weights --out results/D/S/align/vanilla-ps
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from lrf.checkpoint import save_module, tensors_sha256
from lrf.device import resolve_device
from lrf.errors import InputError
from lrf.field.io import field_background, load_field, render_at, save_field
from lrf.io import atomic_write_json
from lrf.metrics import load_lpips, psnr_l1
from lrf.scene.model import Scene, validation_views
from lrf.settings import DOWNSCALE, AlignConfig
from lrf.train.loop import RNG, TrainLoop, fingerprint
from lrf.vae.grid import image_tensor, latent_crop, trim8

CURVE_COLUMNS = ("step", "loss", "l1", "dssim", "lpips", "seconds")


def _field_lrs(cfg: AlignConfig, extent: float) -> dict[str, float]:
    return {"means": cfg.means_lr * extent, "scales": cfg.scales_lr, "quats": cfg.quats_lr,
            "opacities": cfg.opacities_lr, "features_dc": cfg.features_lr, "features_rest": cfg.features_lr / 20}


def render_latent(field, cam, background, backend: str) -> torch.Tensor:
    """[C, H//8, W//8] render of one view (differentiable)."""
    return render_at(field, cam, DOWNSCALE, background, backend).image.permute(2, 0, 1)


@torch.no_grad()
def train_psnr(vae, field, scene: Scene, background, backend: str, ids) -> float | None:
    """Mean decoded PSNR over training views `ids` (how well the pair fits what it was given)."""
    ps = []
    for i in ids:
        z = render_latent(field, scene.cameras[i], background, backend)
        ps.append(psnr_l1(vae.decode(z[None]).float().cpu(), trim8(image_tensor(scene, i))[None])[0])
    return float(np.mean(ps)) if ps else None


def align_scene(vae, field, scene: Scene, background, cfg: AlignConfig, out_dir: str | Path, lpips=None,
                spec: dict | None = None, field_meta: dict | None = None, stop_at: int | None = None,
                progress: bool = True) -> dict | None:
    """Refine `field` and vae.decoder in place on the training views; write the aligned field,
    decoder, curve and align.json to out_dir. Returns None when stopped early at `stop_at`."""
    from lrf.field.losses import d_ssim
    from lrf.field.train import scene_scale

    if field.channels != vae.latent_channels:
        raise InputError(f"{scene.key}: field has {field.channels} channels, the {vae.kind} decoder "
                         f"expects {vae.latent_channels}")
    val = validation_views(scene, cfg.val_views) if cfg.validate_every else []
    ids = [i for i in scene.train if i not in val]  # held-out views never reach this step
    if not ids:
        raise InputError(f"{scene.key}: no training views to align on"
                         + (" (validate_every needs 2 or more)" if cfg.validate_every else ""))
    cells = cfg.crop // DOWNSCALE or None  # None: whole views
    dev = resolve_device(cfg.device, scene.key, renders=True)
    field.to(dev)
    background = None if background is None else torch.as_tensor(background).to(dev)
    dec = vae.decoder
    vae.requires_grad_(False)
    lrs = _field_lrs(cfg, scene_scale(scene))
    fp = fingerprint(cfg, vae=None if spec is None else {k: spec.get(k) for k in ("kind", "source", "encoder", "decoder")},
                     field0=tensors_sha256(field.tensors().values()), decoder0=tensors_sha256(dec.state_dict().values()),
                     views=[scene.cameras[i].name for i in ids],
                     background=None if background is None else [float(v) for v in background])

    def state() -> dict:
        return {**{f"field/{k}": v.detach().cpu().contiguous() for k, v in field.params.items()},
                **{f"decoder/{k}": v for k, v in dec.state_dict().items()}}

    def load(tens: dict) -> None:
        with torch.no_grad():
            for k in field.params:
                field.params[k].copy_(tens[f"field/{k}"])
        dec.load_state_dict({k[len("decoder/"):]: v for k, v in tens.items() if k.startswith("decoder/")})

    loop = TrainLoop("align", out_dir, fp, cfg, CURVE_COLUMNS, state, load, progress)
    groups = [{"params": [field.params[k]], "lr": lr, "name": k} for k, lr in lrs.items()]
    opt = torch.optim.Adam(groups + ([{"params": list(dec.parameters()), "lr": cfg.lr, "name": "decoder"}]
                                     if cfg.tune_decoder else []), eps=1e-15)
    monitor = ids[:: max(1, len(ids) // 4)][:4]  # a few training views to show the fit improving
    if loop.resume(opt) is None:
        loop.extra = {"before": train_psnr(vae, field, scene, background, cfg.backend, monitor)}
    photos: dict[int, torch.Tensor] = {}

    def step_fn(rng: RNG):
        zs, xs = [], []
        for _ in range(cfg.batch):
            i = ids[int(rng.np.integers(len(ids)))]
            if i not in photos:
                photos[i] = trim8(image_tensor(scene, i)).to(dev)
            z = render_latent(field, scene.cameras[i], background, cfg.backend)
            top, left, ch, cw = (latent_crop(rng.np, z.shape[1], z.shape[2], cells) if cells
                                 else (0, 0, z.shape[1], z.shape[2]))
            zs.append(z[:, top:top + ch, left:left + cw])
            xs.append(photos[i][:, top * DOWNSCALE:(top + ch) * DOWNSCALE, left * DOWNSCALE:(left + cw) * DOWNSCALE])
        z, x = torch.stack(zs), torch.stack(xs)
        y = vae.decode(z, clamp=False)
        l1 = (y - x).abs().mean()
        ds = d_ssim(y, x) if cfg.w_dssim > 0 else l1.new_zeros(())
        lp = lpips(y, x).mean() if (lpips is not None and cfg.w_lpips > 0) else l1.new_zeros(())
        loss = l1 + cfg.w_dssim * ds + cfg.w_lpips * lp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        vals = (float(loss.detach()), float(l1.detach()), float(ds.detach()), float(lp.detach()))
        return vals, {"loss": vals[0], "l1": vals[1]}

    def validate():  # every step is eligible: the score itself is what the alignment is for
        score = train_psnr(vae, field, scene, background, cfg.backend, val)
        return score, True, {"val_psnr": score}

    if not loop.run(step_fn, stop_at, train=[(field, True), (dec, cfg.tune_decoder)],
                    validate=validate if val else None):
        return None

    after = train_psnr(vae, field, scene, background, cfg.backend, monitor)
    report = {"scene": scene.key, "config": asdict(cfg), "steps": loop.step, "seconds": loop.seconds,
              "s_per_step": loop.seconds / max(loop.step, 1), "vae": spec,
              "train_psnr": {"views": [scene.cameras[i].name for i in monitor], "before": loop.extra["before"],
                             "after": after}}
    if val:
        report["validation"] = dict(loop.validation(), views=[scene.cameras[i].name for i in val],
                                    criterion="decoded PSNR of the rendered field at the validation views (dB)")
    meta = dict(field_meta or {})  # field.json of the fitted field: background, channel norm, ...
    meta["aligned"] = {k: report[k] for k in ("steps", "seconds", "train_psnr")}
    if val:
        meta["aligned"]["chosen_step"] = report["validation"]["chosen_step"]
    save_field(field, loop.out_dir / "field.safetensors",
               {k: meta[k] for k in ("channel_norm", "sh_degree", "channels") if k in meta})
    atomic_write_json(loop.out_dir / "field.json", meta)
    save_module(loop.out_dir / "decoder.safetensors", dec, {"align": scene.key, "steps": loop.step, "vae": spec})
    atomic_write_json(loop.out_dir / "align.json", report)
    loop.finish()   # the per-scene alignment keeps no checkpoint
    return report


def main(argv=None) -> int:
    from lrf.cli import run_main, start_step, step_parser

    ap = step_parser(__doc__, vae="required", cfg="AlignConfig", renders=True)
    ap.add_argument("--field", required=True, type=Path, help="the fitted latent field.safetensors")
    args = ap.parse_args(argv)

    def go():
        from lrf.vae.factory import load_vae

        scene = Scene.load(args.scene)
        step = start_step(args, who=scene.key, renders=True)
        cfg = step.config(AlignConfig)
        if not args.field.is_file():
            raise InputError(f"{scene.key}: {args.field}: field file missing")
        field = load_field(args.field, step.device)
        meta_path = args.field.with_suffix(".json")
        field_meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        bg = field_background(args.field, field.channels)
        vae = load_vae(step.spec, args.weights_dir, cfg.device)
        lp = load_lpips(cfg.lpips_net, args.weights_dir, cfg.device) if cfg.w_lpips > 0 else None
        rep = align_scene(vae, field, scene, bg, cfg, args.out, lp, spec=step.spec, field_meta=field_meta)
        tp = rep["train_psnr"]
        return (f"{scene.key}: aligned field + decoder, {rep['steps']} steps, {rep['s_per_step']:.2f} s/step; "
                f"training-view PSNR {tp['before']:.2f} -> {tp['after']:.2f}")

    return run_main(go)


if __name__ == "__main__":
    raise SystemExit(main())
