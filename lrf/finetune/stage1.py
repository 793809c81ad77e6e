"""Stage 1, correspondence-aware autoencoding: fine-tune the encoder (and, with `tune_decoder`,
the decoder) on SfM correspondences and sub-cell shifts.

The latents of one 3D point should agree across views, and latents averaged or resampled the way a
3D field averages views (docs/experiments.md E9, issue 18) should still decode, while
decode(encode(x)) stays x.

Loss per step, over B crop pairs (2B crops):
  recon = L1(decode(encode(x)), x) + w_lpips * LPIPS   (the decoder is frozen, so the latents
          must stay in the space it decodes)
  corr  = L1 between the two latents of each SfM correspondence that falls inside both crops,
          sampled bilinearly at pixel/8 (see common.sample_latents), weighted by the pair weight
  reg   = KL to N(0, I) for KL autoencoders, else a latent-statistics penalty keeping the
          per-channel mean/std of the batch near the pretrained encoder's over the tuning images
  anchor = L1 between the latents and the frozen pretrained encoder's latents of the same crops
          (w_anchor > 0): the frozen decoder was trained on those latents, so staying near them
          keeps decode quality on images the tuning never saw; batch statistics alone let the
          latents drift in ways the decoder cannot follow (fern recon PSNR 27.4 -> 24.9 dB)
  equiv = (w_equiv > 0) encoder warp equivariance, L1(E(warp x), warp E(x)) / mean |warp E(x)|
  shift_avg = (w_shift_avg > 0) L1(D(z_avg), x) on one crop per pair, z_avg the mean of the
          encodings of the crop's window moved by {0, s} x {0, t} px (true pixels beyond the crop),
          each moved back by the shift/8 cells (lrf.vae.shift): the shift-averaged ceiling as a loss
  dec_equiv = (w_dec_equiv > 0) decoder warp equivariance, L1(D(warp E(x)), warp x) where both
          warps have a valid source (EQ-VAE's direction: sub-cell shifts, small scales and rotations)
  out_anchor = (w_out_anchor > 0) L1(D(E(x)), D0(E0(x))), an anchor on the decoded image
  loss  = recon + lambda_corr * corr + (w_kl * KL or w_stats * stats) + w_anchor * anchor
          + w_equiv * equiv + w_shift_avg * shift_avg + w_dec_equiv * dec_equiv + w_out_anchor * out_anchor

Sampling: a tuning scene uniformly (so a scene with many matches does not drown the others),
then a "train" pair of it with probability proportional to its match count (`pair_sampling`
"matches", the default: together with the pair weight in the loss, the expected loss is the
pair-weighted mean over all matches; "weight_matches" would apply the weight twice, "uniform"
over-samples pairs with few matches), then one of its matches uniformly; the two crops are placed
independently around the two pixels at random integer offsets, so sub-cell (non multiple-of-8)
shifts between the crops, exactly the inconsistency to remove, occur all the time.

A tuning scene without correspondences in its "train" pairs (an empty matches table, e.g. one
filtered to nothing) is left out of training with a WARNING line naming the scene and its
matches.parquet, as long as another tuning scene has some; if none has, the run stops with one
line, `ERROR <dataset>/<scene>: <.../matches.parquet>: <reason>` (lrf.correspondences itself
refuses to write empty tables, so this only meets tables made elsewhere).

With `validate_every` > 0 a few training views per scene (lrf.scene.model.validation_views) choose
the autoencoder that ships (lrf.train.loop): pairs that involve one leave training; `criterion`,
the one place that says what "best" is, scores each validated step, 0 (the pretrained weights)
included, by the shift-averaged ceiling at the validation views (lrf.vae.shift: what a field
averaging views at sub-cell offsets can decode), among the steps whose plain ceiling
decode(encode(x)) there is at most `val_max_drop_db` under step 0's. The validation views' pairs'
matched/random latent L1 ratio is recorded beside it.

consistency.json, the direct measure of 3D consistency: full images encoded once, mean latent
L1 over the correspondences of "heldout" pairs (at least one test view) and of "train" pairs,
before (pretrained encoder) and after; plus decode(encode(x)) PSNR on the test views and their
shift-averaged ceiling ("shift", lrf.vae.shift; `shift_measure` picks the scenes), and with
validation its history and the selected step. Outputs: encoder.safetensors and
decoder.safetensors (the starting decoder when it is not tuned), curve.csv, consistency.json.

    python -m lrf.finetune.stage1 --vae '{"kind":"taef2","source":"{weights}/taef2"}' \
        --weights-dir ../shared/weights \
        --scene results/llff/fern/prepared/scene.json --corr results/llff/fern/correspondences \
        [--scene S2/scene.json --corr S2/correspondences ...] \
        [--measure-scene X/scene.json --measure-corr X/correspondences ...] \
        --cfg '{"steps": 2000}' --out results/vae/taef2/stage1
    python -m lrf.finetune.stage1 --measure-only --vae '{..., "encoder": "results/vae/taef2/stage1/encoder.safetensors",
        "decoder": "results/vae/taef2/stage1/decoder.safetensors"}' --weights-dir ../shared/weights --measure-scene X/scene.json --measure-corr X/correspondences --out OUT
"""
from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lrf.checkpoint import save_module, tensors_sha256
from lrf.device import resolve_device
from lrf.errors import InputError
from lrf.io import atomic_write_json
from lrf.metrics import psnr_l1
from lrf.scene.model import Scene
from lrf.settings import DOWNSCALE, Stage1Config
from lrf.train.loop import RNG, TrainLoop, fingerprint as loop_fingerprint
from lrf.vae.grid import image_tensor, sample_latents, trim8

CURVE_COLUMNS = ("step", "loss", "recon_l1", "lpips", "corr", "stats", "anchor", "equiv", "shift_avg", "dec_equiv",
                 "out_anchor", "seconds")
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- data
@dataclass
class CorrScene:
    """A scene with its SfM correspondences (lrf.correspondences tables)."""

    scene: Scene
    matches: pd.DataFrame
    pairs: pd.DataFrame
    source: Path | None = None    # the matches table's file, named in messages

    @property
    def key(self) -> str:
        return self.scene.key

    def digest(self) -> str:
        """Content hash of cameras + tables: a checkpoint must come from the same data."""
        h = pd.util.hash_pandas_object(self.matches, index=False).to_numpy()
        p = pd.util.hash_pandas_object(self.pairs[["image_i", "image_j", "weight", "split"]], index=False).to_numpy()
        names = np.frombuffer("|".join(c.name + c.split for c in self.scene.cameras).encode(), np.uint8)
        return tensors_sha256([torch.from_numpy(h.view(np.int64).copy()), torch.from_numpy(p.view(np.int64).copy()),
                               torch.from_numpy(names.copy())])


MATCH_COLS = ("image_i", "image_j", "x_i", "y_i", "x_j", "y_j")
PAIR_COLS = ("image_i", "image_j", "matches", "weight", "split")


def check_tables(scene: Scene, matches: pd.DataFrame, pairs: pd.DataFrame, where: str) -> None:
    for name, df, cols in (("matches", matches, MATCH_COLS), ("pairs", pairs, PAIR_COLS)):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise InputError(f"{scene.key}: {where}: {name} table lacks column(s) {', '.join(missing)}")
    n = len(scene.cameras)
    if len(matches) and (int(matches[["image_i", "image_j"]].to_numpy().max()) >= n
                         or int(matches[["image_i", "image_j"]].to_numpy().min()) < 0):
        raise InputError(f"{scene.key}: {where}: matches name images outside the scene's {n} cameras "
                         "(correspondences from another scene?)")


def load_corr_scene(scene_json: str | Path, corr_dir: str | Path) -> CorrScene:
    from lrf.correspondences import load

    if not Path(scene_json).is_file():
        raise InputError(f"{scene_json}: scene file missing")
    scene = Scene.load(scene_json)
    corr_dir = Path(corr_dir)
    for f in ("matches.parquet", "pairs.parquet"):
        if not (corr_dir / f).is_file():
            raise InputError(f"{scene.key}: {corr_dir / f}: missing (run lrf.correspondences first)")
    try:
        matches, pairs = load(corr_dir)
    except Exception as e:  # noqa: BLE001 - unreadable parquet
        raise InputError(f"{scene.key}: {corr_dir}: cannot read correspondences ({type(e).__name__})") from None
    check_tables(scene, matches, pairs, str(corr_dir))
    return CorrScene(scene, matches, pairs, (corr_dir / "matches.parquet").resolve())


def pair_groups(cs: CorrScene, split: str):
    """(i, j, xy_i [M,2], xy_j [M,2], weight) per pair of `split`, in a fixed order."""
    p = cs.pairs.loc[cs.pairs["split"] == split, ["image_i", "image_j", "weight"]]
    m = cs.matches.merge(p, on=["image_i", "image_j"], how="inner")
    m = m.sort_values(["image_i", "image_j"], kind="stable")
    for (i, j), g in m.groupby(["image_i", "image_j"], sort=True):
        yield (int(i), int(j), g[["x_i", "y_i"]].to_numpy(np.float64), g[["x_j", "y_j"]].to_numpy(np.float64),
               float(g["weight"].iloc[0]))


def crop_origin(rng: np.random.Generator, x: float, size: int, length: int, margin: float) -> int:
    """Random integer origin o of a crop [o, o+size) inside [0, length) such that the continuous
    coordinate x lies in [o + margin, o + size - margin). Any integer, not only multiples of 8:
    sub-cell offsets between the two crops of a pair are the inconsistency stage 1 removes."""
    hi = min(length - size, math.floor(x - margin))
    lo = max(0, math.floor(x + margin - size) + 1)
    if lo > hi:  # the point is too near a border for the margin: best effort, centred on it
        return int(np.clip(round(x - size / 2), 0, max(length - size, 0)))
    return int(rng.integers(lo, hi + 1))


def inside(xy: np.ndarray, left: int, top: int, size: int, margin: float) -> np.ndarray:
    """Which pixels [M, 2] lie in the crop at (left, top), at least `margin` px from its edges."""
    x, y = xy[:, 0] - left, xy[:, 1] - top
    return (x >= margin) & (x < size - margin) & (y >= margin) & (y < size - margin)


@dataclass
class CropPair:
    scene: int
    i: int
    j: int
    origin_i: tuple[int, int]     # (left, top)
    origin_j: tuple[int, int]
    xy_i: np.ndarray              # [M, 2] in crop coordinates
    xy_j: np.ndarray
    weight: float


class PairSampler:
    """Random crop pairs around SfM correspondences of "train" pairs (see module docstring)."""

    def __init__(self, scenes: list[CorrScene], cfg: Stage1Config):
        self.cfg, self.scenes, self.entries = cfg, scenes, []
        unused = []
        for s, cs in enumerate(scenes):
            groups = [g for g in pair_groups(cs, "train") if len(g[2])]
            if not groups:
                why = "no correspondences (empty table)" if len(cs.matches) == 0 else "no correspondences in train pairs"
                unused.append(f"{cs.key}: {cs.source or 'correspondences'}: {why}")
                continue
            for i, j, *_ in groups:
                for k in (i, j):
                    c = cs.scene.cameras[k]
                    if c.width < cfg.crop or c.height < cfg.crop:
                        raise InputError(f"{cs.key}: {c.name}: image {c.width}x{c.height} is smaller than "
                                         f"the {cfg.crop}px crop")
            n = np.array([len(g[2]) for g in groups], np.float64)
            w = np.array([g[4] for g in groups], np.float64)
            p = {"matches": n, "weight_matches": n * w, "uniform": np.ones_like(n)}[cfg.pair_sampling]
            self.entries.append((s, groups, p / p.sum()))
        if not self.entries:
            others = f" (nor have the other {len(unused) - 1} tuning scenes)" if len(unused) > 1 else ""
            raise InputError(unused[0] + others)
        for msg in unused:
            log.warning("%s; tuning on the other scenes without it", msg)

    def sample(self, rng: np.random.Generator) -> CropPair:
        S, mg = self.cfg.crop, self.cfg.corr_margin
        s, groups, p = self.entries[int(rng.integers(len(self.entries)))]
        i, j, xy_i, xy_j, w = groups[int(rng.choice(len(groups), p=p))]
        k = int(rng.integers(len(xy_i)))
        ci, cj = self.scenes[s].scene.cameras[i], self.scenes[s].scene.cameras[j]
        oi = (crop_origin(rng, xy_i[k, 0], S, ci.width, mg), crop_origin(rng, xy_i[k, 1], S, ci.height, mg))
        oj = (crop_origin(rng, xy_j[k, 0], S, cj.width, mg), crop_origin(rng, xy_j[k, 1], S, cj.height, mg))
        keep = inside(xy_i, *oi, S, mg) & inside(xy_j, *oj, S, mg)
        return CropPair(s, i, j, oi, oj, xy_i[keep] - np.array(oi, np.float64), xy_j[keep] - np.array(oj, np.float64), w)


class ImageCache:
    """Views as [3,H,W] tensors, read once (crops are cut from memory every step)."""

    def __init__(self, scenes: list[CorrScene]):
        self.scenes, self.cache = scenes, {}

    def get(self, s: int, i: int) -> torch.Tensor:
        if (s, i) not in self.cache:
            self.cache[(s, i)] = image_tensor(self.scenes[s].scene, i)
        return self.cache[(s, i)]

    def crop(self, s: int, i: int, origin: tuple[int, int], size: int) -> torch.Tensor:
        left, top = origin
        return self.get(s, i)[:, top:top + size, left:left + size]

    def shifted_crop(self, s: int, i: int, origin: tuple[int, int], size: int, dx: int, dy: int) -> torch.Tensor:
        """The crop at origin + (dx, dy), dx, dy >= 0 (its content moves left/up), the image's
        bottom/right edge replicated where that leaves the image: lrf.vae.shift.shift_image of the
        crop, with the true pixels beyond the crop wherever the image has them."""
        left, top = origin[0] + dx, origin[1] + dy
        img = self.get(s, i)
        h, w = img.shape[-2:]
        c = img[:, top:top + size, left:left + size]
        if c.shape[-2] < size or c.shape[-1] < size:
            c = torch.nn.functional.pad(c[None], (0, size - c.shape[-1], 0, size - c.shape[-2]), mode="replicate")[0]
        return c


# ----------------------------------------------------------------------------- losses
def correspondence_loss(z_a: torch.Tensor, z_b: torch.Tensor, xy_a: list, xy_b: list,
                        weights: list[float], kind: str = "l1") -> tuple[torch.Tensor, int]:
    """Pair-weighted mean over matches of the channel-mean L1 between latents z_a[b] at xy_a[b]
    and z_b[b] at xy_b[b] (pixel coords in each crop). Returns (loss, number of matches).

    kind "ratio" divides by the same weighted mean at NON-matching pixels (each match's b-side
    latent swapped for the next match's, as the consistency measure does): the loss no longer
    falls when all latents shrink, only when matches agree more than non-matches do."""
    num, rnd, den, n = z_a.sum() * 0.0, z_a.sum() * 0.0, 0.0, 0
    for b in range(z_a.shape[0]):
        if len(xy_a[b]) == 0:
            continue
        a = sample_latents(z_a[b], torch.as_tensor(xy_a[b]))
        c = sample_latents(z_b[b], torch.as_tensor(xy_b[b]))
        num = num + weights[b] * (a - c).abs().mean(1).sum()
        if kind == "ratio" and len(a) > 1:
            rnd = rnd + weights[b] * (a - c.roll(1, 0)).abs().mean(1).sum()
        den += weights[b] * len(xy_a[b])
        n += len(xy_a[b])
    if den == 0:
        return num, n
    if kind == "ratio":
        return num / rnd.clamp_min(1e-6) if float(rnd.detach()) > 0 else num / den, n
    return num / den, n


def stats_penalty(z: torch.Tensor, mean0: torch.Tensor, std0: torch.Tensor) -> torch.Tensor:
    """Per-channel mean/std of the batch vs the pretrained encoder's: ((mu-mu0)/sd0)^2 +
    log(sd/sd0)^2, averaged over channels. Scale-free, so every channel counts the same; it
    blocks the trivial way to agree at correspondences (shrinking or shifting all latents)."""
    mu = z.mean(dim=(0, 2, 3))
    sd = z.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return (((mu - mean0) / std0) ** 2 + torch.log(sd / std0) ** 2).mean()


def kl_term(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return 0.5 * (mean ** 2 + logvar.exp() - 1.0 - logvar).mean()


def random_warps(rng: np.random.Generator, n: int, cfg: Stage1Config) -> torch.Tensor:
    """[n, 2, 3] affine_grid matrices (normalised coordinates): rotation, isotropic scale and a
    shift of up to `equiv_shift` pixels of a `crop`-pixel crop. In normalised coordinates the same
    matrix warps a crop and its latent grid alike (align_corners=False: both span the same area)."""
    ang = np.deg2rad(rng.uniform(-cfg.equiv_rotate_deg, cfg.equiv_rotate_deg, n))
    sc = 1.0 + rng.uniform(-cfg.equiv_scale, cfg.equiv_scale, n)
    sh = rng.uniform(-cfg.equiv_shift, cfg.equiv_shift, (n, 2)) * 2.0 / cfg.crop
    th = np.zeros((n, 2, 3))
    th[:, 0, 0], th[:, 0, 1] = sc * np.cos(ang), -sc * np.sin(ang)
    th[:, 1, 0], th[:, 1, 1] = sc * np.sin(ang), sc * np.cos(ang)
    th[:, :, 2] = sh
    return torch.as_tensor(th, dtype=torch.float32)


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def equivariance_loss(vae, x: torch.Tensor, z: torch.Tensor, theta: torch.Tensor, border: int = 2) -> torch.Tensor:
    """Mean L1 between E(warp(x)) and warp(E(x)) away from the crop's border (zero padding
    there), relative to the mean |latent| of the target so that shrinking does not pay."""
    zw = vae.encode_distribution(warp(x, theta))[0]
    target = warp(z, theta)
    b = border
    d = (zw - target)[..., b:-b, b:-b]
    return d.abs().mean() / target[..., b:-b, b:-b].detach().abs().mean().clamp_min(1e-6)


def shift_phase(rng: np.random.Generator, cfg: Stage1Config) -> list[tuple[int, int]]:
    """The 2x2 grid of window shifts {0, s} x {0, t} px of one step (dy-major, (0, 0) first): s and t
    drawn from 1..7 (cfg.shift_avg_step 0) or both cfg.shift_avg_step."""
    if cfg.shift_avg_step:
        s = t = cfg.shift_avg_step
    else:
        s, t = (int(v) for v in rng.integers(1, DOWNSCALE, 2))
    return [(0, 0), (s, 0), (0, t), (s, t)]


def shift_avg_loss(vae, x: torch.Tensor, z: torch.Tensor, shifted: torch.Tensor, shifts: list[tuple[int, int]],
                   border: int = DOWNSCALE, lpips=None, w_lpips: float = 0.0) -> torch.Tensor:
    """L1(D(z_avg), x) away from the edges: x [N,3,S,S] crops and z = E(x) their latents; shifted
    [K-1,N,3,S,S] the same crops with their window moved by shifts[1:] (shifts[0] is (0, 0), whose
    encoding is z; ImageCache.shifted_crop); z_avg the mean of the K encodings, each moved back by
    shift/8 cells (lrf.vae.shift.average_shifted). The averaged latent is what a field holding
    views at several sub-cell offsets draws; the decoder must give the photo back from it.
    Skipped: 2 * `border` px at the top/left (moving a shifted window's latents back runs off their
    grid there) and `border` px at the bottom/right. With `lpips`, + w_lpips * LPIPS on the same region."""
    from lrf.vae.shift import average_shifted

    K, N = shifted.shape[:2]
    zs = vae.encode_distribution(shifted.flatten(0, 1))[0].unflatten(0, (K, N)).unbind(0)
    y = vae.decode(average_shifted((z, *zs), shifts, vae.downscale), clamp=False)
    b = border
    y, x = y[..., 2 * b:-b, 2 * b:-b], x[..., 2 * b:-b, 2 * b:-b]
    loss = (y - x).abs().mean()
    if lpips is not None and w_lpips > 0:
        loss = loss + w_lpips * lpips(y, x).mean()
    return loss


def warp_valid(theta: torch.Tensor, size: int, downscale: int = DOWNSCALE) -> torch.Tensor:
    """[N,1,size,size] bool: pixels whose warped source lies inside the crop AND whose latent cell
    and its 8 neighbours have a warped source inside the latent grid (the decoder's border)."""
    import torch.nn.functional as F

    n = theta.shape[0]
    mi = warp(torch.ones(n, 1, size, size), theta) > 0.999
    mz = (warp(torch.ones(n, 1, size // downscale, size // downscale), theta) > 0.999).float()
    mz = -F.max_pool2d(-mz, 3, 1, 1)                      # erode by one cell
    mz = F.interpolate(mz, scale_factor=downscale, mode="nearest") > 0.5
    return mi & mz


def dec_equiv_loss(vae, x: torch.Tensor, z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Decoder equivariance (EQ-VAE's direction): mean L1 between D(warp(z)) and warp(x) where both
    warps have a valid source (warp_valid); gradients reach the decoder and, through z, the encoder."""
    y = vae.decode(warp(z, theta), clamp=False)
    m = warp_valid(theta, x.shape[-1], vae.downscale).to(x.device).expand_as(x)
    d = (y - warp(x, theta)).abs()
    return (d * m).sum() / m.sum().clamp_min(1)


def step_losses(vae, lpips, x: torch.Tensor, pairs: list[CropPair], cfg: Stage1Config,
                mean0: torch.Tensor, std0: torch.Tensor, encoder0=None,
                theta: torch.Tensor | None = None, shifted: torch.Tensor | None = None,
                shifts: list[tuple[int, int]] | None = None, recon0=None) -> dict[str, torch.Tensor]:
    """Losses of one batch: x holds the B crops of image i, then the B crops of image j.
    encoder0: the frozen pretrained encoder (needed when cfg.w_anchor > 0); theta: one random
    warp per crop (needed when cfg.w_equiv or cfg.w_dec_equiv > 0); shifted [3, B, 3, S, S] the
    first B crops with their window moved by shifts[1:] (shift_phase; needed when cfg.w_shift_avg
    > 0); recon0: the
    frozen pretrained x -> D0(E0(x)) (needed when cfg.w_out_anchor > 0)."""
    B = len(pairs)
    z, logvar = vae.encode_distribution(x)
    if cfg.w_anchor > 0:
        if encoder0 is None:
            raise ValueError("step_losses: w_anchor > 0 needs the frozen starting encoder (encoder0)")
        with torch.no_grad():
            z0 = encoder0(x)
        anchor = (z - z0).abs().mean()
    else:
        anchor = z.new_zeros(())
    y = vae.decode(z, clamp=False)
    recon_l1 = (y - x).abs().mean()
    lp = lpips(y, x).mean() if (lpips is not None and cfg.w_lpips > 0) else recon_l1.new_zeros(())
    corr, _ = correspondence_loss(z[:B], z[B:], [p.xy_i for p in pairs], [p.xy_j for p in pairs],
                                  [p.weight for p in pairs], cfg.corr_loss)
    if logvar is not None:
        reg, w_reg = kl_term(z, logvar), cfg.w_kl
    else:
        reg, w_reg = stats_penalty(z, mean0, std0), cfg.w_stats
    equiv = equivariance_loss(vae, x, z, theta) if cfg.w_equiv > 0 else z.new_zeros(())
    zero = z.new_zeros(())
    if cfg.w_shift_avg > 0:
        if shifted is None or shifts is None:
            raise ValueError("step_losses: w_shift_avg > 0 needs the shifted crops and their shifts")
        savg = shift_avg_loss(vae, x[:B], z[:B], shifted, shifts,
                              lpips=lpips if cfg.shift_avg_lpips else None, w_lpips=cfg.w_lpips)
    else:
        savg = zero
    if cfg.w_dec_equiv > 0:
        if theta is None:
            raise ValueError("step_losses: w_dec_equiv > 0 needs one warp per crop (theta)")
        dequiv = dec_equiv_loss(vae, x, z, theta)
    else:
        dequiv = zero
    if cfg.w_out_anchor > 0:
        if recon0 is None:
            raise ValueError("step_losses: w_out_anchor > 0 needs the frozen pretrained autoencoder (recon0)")
        with torch.no_grad():
            y0 = recon0(x)
        oanchor = (y - y0).abs().mean()
    else:
        oanchor = zero
    loss = (recon_l1 + cfg.w_lpips * lp + cfg.lambda_corr * corr + w_reg * reg + cfg.w_anchor * anchor
            + cfg.w_equiv * equiv + cfg.w_shift_avg * savg + cfg.w_dec_equiv * dequiv + cfg.w_out_anchor * oanchor)
    return {"loss": loss, "recon_l1": recon_l1, "lpips": lp, "corr": corr, "stats": reg, "anchor": anchor,
            "equiv": equiv, "shift_avg": savg, "dec_equiv": dequiv, "out_anchor": oanchor}


# ----------------------------------------------------------------------------- measurement
@torch.no_grad()
def encode_views(vae, cs: CorrScene, ids=None) -> dict[int, torch.Tensor]:
    """Full images (trimmed to multiples of 8) -> latents [C, h, w], once per view."""
    ids = range(len(cs.scene.cameras)) if ids is None else ids
    return {i: vae.encode(trim8(image_tensor(cs.scene, i))[None].to(vae.device))[0].float().cpu() for i in ids}


@torch.no_grad()
def consistency(latents: dict[int, torch.Tensor], cs: CorrScene, split: str) -> dict:
    """Mean latent L1 at the correspondences of `split` pairs, on full-image latents.

    l1: mean over matches; l1_weighted: with pair weights; l1_random: the same latents at
    non-corresponding pixels (each match's j pixel swapped for the next match's within the
    pair), so ratio = l1 / l1_random is immune to latents merely shrinking."""
    tot = totw = wsum = rnd = 0.0
    n = npairs = 0
    for i, j, xy_i, xy_j, w in pair_groups(cs, split):
        zi, zj = latents[i], latents[j]
        ok = ((xy_i[:, 0] < zi.shape[2] * DOWNSCALE) & (xy_i[:, 1] < zi.shape[1] * DOWNSCALE)
              & (xy_j[:, 0] < zj.shape[2] * DOWNSCALE) & (xy_j[:, 1] < zj.shape[1] * DOWNSCALE))
        if not ok.any():
            continue
        a = sample_latents(zi, torch.as_tensor(xy_i[ok]))
        b = sample_latents(zj, torch.as_tensor(xy_j[ok]))
        d = (a - b).abs().mean(1).double()
        tot += float(d.sum())
        totw += w * float(d.sum())
        wsum += w * len(d)
        rnd += float((a - b.roll(1, 0)).abs().mean(1).double().sum()) if len(d) > 1 else float(d.sum())
        n += len(d)
        npairs += 1
    if n == 0:
        return {"l1": None, "l1_weighted": None, "l1_random": None, "ratio": None, "matches": 0, "pairs": 0}
    l1, r = tot / n, rnd / n
    return {"l1": l1, "l1_weighted": totw / wsum, "l1_random": r, "ratio": l1 / r if r > 0 else None,
            "matches": n, "pairs": npairs}


@torch.no_grad()
def recon_quality(vae, latents: dict[int, torch.Tensor], cs: CorrScene, ids) -> dict:
    """decode(encode(x)) PSNR / L1 over views `ids` (the test views: must not collapse)."""
    ps, l1 = [], []
    for i in ids:
        x = trim8(image_tensor(cs.scene, i))[None]
        p, l = psnr_l1(vae.decode(latents[i][None].to(vae.device)).float().cpu(), x)
        ps.append(p)
        l1.append(l)
    return {"psnr": float(np.mean(ps)) if ps else None, "l1": float(np.mean(l1)) if l1 else None, "views": len(ps)}


def measure(vae, cs: CorrScene, shift: bool = True) -> tuple[dict, dict[int, torch.Tensor]]:
    lat = encode_views(vae, cs)
    res = {"heldout": consistency(lat, cs, "heldout"), "train": consistency(lat, cs, "train"),
           "recon": recon_quality(vae, lat, cs, cs.scene.test),
           "shift": shift_quality(vae, cs, cs.scene.test if shift else [])}
    return res, lat


@torch.no_grad()
def shift_quality(vae, cs: CorrScene, ids) -> dict:
    """The shift-averaged ceiling (lrf.vae.shift, 4x4 grid of 0/2/4/6 px) over views `ids`: PSNR of
    D(mean of E(shifted x), each moved back) against x, the per-view mean; None without views."""
    from lrf.vae.shift import shift_ceiling

    if not len(ids):
        return {"psnr": None, "views": 0}
    r = shift_ceiling(vae, cs.scene, ids)
    return {"psnr": r["shift"], "plain": r["plain"], "views": r["views"]}


def latent_stats(latents: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over all pixels of all given latents (float64 sums)."""
    s = s2 = 0.0
    n = 0
    for z in latents:
        zz = z.double().flatten(1)
        s = s + zz.sum(1)
        s2 = s2 + (zz ** 2).sum(1)
        n += zz.shape[1]
    mean = s / n
    std = (s2 / n - mean ** 2).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()


def combine(before: dict, after: dict) -> dict:
    """Per-scene before/after, split by what was measured."""
    return {k: {"before": before[k], "after": after[k]} for k in ("heldout", "train", "recon", "shift")}


def overall(per_scene: dict[str, dict]) -> dict:
    """Match-pooled L1 over scenes (and view-pooled recon PSNR)."""
    out = {}
    for split in ("heldout", "train"):
        out[split] = {}
        for when in ("before", "after"):
            rows = [r[split][when] for r in per_scene.values() if r[split][when]["matches"]]
            n = sum(r["matches"] for r in rows)
            out[split][when] = None if n == 0 else {
                "l1": sum(r["l1"] * r["matches"] for r in rows) / n,
                "l1_random": sum(r["l1_random"] * r["matches"] for r in rows) / n,
                "matches": n}
            if n:
                o = out[split][when]
                o["ratio"] = o["l1"] / o["l1_random"] if o["l1_random"] else None
    for key in ("recon", "shift"):
        out[key] = {}
        for when in ("before", "after"):
            rows = [r[key][when] for r in per_scene.values() if r[key][when]["views"]]
            v = sum(r["views"] for r in rows)
            out[key][when] = None if v == 0 else {"psnr": sum(r["psnr"] * r["views"] for r in rows) / v, "views": v}
    return out


# ----------------------------------------------------------------------------- checkpoint selection
VAL_SPLIT, EXCLUDED = "val", "excluded"   # pair splits of a scene with validation views


def with_validation_views(cs: CorrScene, views: list[int]) -> CorrScene:
    """The scene with `views` out of training: of its "train" pairs that involve one, those between
    two validation views and each validation view's pair with the most matches to a training view
    become "val" (measured), the others "excluded" (neither trained on nor measured: measuring them
    all would encode every view at each validation)."""
    p = cs.pairs.copy()
    v = set(views)
    a, b = p["image_i"].isin(v), p["image_j"].isin(v)
    touch = (p["split"] == "train") & (a | b)
    keep = touch & a & b
    for i in views:
        mine = p.index[touch & ~(a & b) & ((p["image_i"] == i) | (p["image_j"] == i))]
        if len(mine):
            keep[p.loc[mine, "matches"].astype(np.int64).idxmax()] = True
    p.loc[touch, "split"] = EXCLUDED
    p.loc[keep, "split"] = VAL_SPLIT
    return CorrScene(cs.scene, cs.matches, p, cs.source)


def split_for_validation(tune: list[CorrScene], cfg: Stage1Config) -> tuple[list[CorrScene], dict[str, list[int]]]:
    """(tuning scenes with their validation views out of training, {scene key: validation views});
    unchanged and empty when validation is off."""
    if not cfg.validate_every:
        return list(tune), {}
    from lrf.scene.model import validation_views

    val = {cs.key: validation_views(cs.scene, cfg.val_views) for cs in tune}
    return [with_validation_views(cs, val[cs.key]) for cs in tune], val


@torch.no_grad()
def validation_metrics(vae, tune: list[CorrScene], val: dict[str, list[int]], grid: int = 4) -> dict:
    """At the validation views: the plain and shift-averaged ceilings (view-pooled, lrf.vae.shift,
    `grid` shifts per axis) and the matched/random latent L1 ratio of their "val" pairs
    (match-pooled over scenes)."""
    from lrf.vae.shift import shift_ceiling

    l1 = rnd = 0.0
    n, plain, shift = 0, [], []
    for cs in tune:
        views = val.get(cs.key) or []
        if not views:
            continue
        r = shift_ceiling(vae, cs.scene, views, tuple(range(0, 8, 8 // grid)))
        plain += [v["plain"] for v in r["per_view"]]
        shift += [v["shift"] for v in r["per_view"]]
        p = cs.pairs[cs.pairs["split"] == VAL_SPLIT]
        if len(p):
            lat = encode_views(vae, cs, sorted(set(p["image_i"].tolist()) | set(p["image_j"].tolist())))
            c = consistency(lat, cs, VAL_SPLIT)
            if c["matches"]:
                l1, rnd, n = l1 + c["l1"] * c["matches"], rnd + c["l1_random"] * c["matches"], n + c["matches"]
    return {"shift_psnr": float(np.mean(shift)), "recon_psnr": float(np.mean(plain)),
            "ratio": l1 / rnd if rnd > 0 else None, "matches": n}


def criterion(m: dict, ref: dict, cfg: Stage1Config) -> tuple[float, bool]:
    """(score, eligible) of validation_metrics `m` against step 0's `ref`: the higher shift-averaged
    ceiling, among steps whose plain ceiling is at most val_max_drop_db under the pretrained
    autoencoder's. Stage 1's one place that says what "best" is."""
    if not math.isfinite(m["shift_psnr"]):
        return -math.inf, False
    return m["shift_psnr"], m["recon_psnr"] >= ref["recon_psnr"] - cfg.val_max_drop_db


# What `criterion` scores, for consistency.json and the report's selection figure (change with it).
CRITERION_INFO = {"criterion": "shift-averaged ceiling at the validation views (dB, lrf.vae.shift; higher is better)",
                  "guard": "recon_psnr >= step 0's - {drop} dB (decode(encode(x)) at the validation views)",
                  "score_metric": "shift_psnr", "guard_metric": "recon_psnr"}


def selection_report(loop: TrainLoop, tune: list[CorrScene], val: dict[str, list[int]]) -> dict | None:
    """consistency.json's "validation": the views, the criterion, the chosen step and the curve."""
    sel = loop.validation()
    if sel is None:
        return None
    drop = loop.cfg.val_max_drop_db
    return {"views": {cs.key: [cs.scene.cameras[i].name for i in val.get(cs.key, [])] for cs in tune},
            **{k: v.format(drop=drop) for k, v in CRITERION_INFO.items()}, "max_drop_db": drop, **sel}


# ----------------------------------------------------------------------------- training
def fingerprint(cfg: Stage1Config, vae, tune: list[CorrScene], spec: dict | None) -> dict:
    fp = loop_fingerprint(cfg, vae=vae.kind if spec is None else {k: spec.get(k) for k in ("kind", "source", "encoder")},
                          encoder0=tensors_sha256(vae.encoder.state_dict().values()),
                          scenes=[[cs.key, cs.digest()] for cs in tune])
    if cfg.tune_decoder or cfg.w_out_anchor > 0 or (spec or {}).get("decoder"):
        fp["decoder0"] = tensors_sha256(vae.decoder.state_dict().values())
    return json.loads(json.dumps(fp))


def train_stage1(vae, lpips, tune: list[CorrScene], cfg: Stage1Config, out_dir: str | Path,
                 measure_scenes: list[CorrScene] = (), spec: dict | None = None,
                 stop_at: int | None = None, progress: bool = True) -> dict | None:
    """Fine-tune vae.encoder (and with cfg.tune_decoder vae.decoder) in place; write
    encoder.safetensors, decoder.safetensors (the decoder stage 1 ends with: the starting one when
    it is not tuned), curve.csv, consistency.json.

    Resumes from out_dir/ckpt.safetensors when valid and written with the same settings and data.
    `stop_at` ends the session after that many total steps without final outputs (as if killed:
    for tests and chunked runs); then None is returned, else the consistency report.
    """
    dev = resolve_device(cfg.device, "stage 1")
    enc, dec = vae.encoder, vae.decoder
    vae.requires_grad_(False)
    tune, val = split_for_validation(tune, cfg)   # validation views' pairs leave training
    fp = fingerprint(cfg, vae, tune, spec)
    # The anchors' reference: the autoencoder as it starts (before any checkpoint is loaded).
    # A frozen encoder's latents are its starting ones: the latent anchor is 0, so its reference
    # forward pass is skipped (the correspondence and stats terms are then logged constants).
    loss_cfg = cfg if cfg.tune_encoder else replace(cfg, w_anchor=0.0)
    vae0 = copy.deepcopy(vae).eval() if (loss_cfg.w_anchor > 0 or cfg.w_out_anchor > 0) else None
    encoder0 = (lambda x: vae0.encode_distribution(x)[0]) if loss_cfg.w_anchor > 0 else None
    recon0 = (lambda x: vae0.decode(vae0.encode_distribution(x)[0], clamp=False)) if vae0 is not None else None
    parts = ([("encoder", enc)] if cfg.tune_encoder else []) + ([("decoder", dec)] if cfg.tune_decoder else [])
    sampler = PairSampler(tune, cfg)
    images = ImageCache(tune)
    stats: dict[str, torch.Tensor] = {}   # the starting latents' per-channel mean / std

    def state() -> dict:
        return {**{f"{name}/{k}": v for name, m in parts for k, v in m.state_dict().items()},
                "stats/mean": stats["mean"].cpu(), "stats/std": stats["std"].cpu()}

    def load(tens: dict) -> None:
        for name, m in parts:
            m.load_state_dict({k[len(name) + 1:]: v for k, v in tens.items() if k.startswith(name + "/")})
        stats["mean"], stats["std"] = tens["stats/mean"], tens["stats/std"]

    loop = TrainLoop("stage1", out_dir, fp, cfg, CURVE_COLUMNS, state, load, progress)
    groups = [{"params": list(m.parameters()), "lr": (cfg.decoder_lr or cfg.lr) if name == "decoder" else cfg.lr}
              for name, m in parts]
    opt = torch.optim.Adam(groups, lr=cfg.lr)
    if loop.resume(opt) is None:
        before, lat_train = {}, []
        for cs in tune:
            before[cs.key], lat = measure(vae, cs, cfg.shift_measure == "all")
            lat_train += [lat[i] for i in cs.scene.train if i not in val.get(cs.key, ())]
        mbefore = {cs.key: measure(vae, cs, cfg.shift_measure != "none")[0] for cs in measure_scenes}
        stats["mean"], stats["std"] = latent_stats(lat_train)
        loop.extra = {"before": before, "measure_before": mbefore}
    mean0, std0 = stats["mean"].to(dev), stats["std"].to(dev)
    stats["mean"], stats["std"] = mean0, std0

    def step_fn(rng: RNG):
        pairs = [sampler.sample(rng.np) for _ in range(cfg.batch)]
        crops = ([images.crop(p.scene, p.i, p.origin_i, cfg.crop) for p in pairs]
                 + [images.crop(p.scene, p.j, p.origin_j, cfg.crop) for p in pairs])
        x = torch.stack(crops).to(dev)
        theta = random_warps(rng.np, len(x), cfg) if (cfg.w_equiv > 0 or cfg.w_dec_equiv > 0) else None
        shifted, shifts = None, None
        if cfg.w_shift_avg > 0:
            shifts = shift_phase(rng.np, cfg)
            shifted = torch.stack([torch.stack([images.shifted_crop(p.scene, p.i, p.origin_i, cfg.crop, dx, dy)
                                                for p in pairs]) for dx, dy in shifts[1:]]).to(dev)
        L = step_losses(vae, lpips, x, pairs, loss_cfg, mean0, std0, encoder0, theta, shifted, shifts, recon0)
        opt.zero_grad(set_to_none=True)
        L["loss"].backward()
        opt.step()
        vals = {k: float(v.detach()) for k, v in L.items()}
        return ([vals[k] for k in CURVE_COLUMNS[1:-1]], {k: vals[k] for k in ("loss", "corr", "stats")})

    def validate():
        m = validation_metrics(vae, tune, val, cfg.val_grid)
        ref = loop.extra.setdefault("val_reference", m)  # the first call: step 0, the pretrained encoder
        return (*criterion(m, ref, cfg), m)

    if not loop.run(step_fn, stop_at, train=[(m, True) for _, m in parts], validate=validate):
        return None

    before, mbefore = loop.extra["before"], loop.extra["measure_before"]
    after, lat_train = {}, []
    for cs in tune:
        after[cs.key], lat = measure(vae, cs, cfg.shift_measure == "all")
        lat_train += [lat[i] for i in cs.scene.train if i not in val.get(cs.key, ())]
    mean1, std1 = latent_stats(lat_train)
    per_scene = {k: combine(before[k], after[k]) for k in before}
    mafter = {cs.key: combine(mbefore[cs.key], measure(vae, cs, cfg.shift_measure != "none")[0])
              for cs in measure_scenes}
    report = {"stage": 1, "vae": spec, "config": asdict(cfg), "steps": loop.step, "seconds": loop.seconds,
              "s_per_step": loop.seconds / max(loop.step, 1),
              "tuning": per_scene, "overall": overall(per_scene),
              "measure": mafter, "measure_overall": overall(mafter) if mafter else None,
              "latent_stats": {"before": {"mean": mean0.tolist(), "std": std0.tolist()},
                               "after": {"mean": mean1.tolist(), "std": std1.tolist()}},
              "validation": selection_report(loop, tune, val)}
    meta = {"stage": 1, "steps": loop.step, "vae": spec, "chosen_step": loop.best_step}
    save_module(loop.out_dir / "encoder.safetensors", enc, meta)
    save_module(loop.out_dir / "decoder.safetensors", dec, {**meta, "tuned": cfg.tune_decoder})
    atomic_write_json(loop.out_dir / "consistency.json", report)
    loop.finish(cfg.keep_checkpoint)
    return report


def measure_only(vae_before, vae_after, scenes: list[CorrScene]) -> dict:
    per = {cs.key: combine(measure(vae_before, cs)[0], measure(vae_after, cs)[0]) for cs in scenes}
    return {"stage": 1, "measure_only": True, "measure": per, "measure_overall": overall(per)}


def summary_line(report: dict) -> str:
    def fmt(o, k, spec):
        return "n/a" if o is None or o.get(k) is None else format(o[k], spec)

    parts = []
    for name, ov in (("tuning", report.get("overall")), ("measure", report.get("measure_overall"))):
        if not ov:
            continue
        h, r = ov["heldout"], ov["recon"]
        parts.append(f"{name}: held-out corr L1 {fmt(h['before'], 'l1', '.4f')} -> {fmt(h['after'], 'l1', '.4f')} "
                     f"(ratio {fmt(h['before'], 'ratio', '.3f')} -> {fmt(h['after'], 'ratio', '.3f')}), "
                     f"recon PSNR {fmt(r['before'], 'psnr', '.2f')} -> {fmt(r['after'], 'psnr', '.2f')} dB"
                     + (f", shift-averaged {fmt(ov['shift']['before'], 'psnr', '.2f')} -> "
                        f"{fmt(ov['shift']['after'], 'psnr', '.2f')} dB" if ov.get("shift") else ""))
    head = (f"stage 1: {report['steps']} steps, {report['s_per_step']:.2f} s/step; " if "steps" in report
            else "stage 1 (measure only): ")
    return head + "; ".join(parts)


# ----------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    from lrf.cli import run_main, start_step
    from lrf.finetune.common import paired_scenes, pretrained_and_tuned, stage_parser
    from lrf.metrics import load_lpips
    from lrf.vae.factory import load_vae

    args = stage_parser(__doc__, "corr", "its correspondences folder", "Stage1Config").parse_args(argv)

    def go():
        step = start_step(args, who="stage 1")
        cfg = step.config(Stage1Config)
        measured = paired_scenes(args.measure_scene, args.measure_corr, "--measure-scene/--measure-corr",
                                 load_corr_scene)
        if args.measure_only:
            if not measured:
                raise InputError("--measure-only: give --measure-scene/--measure-corr")
            before, after, spec = pretrained_and_tuned(step.spec, ("encoder", "decoder"), args.out, args.weights_dir, cfg.device)
            report = dict(measure_only(before, after, measured), vae=spec)
            atomic_write_json(args.out / "consistency.json", report)
            return summary_line(report)
        tune = paired_scenes(args.scene, args.corr, "--scene/--corr", load_corr_scene)
        if not tune:
            raise InputError("stage 1: give at least one --scene SCENE_JSON --corr CORR_DIR")
        vae = load_vae(step.spec, args.weights_dir, cfg.device)
        lpips = load_lpips(cfg.lpips_net, args.weights_dir, cfg.device) if cfg.w_lpips > 0 else None
        return summary_line(train_stage1(vae, lpips, tune, cfg, args.out, measured, spec=step.spec))

    return run_main(go)


if __name__ == "__main__":
    raise SystemExit(main())
