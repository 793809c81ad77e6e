"""CUDA backend: thin adapter around ``gsplat.rasterization``.

gsplat is imported lazily so that this module (and the package) import fine
on machines without CUDA.  Output is adapted to :class:`lrf.render.project.RenderOutput`
so training code is backend-agnostic:

* ``means2d`` is an [N, 2] leaf whose ``.grad`` is filled from gsplat's
  [1, N, 2] ``meta["means2d"]`` by a backward hook (gsplat's own tensor is
  batched, and a view of it would not be on the autograd path);
* ``radii`` is recomputed as ceil(3 sqrt(lambda_max)) of the blurred 2D
  covariance (from gsplat's conics) wherever gsplat kept the Gaussian, so
  radii mean the same in every backend (gsplat >= 1.5 returns per-axis
  opacity-aware extents instead).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from lrf.errors import GsplatError

from .project import RenderOutput


def gsplat_available() -> bool:
    """Whether the package is installed (does not import it)."""
    return importlib.util.find_spec("gsplat") is not None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


_PROBLEMS: dict[str, str | None] = {}


def gsplat_problem(device: torch.device | str = "cuda") -> str | None:
    """None when gsplat renders on `device`, else one line ``gsplat: <reason>``.

    Imports gsplat, makes it build or load its CUDA kernels (the first call on a machine
    compiles them: minutes) and renders one Gaussian; the answer is cached per device.
    """
    device = torch.device(device)
    key = str(device)
    if key in _PROBLEMS:
        return _PROBLEMS[key]
    problem = None
    if device.type != "cuda":
        problem = f"gsplat: renders CUDA tensors only, not {key}"
    elif not torch.cuda.is_available():
        problem = "gsplat: no CUDA device is visible to this process"
    else:
        try:
            import gsplat  # noqa: F401, PLC0415
        except Exception as e:  # noqa: BLE001 - any failure to import is the reason
            problem = f"gsplat: cannot import it ({_one_line(e)}); pip install -e . installs the pinned version"
        else:
            try:
                from gsplat.cuda._backend import _C  # noqa: PLC0415 - builds or loads the kernels
            except Exception as e:  # noqa: BLE001
                problem = f"gsplat: cannot build or load its CUDA kernels ({_one_line(e)})"
            else:
                if _C is None:
                    problem = ("gsplat: no CUDA kernels: it found no CUDA toolkit (nvcc) to build them; "
                               "install one matching torch's CUDA or set CUDA_HOME")
                else:
                    try:
                        _smoke(device)
                    except Exception as e:  # noqa: BLE001
                        problem = f"gsplat: its CUDA kernels fail on {torch.cuda.get_device_name(device)} ({_one_line(e)})"
    _PROBLEMS[key] = problem
    return problem


def _smoke(device: torch.device) -> None:
    """Render one Gaussian with gsplat and backpropagate (exercises forward and backward kernels)."""
    import gsplat  # noqa: PLC0415

    means = torch.tensor([[0.0, 0.0, 2.0]], device=device, requires_grad=True)
    colors, _, _ = gsplat.rasterization(
        means=means, quats=torch.tensor([[1.0, 0, 0, 0]], device=device),
        scales=torch.full((1, 3), 0.2, device=device), opacities=torch.tensor([0.9], device=device),
        colors=torch.ones(1, 1, 4, device=device), viewmats=torch.eye(4, device=device)[None],
        Ks=torch.tensor([[[8.0, 0, 8], [0, 8.0, 8], [0, 0, 1]]], device=device), width=16, height=16,
        sh_degree=None)
    colors.sum().backward()
    torch.cuda.synchronize(device)
    if not torch.isfinite(colors).all() or colors.max() <= 0:
        raise RuntimeError("one Gaussian rendered as nothing")


def _import_gsplat(device: torch.device):
    problem = gsplat_problem(device)
    if problem:
        raise GsplatError(problem)
    import gsplat  # noqa: PLC0415

    return gsplat


def _radius_from_conics(conics: Tensor) -> Tensor:
    a, b, c = conics.unbind(-1)
    det = a * c - b * b
    det = torch.where(det > 0, det, torch.ones_like(det))
    sxx, sxy, syy = c / det, -b / det, a / det  # covariance = conic^-1
    half = 0.5 * (sxx + syy)
    lam = half + (half * half - (sxx * syy - sxy * sxy)).clamp_min(0).sqrt()
    return torch.ceil(3.0 * lam.clamp_min(0).sqrt())


def rasterize_gsplat(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor,
                     features: Tensor, viewmat: Tensor, K: Tensor, width: int, height: int,
                     background: Tensor, near: float, far: float, eps2d: float):
    if not means.is_cuda:
        raise ValueError("backend='gsplat' needs CUDA tensors; use backend='cpu'")
    gsplat = _import_gsplat(means.device)
    C = features.shape[-1]
    colors, alphas, meta = gsplat.rasterization(
        means=means, quats=quats, scales=scales, opacities=opacities,
        colors=features[None], viewmats=viewmat[None], Ks=K[None],
        width=width, height=height, near_plane=near, far_plane=far, eps2d=eps2d,
        sh_degree=None, packed=False, backgrounds=background[None],
        render_mode="RGB", rasterize_mode="classic",
    )
    image = colors[0]
    if image.shape[-1] != C:  # very old gsplat pads channel counts
        image = image[..., :C]
    alpha = alphas[0, ..., 0]

    m2d_batched = meta["means2d"]  # [1, N, 2]
    means2d = m2d_batched.detach()[0].clone()
    if m2d_batched.requires_grad:
        means2d.requires_grad_(True)

        def _copy_grad(g: Tensor) -> None:
            g0 = g.detach()[0]
            means2d.grad = g0.clone() if means2d.grad is None else means2d.grad + g0

        m2d_batched.register_hook(_copy_grad)

    raw_radii = meta["radii"][0]
    kept = raw_radii > 0 if raw_radii.dim() == 1 else (raw_radii > 0).any(-1)
    with torch.no_grad():
        r = _radius_from_conics(meta["conics"][0].float())
        radii = torch.where(kept, r, torch.zeros_like(r)).to(torch.int32)
    depths = meta["depths"][0]
    return RenderOutput(image=image, alpha=alpha, means2d=means2d, radii=radii, depths=depths)
