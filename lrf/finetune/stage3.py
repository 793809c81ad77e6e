"""Stage 3, VAE-RF alignment: fine-tune only the decoder on latents rendered by fitted fields.
The workflow starts it from stage 1's decoder (the pretrained one unless stage1.tune_decoder).

Latents RENDERED by a fitted latent field are blurrier and slightly off-distribution compared
with encoder outputs; the decoder learns to decode them into the photos anyway.

Each alignment scene's field is rendered once at start (no grad) at its views, at 1/8
resolution with K[:2] scaled by 1/8 (exact with
corner-origin pixels) and the background the field was fitted with. Training samples latent
crops aligned with photo crops (latent cell offset * 8 = pixel offset) and minimises
L1 + w_lpips * LPIPS between decode(latent crop, clamp=False) and the photo crop. Training
reads TRAINING views only (the authors also trained on the held-out views of their tuning
scenes; then in-domain numbers are scored on views the decoder has seen). Held-out views are
rendered and decoded only to measure, before and after.

With `validate_every` > 0 a few training views per scene (lrf.scene.model.validation_views) leave
training and choose the decoder that ships (lrf.train.loop): the step, 0 (the pretrained
decoder) included, whose decoded rendered latents score the best PSNR at those views, among the
steps whose clean encode-decode PSNR there is at most `val_max_drop_db` under step 0's. The
fields were fitted on those views too, which is fine: the decoder never saw their photos.

A fraction `clean_fraction` (default 0.5) of the crops uses clean latents, encoder(photo),
instead of rendered ones: the decoder must keep decoding clean latents (the VAE ceiling, and
latents that come from a diffusion model rather than a field); trained on rendered latents
alone it drifts away from them.

    python -m lrf.finetune.stage3 \
        --vae '{"kind":"taef2","source":"{weights}/taef2","encoder":"results/vae/taef2/stage1/encoder.safetensors",
               "decoder":"results/vae/taef2/stage1/decoder.safetensors"}' \
        --weights-dir ../shared/weights \
        --scene S1/prepared/scene.json --field S1/fields/enc/field.safetensors [--scene ... --field ...] \
        [--measure-scene X/prepared/scene.json --measure-field X/fields/enc/field.safetensors ...] \
        --cfg '{"steps": 2000}' --out results/vae/taef2/stage3
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from lrf.checkpoint import save_module, tensors_sha256
from lrf.device import resolve_device
from lrf.errors import InputError
from lrf.field.io import field_background, load_field, render_at
from lrf.io import atomic_write_json
from lrf.metrics import psnr_l1
from lrf.scene.model import Scene, validation_views
from lrf.settings import DOWNSCALE, Stage3Config
from lrf.train.loop import RNG, TrainLoop, fingerprint
from lrf.vae.grid import image_tensor, latent_crop, trim8

CURVE_COLUMNS = ("step", "loss", "l1", "lpips", "clean", "seconds")


# ----------------------------------------------------------------------------- data
@dataclass
class AlignScene:
    """A scene with a latent field fitted on it."""

    scene: Scene
    field: object                 # lrf.field.GaussianField
    background: torch.Tensor | None = None
    field_path: Path | None = None

    @property
    def key(self) -> str:
        return self.scene.key


def load_align_scene(scene_json: str | Path, field_path: str | Path) -> AlignScene:
    if not Path(scene_json).is_file():
        raise InputError(f"{scene_json}: scene file missing")
    scene = Scene.load(scene_json)
    field_path = Path(field_path)
    if not field_path.is_file():
        raise InputError(f"{scene.key}: {field_path}: field file missing")
    try:
        field = load_field(field_path)
    except Exception as e:  # noqa: BLE001 - unreadable field
        raise InputError(f"{scene.key}: {field_path}: cannot load field ({type(e).__name__})") from None
    return AlignScene(scene, field, field_background(field_path, field.channels), field_path)


@torch.no_grad()
def render_latents(a: AlignScene, ids, backend: str = "auto") -> dict[int, torch.Tensor]:
    """Field renders [C, H//8, W//8] at views `ids` (K scaled by 1/8; they cover trim8(photo))."""
    out = {}
    for i in ids:
        cam = a.scene.cameras[i]
        r = render_at(a.field, cam, DOWNSCALE, a.background, backend)
        out[i] = r.image.detach().permute(2, 0, 1).float().cpu().contiguous()
    return out


class ViewData:
    """Per scene: rendered latents (all views, or the test views only, once), photos and clean
    latents (lazily, cached)."""

    def __init__(self, scenes: list[AlignScene], vae, backend: str, test_only: bool = False):
        self.scenes, self.vae = scenes, vae
        self.rendered = [render_latents(a, a.scene.test if test_only else range(len(a.scene.cameras)), backend)
                         for a in scenes]
        self.photos: dict[tuple[int, int], torch.Tensor] = {}
        self.clean: dict[tuple[int, int], torch.Tensor] = {}

    def photo(self, s: int, i: int) -> torch.Tensor:
        if (s, i) not in self.photos:
            self.photos[(s, i)] = trim8(image_tensor(self.scenes[s].scene, i))
        return self.photos[(s, i)]

    @torch.no_grad()
    def clean_latent(self, s: int, i: int) -> torch.Tensor:
        if (s, i) not in self.clean:
            self.clean[(s, i)] = self.vae.encode(self.photo(s, i)[None].to(self.vae.device))[0].float().cpu()
        return self.clean[(s, i)]

    def digest(self) -> list:
        return [[a.key, tensors_sha256([r[i] for i in sorted(r)])] for a, r in zip(self.scenes, self.rendered)]


@torch.no_grad()
def decode_quality(vae, data: ViewData, s: int, ids, clean: bool = False) -> dict:
    """Mean PSNR / L1 of decode(rendered or clean latent) against the photo over views `ids`."""
    ps, l1 = [], []
    for i in ids:
        z = data.clean_latent(s, i) if clean else data.rendered[s][i]
        p, l = psnr_l1(vae.decode(z[None].to(vae.device)).float().cpu(), data.photo(s, i)[None])
        ps.append(p)
        l1.append(l)
    return {"psnr": float(np.mean(ps)) if ps else None, "l1": float(np.mean(l1)) if l1 else None, "views": len(ps)}


def measure(vae, data: ViewData, s: int, heldout_only: bool = False) -> dict:
    sc = data.scenes[s].scene
    out = {"rendered_test": decode_quality(vae, data, s, sc.test),
           "clean_test": decode_quality(vae, data, s, sc.test, clean=True)}
    if not heldout_only:
        out["rendered_train"] = decode_quality(vae, data, s, sc.train)
    return out


def validation_metrics(vae, data: ViewData, val: list[list[int]]) -> dict:
    """View-pooled PSNR at the validation views: rendered latents (the score) and clean ones (the guard)."""
    out = {}
    for name, clean in (("rendered_psnr", False), ("clean_psnr", True)):
        q = [decode_quality(vae, data, s, v, clean) for s, v in enumerate(val) if v]
        out[name] = sum(r["psnr"] * r["views"] for r in q) / sum(r["views"] for r in q)
    return out


def criterion(m: dict, ref: dict, cfg: Stage3Config) -> tuple[float, bool]:
    """(score, eligible): rendered PSNR, if clean PSNR is at most val_max_drop_db under the pretrained decoder's."""
    return m["rendered_psnr"], m["clean_psnr"] >= ref["clean_psnr"] - cfg.val_max_drop_db


def combine(before: dict, after: dict) -> dict:
    return {k: {"before": before[k], "after": after[k]} for k in before}


def overall(per_scene: dict[str, dict]) -> dict:
    """View-pooled PSNR / L1 over scenes, per measured quantity."""
    keys = sorted({k for r in per_scene.values() for k in r})
    out = {}
    for k in keys:
        out[k] = {}
        for when in ("before", "after"):
            rows = [r[k][when] for r in per_scene.values() if k in r and r[k][when]["views"]]
            v = sum(r["views"] for r in rows)
            out[k][when] = None if v == 0 else {"psnr": sum(r["psnr"] * r["views"] for r in rows) / v,
                                                "l1": sum(r["l1"] * r["views"] for r in rows) / v, "views": v}
    return out


# ----------------------------------------------------------------------------- training
def _check_scenes(vae, align: list[AlignScene], measure_scenes, cfg: Stage3Config) -> None:
    """One-line errors: a field whose channels the decoder cannot take, a photo smaller than a crop."""
    cells = cfg.crop // DOWNSCALE
    for a in list(align) + list(measure_scenes):
        if a.field.channels != vae.latent_channels:
            raise InputError(f"{a.key}: {a.field_path}: field has {a.field.channels} channels, "
                             f"the {vae.kind} decoder expects {vae.latent_channels}")
    for a in align:
        for c in a.scene.cameras:
            if c.width // DOWNSCALE < cells or c.height // DOWNSCALE < cells:
                raise InputError(f"{a.key}: {c.name}: image {c.width}x{c.height} is smaller than the {cfg.crop}px crop")


def train_stage3(vae, lpips, align: list[AlignScene], cfg: Stage3Config, out_dir: str | Path,
                 measure_scenes: list[AlignScene] = (), spec: dict | None = None,
                 stop_at: int | None = None, progress: bool = True) -> dict | None:
    """Fine-tune vae.decoder in place; write decoder.safetensors, curve.csv, alignment.json.

    Same resume / stop_at contract as lrf.finetune.stage1.train_stage1.
    """
    dev = resolve_device(cfg.device, "stage 3")
    dec = vae.decoder
    vae.requires_grad_(False)
    cells = cfg.crop // DOWNSCALE
    _check_scenes(vae, align, measure_scenes, cfg)
    for a in list(align) + list(measure_scenes):
        a.field.to(dev)
    data = ViewData(list(align), vae, cfg.backend)
    mdata = ViewData(list(measure_scenes), vae, cfg.backend, test_only=True)
    val = [validation_views(a.scene, cfg.val_views) if cfg.validate_every else [] for a in align]
    # held-out photos never reach training; validation views only choose the step
    ids = [[i for i in a.scene.train if i not in v] for a, v in zip(align, val)]
    if not any(ids):
        raise InputError("stage 3: no views to train on")
    if cfg.validate_every and not any(val):
        raise InputError("stage 3: validate_every needs a tuning scene with 2 or more training views")
    names = lambda a, v: [a.scene.cameras[i].name for i in v]  # noqa: E731
    fp = fingerprint(cfg, vae=vae.kind if spec is None else {k: spec.get(k) for k in ("kind", "source", "encoder", "decoder")},
                     decoder0=tensors_sha256(dec.state_dict().values()),
                     encoder=tensors_sha256(vae.encoder.state_dict().values()),
                     renders=data.digest(), views=[names(a, v) for a, v in zip(align, ids)],
                     val=[names(a, v) for a, v in zip(align, val)])

    def load(tens: dict) -> None:
        dec.load_state_dict({k[len("decoder/"):]: v for k, v in tens.items() if k.startswith("decoder/")})

    loop = TrainLoop("stage3", out_dir, fp, cfg, CURVE_COLUMNS,
                     lambda: {f"decoder/{k}": v for k, v in dec.state_dict().items()}, load, progress)
    opt = torch.optim.Adam(dec.parameters(), lr=cfg.lr)
    if loop.resume(opt) is None:
        loop.extra = {"before": {a.key: measure(vae, data, s) for s, a in enumerate(align)},
                      "measure_before": {a.key: measure(vae, mdata, s, heldout_only=True)
                                         for s, a in enumerate(measure_scenes)}}
    usable = [s for s, v in enumerate(ids) if v]

    def step_fn(rng: RNG):
        zs, xs, n_clean = [], [], 0
        for _ in range(cfg.batch):
            s = usable[int(rng.np.integers(len(usable)))]
            i = ids[s][int(rng.np.integers(len(ids[s])))]
            clean = bool(rng.np.random() < cfg.clean_fraction)
            z = data.clean_latent(s, i) if clean else data.rendered[s][i]
            top, left, ch, cw = latent_crop(rng.np, z.shape[1], z.shape[2], cells)
            zs.append(z[:, top:top + ch, left:left + cw])
            xs.append(data.photo(s, i)[:, top * DOWNSCALE:(top + ch) * DOWNSCALE,
                                       left * DOWNSCALE:(left + cw) * DOWNSCALE])
            n_clean += clean
        z, x = torch.stack(zs).to(dev), torch.stack(xs).to(dev)
        y = vae.decode(z, clamp=False)
        l1 = (y - x).abs().mean()
        lp = lpips(y, x).mean() if (lpips is not None and cfg.w_lpips > 0) else l1.new_zeros(())
        loss = l1 + cfg.w_lpips * lp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        vals = (float(loss.detach()), float(l1.detach()), float(lp.detach()))
        return (*vals, n_clean / cfg.batch), {"loss": vals[0], "l1": vals[1], "lpips": vals[2]}

    def validate():
        m = validation_metrics(vae, data, val)
        ref = loop.extra.setdefault("val_reference", m)  # the first call: step 0, the pretrained decoder
        return (*criterion(m, ref, cfg), m)

    if not loop.run(step_fn, stop_at, train=[(dec, True)], validate=validate):
        return None

    before, mbefore = loop.extra["before"], loop.extra["measure_before"]
    per_scene = {a.key: combine(before[a.key], measure(vae, data, s)) for s, a in enumerate(align)}
    mper = {a.key: combine(mbefore[a.key], measure(vae, mdata, s, heldout_only=True))
            for s, a in enumerate(measure_scenes)}
    report = {"stage": 3, "vae": spec, "config": asdict(cfg), "steps": loop.step, "seconds": loop.seconds,
              "s_per_step": loop.seconds / max(loop.step, 1),
              "fields": {a.key: None if a.field_path is None else str(a.field_path) for a in align},
              "scenes": per_scene, "overall": overall(per_scene),
              "measure": mper, "measure_overall": overall(mper) if mper else None,
              "validation": selection_report(loop, align, val)}
    save_module(loop.out_dir / "decoder.safetensors", dec, {"stage": 3, "steps": loop.step, "vae": spec,
                                                            "chosen_step": loop.best_step})
    atomic_write_json(loop.out_dir / "alignment.json", report)
    loop.finish(cfg.keep_checkpoint)
    return report


def selection_report(loop: TrainLoop, align: list[AlignScene], val: list[list[int]]) -> dict | None:
    """alignment.json's "validation": the views, the criterion, the chosen step and the curve."""
    sel = loop.validation()
    if sel is None:
        return None
    return {"views": {a.key: [a.scene.cameras[i].name for i in v] for a, v in zip(align, val)},
            "criterion": "rendered_psnr (decoded rendered latents at the validation views, dB, higher is better)",
            "guard": f"clean_psnr >= step 0's - {loop.cfg.val_max_drop_db} dB (clean encode-decode)",
            "score_metric": "rendered_psnr", "guard_metric": "clean_psnr", "max_drop_db": loop.cfg.val_max_drop_db,
            **sel}


def measure_only(vae_before, vae_after, scenes: list[AlignScene], backend: str = "auto") -> dict:
    data = ViewData(scenes, vae_after, backend, test_only=True)  # the encoder is the same in both
    per = {a.key: combine(measure(vae_before, data, s, True), measure(vae_after, data, s, True))
           for s, a in enumerate(scenes)}
    return {"stage": 3, "measure_only": True, "measure": per, "measure_overall": overall(per)}


def summary_line(report: dict) -> str:
    def fmt(o):
        return "n/a" if o is None or o.get("psnr") is None else f"{o['psnr']:.2f}"

    parts = []
    for name, ov in (("alignment", report.get("overall")), ("measure", report.get("measure_overall"))):
        if not ov:
            continue
        bits = [f"{k} PSNR {fmt(ov[k]['before'])} -> {fmt(ov[k]['after'])}" for k in
                ("rendered_train", "rendered_test", "clean_test") if k in ov]
        parts.append(f"{name}: " + ", ".join(bits))
    head = (f"stage 3: {report['steps']} steps, {report['s_per_step']:.2f} s/step; " if "steps" in report
            else "stage 3 (measure only): ")
    return head + "; ".join(parts)


# ----------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    from lrf.cli import run_main, start_step
    from lrf.finetune.common import paired_scenes, pretrained_and_tuned, stage_parser
    from lrf.metrics import load_lpips
    from lrf.vae.factory import load_vae

    args = stage_parser(__doc__, "field", "its latent field.safetensors", "Stage3Config", renders=True).parse_args(argv)

    def go():
        step = start_step(args, who="stage 3", renders=True)
        cfg = step.config(Stage3Config)
        measured = paired_scenes(args.measure_scene, args.measure_field, "--measure-scene/--measure-field",
                                 load_align_scene)
        if args.measure_only:
            if not measured:
                raise InputError("--measure-only: give --measure-scene/--measure-field")
            before, after, spec = pretrained_and_tuned(step.spec, ("decoder",), args.out, args.weights_dir, cfg.device)
            report = dict(measure_only(before, after, measured, cfg.backend), vae=spec)
            atomic_write_json(args.out / "alignment.json", report)
            return summary_line(report)
        scenes = paired_scenes(args.scene, args.field, "--scene/--field", load_align_scene)
        if not scenes:
            raise InputError("stage 3: give at least one --scene SCENE_JSON --field FIELD")
        vae = load_vae(step.spec, args.weights_dir, cfg.device)
        lpips = load_lpips(cfg.lpips_net, args.weights_dir, cfg.device) if cfg.w_lpips > 0 else None
        return summary_line(train_stage3(vae, lpips, scenes, cfg, args.out, measured, spec=step.spec))

    return run_main(go)


if __name__ == "__main__":
    raise SystemExit(main())
