"""3DGS adaptive density control (clone / split / prune / opacity reset), gsplat-style hooks.

The field's rows and the Adam moments must stay aligned, so every edit goes through
`edit_rows`, which rewrites each parameter and its optimizer state together.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from lrf.field.gaussians import GaussianField, quat_to_rotmat
from lrf.settings import DensifyConfig

# ---------------------------------------------------------------- optimizer-consistent edits


def edit_rows(params: nn.ParameterDict, optimizer: torch.optim.Optimizer | None,
              param_fn: Callable[[str, torch.Tensor], torch.Tensor],
              state_fn: Callable[[str, str, torch.Tensor], torch.Tensor],
              names: tuple[str, ...] | None = None) -> None:
    """Replace params[name] by param_fn(name, old) and each tensor of its optimizer state by
    state_fn(name, key, old), in every param group that holds it. Scalar state ("step") is kept,
    since it is shared by all rows."""
    names = tuple(params.keys()) if names is None else names
    by_id = {id(params[n]): n for n in names}
    done = set()
    if optimizer is not None:
        for group in optimizer.param_groups:
            for j, p in enumerate(group["params"]):
                name = by_id.get(id(p))
                if name is None:
                    continue
                new_p = nn.Parameter(param_fn(name, p.data), requires_grad=p.requires_grad)
                st = optimizer.state.pop(p, None)
                if st is not None:
                    optimizer.state[new_p] = {k: (state_fn(name, k, v) if torch.is_tensor(v) and v.dim() > 0 else v)
                                              for k, v in st.items()}
                group["params"][j] = new_p
                params[name] = new_p
                done.add(name)
    for name in names:
        if name not in done:
            p = params[name]
            params[name] = nn.Parameter(param_fn(name, p.data), requires_grad=p.requires_grad)


def keep_rows(params, optimizer, keep: torch.Tensor) -> None:
    """Drop Gaussians: `keep` is a bool mask or index tensor over the rows."""
    edit_rows(params, optimizer, lambda n, p: p[keep], lambda n, k, v: v[keep])


def append_rows(params, optimizer, new: dict[str, torch.Tensor]) -> None:
    """Append rows (one tensor per param name); their Adam moments start at zero."""
    edit_rows(params, optimizer, lambda n, p: torch.cat([p, new[n].to(p)]),
              lambda n, k, v: torch.cat([v, v.new_zeros((new[n].shape[0],) + v.shape[1:])]))


def replace_param(params, optimizer, name: str, value: torch.Tensor, reset_state: bool = True) -> None:
    """Overwrite one parameter wholesale (opacity reset), zeroing its moments."""
    edit_rows(params, optimizer, lambda n, p: value.to(p),
              lambda n, k, v: torch.zeros_like(v) if reset_state else v, names=(name,))


# ---------------------------------------------------------------- the schedule


class DensifyStrategy:
    """Accumulates screen-space gradient norms and applies clone/split/prune on schedule.

    Usage per step: out = field.render(...); strategy.step_pre_backward(out); loss.backward();
    optimizer.step(); strategy.step_post_backward(field, optimizer, step, out, width, height).
    """

    def __init__(self, cfg: DensifyConfig, scene_scale: float = 1.0, seed: int = 0, device="cpu"):
        self.cfg = cfg
        self.scene_scale = float(scene_scale)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(seed))
        self.grad2d: torch.Tensor | None = None
        self.count: torch.Tensor | None = None
        self.last_stats: dict[str, int] = {}

    # ---- hooks ----
    def step_pre_backward(self, out) -> None:
        """Keep the gradient of the (non-leaf) 2D means for the post-backward hook."""
        m2d = out.means2d
        if m2d.requires_grad and not m2d.is_leaf:
            m2d.retain_grad()

    @torch.no_grad()
    def step_post_backward(self, field: GaussianField, optimizer, step: int, out, width: int, height: int) -> dict:
        cfg = self.cfg
        self.last_stats = {}
        if step >= cfg.refine_stop:
            return self.last_stats
        self.update_state(out, width, height, field.num_gaussians)
        if (step > cfg.refine_start and step % cfg.refine_every == 0
                and step % cfg.reset_every >= cfg.pause_refine_after_reset):
            n_clone, n_split = self.grow(field, optimizer, step)
            n_prune = self.prune(field, optimizer, step)
            self.reset_state(field.num_gaussians, field.device)
            self.last_stats = dict(cloned=n_clone, split=n_split, pruned=n_prune, n=field.num_gaussians)
        if step > 0 and step % cfg.reset_every == 0:
            self.reset_opacity(field, optimizer)
            self.last_stats["opacity_reset"] = 1
        return self.last_stats

    # ---- pieces (public so tests can drive them with crafted gradients) ----
    def reset_state(self, n: int, device) -> None:
        self.grad2d = torch.zeros(n, device=device)
        self.count = torch.zeros(n, device=device)

    def update_state(self, out, width: int, height: int, n: int) -> None:
        """grad2d += |d loss / d means2d| in NDC-like units (pixels * [W/2, H/2]) where visible."""
        if self.grad2d is None or self.grad2d.shape[0] != n:
            self.reset_state(n, out.means2d.device)
        g = out.means2d.grad
        if g is None:
            return
        g = g.detach().reshape(n, 2) * torch.tensor([width / 2.0, height / 2.0], device=g.device)
        radii = out.radii.reshape(n, -1)
        vis = (radii > 0).all(-1)
        self.grad2d[vis] += g[vis].norm(dim=-1)
        self.count[vis] += 1

    def grow(self, field: GaussianField, optimizer, step: int) -> tuple[int, int]:
        cfg = self.cfg
        n = field.num_gaussians
        avg = self.grad2d / self.count.clamp_min(1)
        high = avg > cfg.grow_grad2d
        budget = cfg.max_gaussians - n
        if budget <= 0:
            return 0, 0
        if int(high.sum()) > budget:   # cap: keep the strongest candidates (each adds one net row)
            idx = torch.nonzero(high).squeeze(1)
            top = idx[torch.argsort(avg[idx], descending=True, stable=True)[:budget]]
            high = torch.zeros_like(high)
            high[top] = True
        small = field.scales.max(-1).values <= cfg.grow_scale3d * self.scene_scale
        clone = high & small
        split = high & ~small
        n_clone, n_split = int(clone.sum()), int(split.sum())
        if n_clone:
            self.clone(field, optimizer, clone)
            split = torch.cat([split, split.new_zeros(n_clone)])
        if n_split:
            self.split(field, optimizer, split)
        return n_clone, n_split

    def clone(self, field: GaussianField, optimizer, mask: torch.Tensor) -> None:
        """Copy the selected Gaussians as they are (under-reconstructed, small)."""
        p = field.params
        append_rows(p, optimizer, {k: p[k].data[mask] for k in p.keys()})

    def split(self, field: GaussianField, optimizer, mask: torch.Tensor) -> None:
        """Replace each selected Gaussian by 2 samples drawn from it, scales / 1.6."""
        p = field.params
        sel = torch.nonzero(mask).squeeze(1)
        scales = torch.exp(p["scales"].data[sel])
        R = quat_to_rotmat(p["quats"].data[sel])
        noise = torch.randn((2, len(sel), 3), generator=self.generator, device=scales.device)
        offs = torch.einsum("nij,bnj->bni", R, scales[None] * noise)
        new = {k: p[k].data[sel].repeat((2,) + (1,) * (p[k].dim() - 1)) for k in p.keys()}
        new["means"] = (p["means"].data[sel][None] + offs).reshape(-1, 3)
        new["scales"] = torch.log(scales / self.cfg.split_scale_div).repeat(2, 1)
        keep_rows(p, optimizer, ~mask)
        append_rows(p, optimizer, new)

    def prune(self, field: GaussianField, optimizer, step: int) -> int:
        cfg = self.cfg
        bad = field.opacities < cfg.prune_opa
        if step > cfg.reset_every:
            bad |= field.scales.max(-1).values > cfg.prune_scale3d * self.scene_scale
        n_bad = int(bad.sum())
        if n_bad:
            keep_rows(field.params, optimizer, ~bad)
        return n_bad

    def reset_opacity(self, field: GaussianField, optimizer) -> None:
        """Clamp opacities to 2x the prune threshold so floaters must re-earn their opacity."""
        v = 2.0 * self.cfg.prune_opa
        logit = math.log(v / (1 - v))
        replace_param(field.params, optimizer, "opacities", field.params["opacities"].data.clamp_max(logit))

    # ---- checkpointing ----
    def state_dict(self) -> dict[str, torch.Tensor]:
        d = {"generator": self.generator.get_state()}
        if self.grad2d is not None:
            d["grad2d"], d["count"] = self.grad2d.detach().cpu(), self.count.detach().cpu()
        return d

    def load_state_dict(self, d: dict[str, torch.Tensor], device="cpu") -> None:
        self.generator.set_state(d["generator"].to(torch.uint8).cpu())
        if "grad2d" in d:
            self.grad2d, self.count = d["grad2d"].to(device), d["count"].to(device)
        else:
            self.grad2d = self.count = None
