"""Tests for lrf.render: fast CPU rasterizer vs brute-force reference."""

from __future__ import annotations

import math

import pytest
import torch

from lrf.bench import make_scene
from lrf.errors import InputError
from lrf.render import RenderOutput, rasterize, resolve_backend
from lrf.render.cpu import composite_cpu
from lrf.render.project import project_gaussians
from lrf.render.reference import composite_reference

PARAMS = ("means", "quats", "scales", "opacities", "features", "background")


def mixed_scene(n: int, c: int, width: int, height: int, seed: int,
                dtype=torch.float64) -> dict:
    """Random frustum scene plus hard cases: behind the camera, at the near
    plane, off-screen but overlapping, huge, tiny, nearly opaque, invisible."""
    s = make_scene(n, c, width, height, seed=seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1000)
    R, t = s["viewmat"][:3, :3], s["viewmat"][:3, 3]
    f, cx, cy = s["K"][0, 0], s["K"][0, 2], s["K"][1, 2]

    def world(u, v, z):  # pixel (u, v) at depth z -> world point
        p = torch.stack([(u - cx) * z / f, (v - cy) * z / f, z], -1)
        return (p - t) @ R

    extra_cam = [  # (u, v, z, scale, opacity)
        (width / 2, height / 2, -3.0, 0.3, 0.9),  # behind the camera
        (width / 3, height / 2, 0.005, 0.01, 0.9),  # in front of the near plane
        (-3.0, height / 2, 3.0, 0.15, 0.8),  # centre off-screen, overlapping
        (width + 2.0, -2.0, 3.0, 0.2, 0.6),  # off a corner
        (width * 4.0, height / 2, 3.0, 0.05, 0.9),  # far off-screen: culled
        (width / 2, height / 2, 4.0, 1.5, 0.5),  # huge
        (width / 4, height / 4, 5.0, 1e-4, 0.9),  # tiny (eps2d dominated)
        (width / 2 + 0.3, height / 2 - 0.2, 2.5, 0.05, 0.9999),  # alpha clamped to 0.99
        (width / 2, height / 3, 3.0, 0.2, 1e-3),  # opacity < 1/255: culled
    ]
    # A stack of opaque Gaussians so that early termination (T <= 1e-4) kicks in.
    for i in range(8):
        extra_cam.append((width * 0.7 + 0.1 * i, height * 0.6, 2.2 + 0.05 * i, 0.12, 0.97))
    u, v, z, sc, op = (torch.tensor(col, dtype=torch.float64) for col in zip(*extra_cam))
    m = len(extra_cam)
    s["means"] = torch.cat([s["means"], world(u, v, z)])
    s["scales"] = torch.cat([s["scales"], sc[:, None] * torch.exp(
        0.3 * torch.randn(m, 3, generator=g, dtype=torch.float64))])
    s["quats"] = torch.cat([s["quats"], torch.randn(m, 4, generator=g, dtype=torch.float64)])
    s["opacities"] = torch.cat([s["opacities"], op])
    s["features"] = torch.cat([s["features"],
                               torch.randn(m, c, generator=g, dtype=torch.float64)])
    s["background"] = torch.randn(c, generator=g, dtype=torch.float64)
    return {k: (v.to(dtype) if torch.is_tensor(v) else v) for k, v in s.items()}


def render_with_grads(scene: dict, backend: str, seed: int = 7):
    """Render, backprop random cotangents; return outputs and input grads."""
    p = {k: scene[k].clone().requires_grad_(True) for k in PARAMS}
    out = rasterize(p["means"], p["quats"], p["scales"], p["opacities"], p["features"],
                    scene["viewmat"], scene["K"], scene["width"], scene["height"],
                    background=p["background"], backend=backend)
    g = torch.Generator().manual_seed(seed)
    gi = torch.randn(out.image.shape, generator=g, dtype=torch.float64).to(out.image)
    ga = torch.randn(out.alpha.shape, generator=g, dtype=torch.float64).to(out.alpha)
    ((out.image * gi).sum() + (out.alpha * ga).sum()).backward()
    grads = {k: p[k].grad for k in PARAMS}
    grads["means2d"] = out.means2d.grad
    return out, grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


SCENES = [  # n, C, width, height, seed
    (150, 1, 16, 16, 0),
    (300, 3, 24, 17, 1),
    (600, 32, 33, 21, 2),
    (1200, 4, 40, 30, 3),
]


@pytest.mark.parametrize("n,c,w,h,seed", SCENES)
def test_cpu_matches_reference_float64(n, c, w, h, seed):
    scene = mixed_scene(n, c, w, h, seed)
    ref, gref = render_with_grads(scene, "reference")
    out, gout = render_with_grads(scene, "cpu")
    assert out.image.shape == (h, w, c) and out.alpha.shape == (h, w)
    assert rel_err(out.image, ref.image) < 1e-10
    assert (out.alpha - ref.alpha).abs().max() < 1e-10
    assert torch.equal(out.radii, ref.radii)
    # The hard cases really are exercised.
    assert (out.radii == 0).sum() >= 4 and out.alpha.max() > 0.999
    for k in gref:
        assert gout[k] is not None and torch.isfinite(gout[k]).all(), k
        assert rel_err(gout[k], gref[k]) < 1e-5, (k, rel_err(gout[k], gref[k]))


def test_cpu_matches_reference_float32():
    scene = mixed_scene(2000, 8, 48, 36, seed=5, dtype=torch.float32)
    ref, gref = render_with_grads(scene, "reference")
    out, gout = render_with_grads(scene, "cpu")
    assert rel_err(out.image, ref.image) < 1e-4
    assert (out.alpha - ref.alpha).abs().max() < 1e-4
    for k in gref:
        assert rel_err(gout[k], gref[k]) < 2e-3, (k, rel_err(gout[k], gref[k]))


def test_target_sized_scene_float64_smoke():
    """A dense latent-sized scene (many early terminations) still matches."""
    scene = make_scene(2500, 4, 28, 20, seed=11, dtype=torch.float64)
    scene["background"] = torch.zeros(4, dtype=torch.float64)
    ref, gref = render_with_grads(scene, "reference")
    out, gout = render_with_grads(scene, "cpu")
    assert rel_err(out.image, ref.image) < 1e-10
    for k in gref:
        assert rel_err(gout[k], gref[k]) < 1e-5, k


def _tiny_inputs():
    torch.manual_seed(0)
    means = torch.tensor([[0.0, 0.0, 3.0], [0.3, -0.2, 3.5], [-0.4, 0.3, 4.0]],
                         dtype=torch.float64)
    quats = torch.randn(3, 4, dtype=torch.float64)
    scales = torch.tensor([[0.3, 0.2, 0.25], [0.25, 0.4, 0.3], [0.35, 0.3, 0.2]],
                          dtype=torch.float64)
    opac = torch.tensor([0.6, 0.5, 0.7], dtype=torch.float64)
    feats = torch.randn(3, 2, dtype=torch.float64)
    bg = torch.tensor([0.2, -0.1], dtype=torch.float64)
    K = torch.tensor([[6.0, 0, 3.5], [0, 6.0, 3.0], [0, 0, 1]], dtype=torch.float64)
    return (means, quats, scales, opac, feats, bg), torch.eye(4, dtype=torch.float64), K


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_tiny(backend):
    inputs, viewmat, K = _tiny_inputs()
    inputs = tuple(x.clone().requires_grad_(True) for x in inputs)

    def fn(means, quats, scales, opac, feats, bg):
        out = rasterize(means, quats, scales, opac, feats, viewmat, K, 7, 6,
                        background=bg, backend=backend)
        return out.image, out.alpha

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_single_isotropic_gaussian_peak():
    """Gaussian on the principal axis: centre pixel = opacity * feature."""
    W = H = 9
    f, z, s, op = 10.0, 2.0, 0.05, 0.7
    K = torch.tensor([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]], dtype=torch.float64)
    feat = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)
    out = rasterize(torch.tensor([[0.0, 0.0, z]], dtype=torch.float64),
                    torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64),
                    torch.full((1, 3), s, dtype=torch.float64),
                    torch.tensor([op], dtype=torch.float64), feat,
                    torch.eye(4, dtype=torch.float64), K, W, H, backend="cpu")
    assert isinstance(out, RenderOutput)
    assert torch.allclose(out.image[4, 4], op * feat[0], atol=1e-12)
    assert out.alpha[4, 4].item() == pytest.approx(op, abs=1e-12)
    assert out.alpha.argmax().item() == 4 * W + 4
    var = (f * s / z) ** 2 + 0.3  # projected variance + eps2d blur
    assert out.image[4, 5, 0].item() == pytest.approx(op * math.exp(-0.5 / var) * 0.3, rel=1e-9)
    assert out.radii.item() == math.ceil(3 * math.sqrt(var))
    assert torch.allclose(out.means2d.detach(), torch.tensor([[W / 2, H / 2]],
                                                             dtype=torch.float64))
    assert out.depths.item() == pytest.approx(z)


def test_auto_backend_is_cpu_on_cpu_tensors():
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    scene = mixed_scene(200, 3, 20, 15, seed=4)
    kw = {k: scene[k] for k in ("viewmat", "K", "width", "height", "background")}
    args = [scene[k] for k in PARAMS[:5]]
    a = rasterize(*args, **kw, backend="auto")
    b = rasterize(*args, **kw, backend="cpu")
    assert torch.equal(a.image, b.image) and torch.equal(a.alpha, b.alpha)
    with pytest.raises(InputError, match="^backend: unknown 'nope'"):
        rasterize(*args, **kw, backend="nope")


def test_means2d_grad_populated_for_visible():
    scene = mixed_scene(400, 3, 24, 18, seed=6)
    out, grads = render_with_grads(scene, "cpu")
    g = grads["means2d"]
    assert g is not None and g.shape == (scene["means"].shape[0], 2)
    vis = out.radii > 0
    assert (g[~vis] == 0).all()
    assert (g[vis].abs().sum(1) > 0).float().mean() > 0.5  # most visible ones get a grad


def test_nothing_visible_gives_background():
    scene = mixed_scene(50, 3, 12, 10, seed=8)
    p = {k: scene[k].clone().requires_grad_(True) for k in PARAMS}
    flip = torch.diag(torch.tensor([1.0, 1.0, -1.0, 1.0], dtype=torch.float64))
    out = rasterize(p["means"], p["quats"], p["scales"], p["opacities"], p["features"],
                    flip @ scene["viewmat"] @ flip.new_tensor(
                        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 100.0], [0, 0, 0, 1]]),
                    scene["K"], 12, 10, background=p["background"], backend="cpu")
    assert (out.radii == 0).all()
    assert torch.allclose(out.image, p["background"].detach().expand(10, 12, 3))
    assert (out.alpha == 0).all()
    out.image.sum().backward()
    assert torch.allclose(p["background"].grad, torch.full((3,), 120.0, dtype=torch.float64))


def test_composite_functions_agree_directly():
    """The compositors also agree when called without rasterize(), including the
    reference's pixel-chunked, checkpointed path."""
    scene = mixed_scene(300, 5, 20, 14, seed=9)
    pr = project_gaussians(scene["means"], scene["quats"], scene["scales"],
                           scene["opacities"], scene["viewmat"], scene["K"], 20, 14)
    idx = pr.visible.nonzero().squeeze(1)
    order = idx[torch.argsort(pr.depths[idx], stable=True)]
    f1 = scene["features"].clone().requires_grad_(True)
    f2 = scene["features"].clone().requires_grad_(True)
    a = composite_cpu(pr.means2d, pr.conics, scene["opacities"], f1,
                      scene["background"], order, 20, 14)
    b = composite_reference(pr.means2d[order], pr.conics[order], scene["opacities"][order],
                            f2[order], scene["background"], 20, 14,
                            max_chunk_elems=20000)  # several pixel chunks
    assert torch.allclose(a[0], b[0], atol=1e-12) and torch.allclose(a[1], b[1], atol=1e-12)
    (a[0].sum() + a[1].sum()).backward()
    (b[0].sum() + b[1].sum()).backward()
    assert torch.allclose(f1.grad, f2.grad, atol=1e-12)


def test_gsplat_backend_needs_cuda_tensors():
    """backend='gsplat' on CPU tensors: one line from lrf.render.resolve_backend before gsplat is
    imported (tests/test_gpu.py covers CUDA without gsplat)."""
    scene = mixed_scene(20, 3, 8, 8, seed=10)
    args = [scene[k] for k in PARAMS[:5]]
    with pytest.raises(InputError, match="^gsplat: backend 'gsplat' renders on CUDA only"):
        rasterize(*args, scene["viewmat"], scene["K"], 8, 8, backend="gsplat")


def test_row_bands_give_identical_results():
    """Rendering in bands of image rows (bounded memory) changes nothing."""
    scene = mixed_scene(500, 4, 26, 19, seed=12)
    pr = project_gaussians(scene["means"], scene["quats"], scene["scales"],
                           scene["opacities"], scene["viewmat"], scene["K"], 26, 19)
    idx = pr.visible.nonzero().squeeze(1)
    order = idx[torch.argsort(pr.depths[idx], stable=True)]
    results = []
    for budget in (1 << 22, 300, 1):  # one band, several, one row per band
        inp = [t.detach().clone().requires_grad_(True)
               for t in (pr.means2d, pr.conics, scene["opacities"], scene["features"],
                         scene["background"])]
        img, alpha = composite_cpu(*inp, order, 26, 19, band_budget=budget)
        (img.square().sum() + alpha.sum()).backward()
        results.append([img, alpha] + [t.grad for t in inp])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


# --- fast-path specifics: exactness across layouts, both backward strategies, the
# hand-written projection backward, degenerate scenes ---------------------------------


def _composite_inputs(scene: dict, width: int, height: int):
    pr = project_gaussians(scene["means"], scene["quats"], scene["scales"],
                           scene["opacities"], scene["viewmat"], scene["K"], width, height)
    idx = pr.visible.nonzero().squeeze(1)
    order = idx[torch.argsort(pr.depths[idx], stable=True)]
    return pr, order


def _composite_with_grads(pr, scene, order, width, height, **kw):
    inp = [t.detach().clone().requires_grad_(True)
           for t in (pr.means2d, pr.conics, scene["opacities"], scene["features"],
                     scene["background"])]
    img, alpha = composite_cpu(*inp, order, width, height, **kw)
    g = torch.Generator().manual_seed(3)
    gi = torch.randn(img.shape, generator=g, dtype=torch.float64).to(img)
    (img * gi).sum().backward() if alpha is None else ((img * gi).sum() + alpha.sum()).backward()
    return [img, alpha] + [t.grad for t in inp]


@pytest.mark.parametrize("c", [3, 16])  # both backward strategies (scatter-adds, sparse)
def test_row_bands_many_seeds(c):
    """Transmittance and suffix sums are exact fixed-point sums, so rendering in
    bands of rows changes nothing: bit for bit with the sparse backward (its
    per-Gaussian sums run in generation order), to rounding with scatter-adds
    (they run in pixel order, which bands permute)."""
    for seed in (21, 22, 27):
        scene = mixed_scene(700, c, 30, 22, seed=seed)
        pr, order = _composite_inputs(scene, 30, 22)
        ref = _composite_with_grads(pr, scene, order, 30, 22, band_budget=1 << 22)
        for budget in (500, 1):
            other = _composite_with_grads(pr, scene, order, 30, 22, band_budget=budget)
            for a, b in zip(ref, other):
                if c > 4:
                    assert torch.equal(a, b)
                else:
                    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_runs_are_bit_repeatable():
    scene = mixed_scene(900, 32, 28, 21, seed=23, dtype=torch.float32)
    a = render_with_grads(scene, "cpu")
    b = render_with_grads(scene, "cpu")
    assert torch.equal(a[0].image, b[0].image) and torch.equal(a[0].alpha, b[0].alpha)
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k


def test_backward_strategies_agree(monkeypatch):
    """Few channels use per-channel dot products and scatter-adds, many use sparse
    kernels with a Gaussian-major CSR; both give the same gradients."""
    import lrf.render.cpu as cpu_mod

    scene = mixed_scene(800, 4, 27, 20, seed=24)
    pr, order = _composite_inputs(scene, 27, 20)
    few = _composite_with_grads(pr, scene, order, 27, 20)
    monkeypatch.setattr(cpu_mod, "_FEW_CHANNELS", 0)
    many = _composite_with_grads(pr, scene, order, 27, 20)
    for a, b in zip(few, many):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_fused_projection_backward_matches_autograd():
    """The cpu backend's hand-written projection backward (means2d, conics and
    depths cotangents) equals autograd through the same forward."""
    from lrf.render.project import project_gaussians_fused

    scene = mixed_scene(400, 3, 24, 18, seed=25)
    g = torch.Generator().manual_seed(5)
    cot = None
    grads = []
    for fn in (project_gaussians, project_gaussians_fused):
        p = {k: scene[k].clone().requires_grad_(True) for k in ("means", "quats", "scales")}
        pr = fn(p["means"], p["quats"], p["scales"], scene["opacities"], scene["viewmat"],
                scene["K"], 24, 18)
        if cot is None:
            cot = [torch.randn(t.shape, generator=g, dtype=torch.float64)
                   for t in (pr.means2d, pr.conics, pr.depths)]
        ((pr.means2d * cot[0]).sum() + (pr.conics * cot[1]).sum()
         + (pr.depths * cot[2]).sum()).backward()
        grads.append([p[k].grad for k in ("means", "quats", "scales")] + [pr.radii])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_single_huge_splat_matches_reference():
    """One Gaussian far larger than the image (every pixel, both backward paths)."""
    W, H = 14, 11
    K = torch.tensor([[12.0, 0, W / 2], [0, 12.0, H / 2], [0, 0, 1]], dtype=torch.float64)
    for c in (2, 9):
        scene = dict(means=torch.tensor([[0.1, -0.05, 2.0]], dtype=torch.float64),
                     quats=torch.tensor([[0.9, 0.1, -0.2, 0.3]], dtype=torch.float64),
                     scales=torch.tensor([[3.0, 2.0, 2.5]], dtype=torch.float64),
                     opacities=torch.tensor([0.8], dtype=torch.float64),
                     features=torch.randn(1, c, dtype=torch.float64,
                                          generator=torch.Generator().manual_seed(c)),
                     background=torch.linspace(-1, 1, c, dtype=torch.float64),
                     viewmat=torch.eye(4, dtype=torch.float64), K=K, width=W, height=H)
        ref, gref = render_with_grads(scene, "reference")
        out, gout = render_with_grads(scene, "cpu")
        assert (out.alpha > 0).all()
        assert rel_err(out.image, ref.image) < 1e-12
        for k in gref:
            assert rel_err(gout[k], gref[k]) < 1e-9, k


def test_empty_scene_and_zero_cotangents():
    """No Gaussians at all renders the background; an all-zero cotangent gives
    zero (not NaN) gradients."""
    bg = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64, requires_grad=True)
    K = torch.tensor([[10.0, 0, 4], [0, 10.0, 3], [0, 0, 1]], dtype=torch.float64)
    empty = [torch.zeros(0, k, dtype=torch.float64, requires_grad=True) for k in (3, 4, 3)]
    out = rasterize(*empty, torch.zeros(0, dtype=torch.float64), torch.zeros(0, 3).double(),
                    torch.eye(4, dtype=torch.float64), K, 8, 6, background=bg, backend="cpu")
    assert torch.equal(out.image, bg.detach().expand(6, 8, 3)) and (out.alpha == 0).all()
    out.image.sum().backward()
    assert torch.equal(bg.grad, torch.full((3,), 48.0, dtype=torch.float64))

    scene = mixed_scene(300, 3, 16, 12, seed=26)
    p = {k: scene[k].clone().requires_grad_(True) for k in PARAMS}
    out = rasterize(p["means"], p["quats"], p["scales"], p["opacities"], p["features"],
                    scene["viewmat"], scene["K"], 16, 12, background=p["background"],
                    backend="cpu")
    (out.image * 0.0).sum().backward()
    for k in PARAMS:
        assert p[k].grad is not None and (p[k].grad == 0).all(), k


# --- the compiled (numba) rasterizer: projection identical to the reference's, edge
# cases of compositing, repeatability across thread counts, the record-capacity retry ---


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_projection_is_bit_identical(dtype):
    """The cpu backend's compiled projection runs the reference's operations in the
    same order and dtype: every output is equal, not just close."""
    from lrf.render.project import project_gaussians_fused

    for scene in (mixed_scene(1500, 3, 40, 30, seed=31, dtype=dtype),
                  make_scene(5000, 3, 63, 47, seed=32, dtype=dtype)):
        args = [scene[k] for k in ("means", "quats", "scales", "opacities", "viewmat", "K",
                                   "width", "height")]
        a, b = project_gaussians(*args), project_gaussians_fused(*args)
        for k in ("means2d", "conics", "depths", "radii", "visible"):
            assert torch.equal(getattr(a, k), getattr(b, k)), k


def _stack_scene(ops: list[float]):
    """Identical round Gaussians one behind the other (opacities ``ops``, front
    first), centred on pixel (4, 4)."""
    W = H = 9
    n = len(ops)
    K = torch.tensor([[10.0, 0, W / 2], [0, 10.0, H / 2], [0, 0, 1]], dtype=torch.float64)
    z = 2.0 + 0.1 * torch.arange(n, dtype=torch.float64)
    return dict(means=torch.stack([torch.zeros(n, dtype=torch.float64)] * 2 + [z], 1),
                quats=torch.tensor([[1.0, 0, 0, 0]] * n, dtype=torch.float64),
                scales=0.2 * z[:, None].expand(n, 3).contiguous(),
                opacities=torch.tensor(ops, dtype=torch.float64),
                features=torch.randn(n, 3, dtype=torch.float64,
                                     generator=torch.Generator().manual_seed(n)),
                background=torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64),
                viewmat=torch.eye(4, dtype=torch.float64), K=K, width=W, height=H)


@pytest.mark.parametrize("front", [0.97, 0.9999])
def test_early_termination_and_saturation(front):
    """At the centre, T = prod (1 - alpha): behind a first Gaussian of alpha 0.97 (or
    0.9999, clamped to 0.99: no gradient to that pair's sigma and opacity), ones of
    alpha 0.97 take T to 9e-4 (3e-4), then 2.7e-5 (9e-6) <= 1e-4: that third pair and
    all later ones are excluded."""
    scene = _stack_scene([front, 0.97, 0.97, 0.97, 0.97])
    ref, gref = render_with_grads(scene, "reference")
    out, gout = render_with_grads(scene, "cpu")
    a0 = min(front, 0.99)
    f = scene["features"]
    want = a0 * f[0] + (1 - a0) * 0.97 * f[1] + (1 - a0) * 0.03 * scene["background"]
    assert torch.allclose(out.image[4, 4], want, rtol=1e-12)
    assert out.alpha[4, 4].item() == pytest.approx(1 - (1 - a0) * 0.03, abs=1e-12)
    assert rel_err(out.image, ref.image) < 1e-12
    for k in gref:
        assert rel_err(gout[k], gref[k]) < 1e-9, k


def test_culled_gaussians_get_zero_gradients():
    scene = mixed_scene(500, 4, 24, 18, seed=33)
    out, grads = render_with_grads(scene, "cpu")
    culled = out.radii == 0
    assert culled.sum() >= 4
    for k in ("means", "quats", "scales", "opacities", "features", "means2d"):
        assert (grads[k][culled] == 0).all(), k
        assert (grads[k][~culled] != 0).any(), k


def test_bit_repeatable_across_thread_counts():
    """Compiled loops run on one thread in a fixed order: torch's thread count changes
    no bit (the fault tests resume runs and compare bytes)."""
    scene = mixed_scene(1500, 8, 30, 22, seed=34, dtype=torch.float32)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            results.append(render_with_grads(scene, "cpu"))
    finally:
        torch.set_num_threads(before)
    for out, grads in results[1:]:
        assert torch.equal(out.image, results[0][0].image)
        assert torch.equal(out.alpha, results[0][0].alpha)
        for k in grads:
            assert torch.equal(grads[k], results[0][1][k]), k


def test_record_capacity_retry_changes_nothing(monkeypatch):
    """More composited pairs than the forward's estimate: it is called again with room
    for them, and the result is the same."""
    import lrf.render.cpu as cpu_mod

    scene = mixed_scene(600, 3, 26, 19, seed=35)
    ref = render_with_grads(scene, "cpu")
    calls = []
    real = cpu_mod._forward

    def spy(*args):
        calls.append(args[15])
        return real(*args)

    monkeypatch.setattr(cpu_mod, "_forward", spy)
    monkeypatch.setattr(cpu_mod, "_CAP_SCALE", 1e-3)
    out = render_with_grads(scene, "cpu")
    assert len(calls) > 1
    assert torch.equal(out[0].image, ref[0].image)
    for k in ref[1]:
        assert torch.equal(out[1][k], ref[1][k]), k


def test_compositor_rejects_oversized_images():
    z = torch.zeros(0, dtype=torch.float64)
    with pytest.raises(ValueError, match="exceeds"):
        composite_cpu(z.reshape(0, 2), z.reshape(0, 3), z, z.reshape(0, 1), z.new_zeros(1),
                      z.long(), 1 << 16, 4)
