"""lrf.field: SH, losses, densification bookkeeping, fitting, exact resume, PLY, orbits."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lrf.field import (ChannelNorm, DensifyConfig, DensifyStrategy, FieldConfig, GaussianField, SH_C0,
                       d_ssim, eval_sh, field_loss, fit_field, init_features_from_tracks, load_field,
                       look_at_w2c, orbit_path, read_ply, save_ply, write_video)
from lrf.field.strategy import append_rows, keep_rows
from lrf.scene.model import Camera, Points, Scene

torch.set_num_threads(1)
W, H, C = 32, 24, 4


# ---------------------------------------------------------------- synthetic scene


def _cameras(n=8, w=W, h=H, radius=3.0):
    cams = []
    K = np.array([[30.0 * w / 32, 0, w / 2], [0, 30.0 * w / 32, h / 2], [0, 0, 1]])
    for k in range(n):
        th = 2 * np.pi * k / n
        pos = np.array([radius * np.cos(th), 0.8 + 0.3 * np.sin(3 * th), radius * np.sin(th)])
        w2c = look_at_w2c(pos, np.zeros(3), down=np.array([0.0, -1.0, 0.0]))
        cams.append(Camera(f"v{k:02d}.png", f"v{k:02d}.png", w, h, K.copy(), w2c))
    return cams


def _gt_field(n=6, c=C, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * 1.2
    scales = torch.log(0.12 + 0.15 * torch.rand(n, 3, generator=g))
    quats = torch.randn(n, 4, generator=g)
    op = torch.full((n,), 2.5)
    feats = torch.randn(n, c, generator=g)
    return GaussianField(means, scales, quats, op, feats / SH_C0)


def _scene(n_pts=48, noise=0.15, seed=0, w=W, h=H, c=C, n_gt=6):
    """Targets rendered from a few GT Gaussians + noisy 'SfM' points with projected tracks."""
    cams = _cameras(w=w, h=h)
    gt = _gt_field(n_gt, c, seed)
    with torch.no_grad():
        targets = {i: gt.render(cam.w2c, cam.K, w, h, backend="cpu").image.permute(2, 0, 1).contiguous()
                   for i, cam in enumerate(cams)}
    rng = np.random.default_rng(seed)
    xyz = gt.means.detach().numpy()[rng.integers(0, n_gt, n_pts)] + noise * rng.standard_normal((n_pts, 3))
    tp, ti, txy = [], [], []
    for i, cam in enumerate(cams):
        uv, z = cam.project(xyz)
        ok = np.nonzero((z > 0) & (uv[:, 0] >= 0) & (uv[:, 1] >= 0) & (uv[:, 0] < w) & (uv[:, 1] < h))[0]
        tp.append(ok), ti.append(np.full(len(ok), i)), txy.append(uv[ok])
    pts = Points(xyz, np.zeros((n_pts, 3), np.uint8), np.zeros(n_pts), np.arange(n_pts),
                 np.concatenate(tp), np.concatenate(ti), np.concatenate(txy))
    return Scene("synthetic", "blobs", cams, pts), targets, gt


def _cfg(**kw):
    base = dict(steps=150, densify=False, checkpoint_every=0, log_every=50, backend="cpu",
                device="cpu", seed=3)
    base.update(kw)
    return FieldConfig(**base)


# ---------------------------------------------------------------- SH


def test_sh_degree0_is_view_independent():
    f = GaussianField.random_init(10, 3, seed=1, sh_degree=2)
    with torch.no_grad():
        f.params["features_rest"].normal_()
        f.active_sh_degree = 0
        a = f.features_for(look_at_w2c([3, 0, 0], [0, 0, 0], [0, -1, 0]))
        b = f.features_for(look_at_w2c([0, 2, 3], [0, 0, 0], [0, -1, 0]))
    assert torch.equal(a, b)
    assert torch.allclose(a, SH_C0 * f.params["features_dc"])


def test_sh_basis_orthonormal_degrees_0_to_3():
    """Monte-Carlo-free check of every constant: the 16 basis functions are orthonormal."""
    n = 40000
    k = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * k / n
    phi = math.pi * (1 + 5 ** 0.5) * k
    r = torch.sqrt(1 - z * z)
    dirs = torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], -1)     # Fibonacci sphere
    for deg in range(4):
        m = (deg + 1) ** 2
        basis = eval_sh(deg, torch.eye(m, dtype=torch.float64).expand(n, m, m), dirs)   # [n, m]
        gram = 4 * math.pi * basis.T @ basis / n
        assert torch.allclose(gram, torch.eye(m, dtype=torch.float64), atol=2e-3), deg


def test_sh_band1_rotation_invariance_and_view_direction():
    """Band 1 is a dot product with a vector a: rotating a and the direction leaves it unchanged."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, dtype=torch.float64, generator=g)
    d = torch.nn.functional.normalize(torch.randn(5, 3, dtype=torch.float64, generator=g), dim=-1)
    R = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=g))[0]

    def coeffs(v):   # basis order (-y, z, -x) of the 3DGS convention
        return torch.tensor([[0.0], [-v[1]], [v[2]], [-v[0]]], dtype=torch.float64).expand(5, 4, 1)

    f = eval_sh(1, coeffs(a), d)[:, 0]
    assert torch.allclose(f, 0.4886025119029199 * d @ a)
    assert torch.allclose(eval_sh(1, coeffs(R @ a), d @ R.T)[:, 0], f)
    # features_for uses the direction from the camera centre to the Gaussian
    field = GaussianField(torch.tensor([[0.0, 0.0, 0.0]]), torch.zeros(1, 3), torch.tensor([[1.0, 0, 0, 0]]),
                          torch.zeros(1), torch.zeros(1, 1), coeffs(a)[:1, 1:].float())
    cam = np.array([0.0, 0.0, 4.0])
    out = field.features_for(look_at_w2c(cam, [0, 0, 0], [0, -1, 0]))
    assert torch.allclose(out[0, 0].double(), 0.4886025119029199 * torch.tensor([0, 0, -1.0]).double() @ a, atol=1e-6)


# ---------------------------------------------------------------- losses


def test_d_ssim_and_field_loss():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 20, 18, generator=g)
    assert float(d_ssim(x, x.clone())) == pytest.approx(0.0, abs=1e-6)
    z = x + 0.3 * torch.randn(7, 20, 18, generator=g)
    assert float(d_ssim(x, z, matmul=True)) == pytest.approx(float(d_ssim(x, z, matmul=False)), abs=1e-5)
    y = (x + 0.5 * torch.randn(7, 20, 18, generator=g)).requires_grad_()
    v = d_ssim(y, x, data_range=4.0)
    v.backward()
    assert v.item() > 0.05 and y.grad is not None and torch.isfinite(y.grad).all()
    targets = [torch.randn(3, 5, 6, generator=g) * torch.tensor([1.0, 5, 0.1])[:, None, None] + 2 for _ in range(3)]
    norm = ChannelNorm.from_targets(targets)
    allv = torch.cat([t.flatten(1) for t in targets], 1)
    assert torch.allclose(norm.mean, allv.mean(1), atol=1e-5)
    assert torch.allclose(norm.std, allv.std(1, unbiased=False), rtol=1e-4)
    assert float(field_loss(targets[0], targets[0], norm)) == pytest.approx(0.0, abs=1e-6)
    assert ChannelNorm.from_dict(norm.to_dict()).mean.tolist() == norm.mean.tolist()


# ---------------------------------------------------------------- init


def test_from_points_and_track_features():
    scene, _, _ = _scene()
    f = GaussianField.from_points(scene.points.xyz, np.zeros((len(scene.points), 2)))
    assert torch.allclose(f.quats, torch.tensor([1.0, 0, 0, 0]).expand_as(f.quats))
    assert torch.allclose(f.opacities, torch.full((len(f),), 0.1))
    assert (f.scales > 0).all() and torch.equal(f.scales[:, 0], f.scales[:, 1])
    # targets that are linear in the pixel position: bilinear sampling is exact, so each
    # observation reads back its own coordinate on the (half-resolution) target grid
    w2, h2 = W // 2, H // 2
    ramp = torch.stack([(torch.arange(w2) + 0.5).expand(h2, w2), (torch.arange(h2)[:, None] + 0.5).expand(h2, w2)])
    pts = scene.points
    inner = (pts.track_xy[:, 0] > 2) & (pts.track_xy[:, 0] < W - 2) & (pts.track_xy[:, 1] > 2) & (pts.track_xy[:, 1] < H - 2)
    one = Points(pts.xyz, pts.rgb, pts.error, pts.ids, pts.track_point[inner], pts.track_image[inner], pts.track_xy[inner])
    feats = init_features_from_tracks(one, scene, {i: ramp for i in range(len(scene.cameras))})
    for p in range(len(pts)):
        obs = one.track_xy[one.track_point == p]
        if len(obs):
            assert np.allclose(feats[p].numpy(), obs.mean(0) / 2, atol=1e-4)
    # a point without tracks falls back to projecting it into the views
    none = Points(pts.xyz, pts.rgb, pts.error, pts.ids, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2)))
    const = {i: torch.full((2, h2, w2), float(i)) for i in range(len(scene.cameras))}
    fb = init_features_from_tracks(none, scene, const)
    seen = []
    for i, cam in enumerate(scene.cameras):
        uv, z = cam.project(pts.xyz[:1])
        if z[0] > 0 and 0 <= uv[0, 0] < W and 0 <= uv[0, 1] < H:
            seen.append(i)
    assert np.allclose(fb[0].numpy(), np.mean(seen), atol=1e-5)


# ---------------------------------------------------------------- densification bookkeeping


def _check_aligned(field, opt):
    for g in opt.param_groups:
        p = g["params"][0]
        assert p is field.params[g["name"]]
        st = opt.state[p]
        for k in ("exp_avg", "exp_avg_sq"):
            assert st[k].shape == p.shape, (g["name"], k)


def test_densify_clone_split_prune_keep_adam_rows_aligned():
    n = 10
    means = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)
    scales = torch.full((n, 3), math.log(0.001))
    scales[5:] = math.log(0.5)                          # 5..9 large
    op = torch.full((n,), 2.0)
    op[[3, 8]] = -10.0                                  # 3 and 8 nearly transparent
    field = GaussianField(means, scales, torch.tensor([1.0, 0, 0, 0]).repeat(n, 1), op,
                          torch.randn(n, 5), torch.zeros(n, 3, 5))
    opt = torch.optim.Adam([{"params": [field.params[k]], "name": k} for k in field.params.keys()], lr=1e-3)
    for p in field.params.values():
        p.grad = torch.ones_like(p)
    opt.step()
    for p in field.params.values():   # moments that identify their row
        rows = torch.arange(n, dtype=torch.float32).view((n,) + (1,) * (p.dim() - 1)).expand_as(p)
        opt.state[p]["exp_avg"].copy_(rows + 1)
    _check_aligned(field, opt)
    before = field.params["means"].detach().clone()
    big = field.scales[5, 0].item()

    strat = DensifyStrategy(DensifyConfig(refine_start=0, refine_every=1, reset_every=1000, grow_grad2d=1e-3,
                                          grow_scale3d=0.01, prune_scale3d=10.0), scene_scale=1.0)
    grad = torch.zeros(n, 2)
    grad[[0, 1, 5, 6]] = 1.0                            # high: clone 0,1 (small), split 5,6 (large)
    grad[[2, 7]] = 1e-6                                 # low
    m2d = torch.zeros(n, 2)
    m2d.grad = grad / torch.tensor([W / 2, H / 2])      # NDC scaling brings these back to 1.0
    out = SimpleNamespace(means2d=m2d, radii=torch.full((n,), 3, dtype=torch.int32))
    out.radii[9] = 0                                    # invisible: no accumulation
    stats = strat.step_post_backward(field, opt, step=1, out=out, width=W, height=H)
    assert stats["cloned"] == 2 and stats["split"] == 2 and stats["pruned"] == 2
    assert len(field) == n + 2 + 2 - 2
    _check_aligned(field, opt)
    # surviving originals keep their moments, in order; new rows start at zero
    ea = opt.state[field.params["means"]]["exp_avg"][:, 0]
    survivors = [i for i in range(n) if i not in (3, 5, 6, 8)]
    assert ea[:len(survivors)].tolist() == [i + 1.0 for i in survivors]
    assert torch.all(ea[len(survivors):] == 0)
    # clones copy, splits are centred on their parent with scale / 1.6
    m = field.params["means"].detach()
    assert torch.equal(m[len(survivors):len(survivors) + 2], before[[0, 1]])
    sp_scales = field.scales[-4:]
    assert torch.allclose(sp_scales, torch.full_like(sp_scales, big / 1.6))
    assert strat.grad2d.shape == (len(field),) and float(strat.grad2d.sum()) == 0
    # a step with the new rows goes through
    for p in field.params.values():
        p.grad = torch.ones_like(p)
    opt.step()
    _check_aligned(field, opt)
    # plain keep/append edits
    keep_rows(field.params, opt, torch.arange(len(field)) % 2 == 0)
    _check_aligned(field, opt)
    append_rows(field.params, opt, {k: v.data[:3] for k, v in field.params.items()})
    _check_aligned(field, opt)
    # opacity reset clamps and zeroes the opacity moments only
    strat.reset_opacity(field, opt)
    assert field.opacities.max().item() <= 0.01 + 1e-6
    assert float(opt.state[field.params["opacities"]]["exp_avg"].abs().sum()) == 0
    _check_aligned(field, opt)


def test_densify_respects_max_gaussians():
    n = 8
    field = GaussianField(torch.randn(n, 3), torch.full((n, 3), math.log(0.001)),
                          torch.tensor([1.0, 0, 0, 0]).repeat(n, 1), torch.full((n,), 2.0), torch.randn(n, 2))
    opt = torch.optim.Adam([{"params": [field.params[k]], "name": k} for k in field.params.keys()])
    strat = DensifyStrategy(DensifyConfig(refine_start=0, refine_every=1, grow_grad2d=1e-3, max_gaussians=11))
    m2d = torch.zeros(n, 2)
    m2d.grad = torch.linspace(0.1, 1.0, n)[:, None].repeat(1, 2)
    stats = strat.step_post_backward(field, opt, 1, SimpleNamespace(means2d=m2d, radii=torch.ones(n)), W, H)
    assert len(field) == 11 and stats["cloned"] == 3
    assert torch.equal(field.params["means"].data[8:], field.params["means"].data[5:8])   # the 3 strongest


# ---------------------------------------------------------------- fitting


def test_fit_lowers_loss(tmp_path):
    scene, targets, _ = _scene()
    res = fit_field(scene, targets, _cfg(), tmp_path, progress=False)
    assert res.completed and res.final_loss < 0.5 * res.initial_loss, (res.initial_loss, res.final_loss)
    for name in ("field.safetensors", "field.json", "train_log.csv"):
        assert (tmp_path / name).exists()
    assert not (tmp_path / "ckpt.safetensors").exists()
    f2 = load_field(tmp_path / "field.safetensors")
    for k in f2.params.keys():
        assert torch.equal(f2.params[k], res.field.params[k])
    meta = json.loads((tmp_path / "field.json").read_text())
    assert meta["num_gaussians"] == len(res.field) and meta["channels"] == C and meta["final_loss"] == res.final_loss
    assert meta["background_value"] is None and len(meta["channel_norm"]["mean"]) == C
    lines = (tmp_path / "train_log.csv").read_text().splitlines()
    assert lines[0] == "step,loss,n_gaussians,seconds" and len(lines) == 1 + 3


def _resume_cfg(**kw):
    return _cfg(steps=40, checkpoint_every=10, log_every=5, densify=True, refine_start=4, refine_every=5,
                reset_every=30, grow_grad2d=1e-5, grow_scale3d=0.05, max_gaussians=120, sh_degree=1,
                sh_degree_interval=15, eval_loss=False, keep_checkpoint=True, **kw)


def test_resume_is_bit_exact(tmp_path):
    scene, targets, _ = _scene(n_pts=30)
    full = fit_field(scene, targets, _resume_cfg(), tmp_path / "a", progress=False)
    part = fit_field(scene, targets, _resume_cfg(), tmp_path / "b", progress=False, stop_at=25)
    assert not part.completed and part.steps == 25
    torch.manual_seed(12345)
    np.random.seed(999)                                   # a fresh process would have other states
    rest = fit_field(scene, targets, _resume_cfg(), tmp_path / "b", progress=False)
    assert rest.resumed_from == 20 and rest.completed
    assert len(full.field) != 30                          # densification really happened
    for k in full.field.params.keys():
        assert torch.equal(full.field.params[k], rest.field.params[k]), k
    assert (tmp_path / "a" / "train_log.csv").read_text().split("\n")[0] == "step,loss,n_gaussians,seconds"
    a = np.loadtxt(tmp_path / "a" / "train_log.csv", delimiter=",", skiprows=1, ndmin=2)
    b = np.loadtxt(tmp_path / "b" / "train_log.csv", delimiter=",", skiprows=1, ndmin=2)
    assert np.array_equal(a[:, :3], b[:, :3])


def test_corrupt_checkpoint_is_ignored(tmp_path):
    scene, targets, _ = _scene(n_pts=20)
    cfg = _cfg(steps=12, checkpoint_every=5, eval_loss=False)
    fit_field(scene, targets, cfg, tmp_path, progress=False, stop_at=11)
    ck = tmp_path / "ckpt.safetensors"
    raw = ck.read_bytes()
    ck.write_bytes(raw[: len(raw) // 2])
    with pytest.warns(RuntimeWarning, match="ignoring checkpoint"):
        res = fit_field(scene, targets, cfg, tmp_path, progress=False)
    assert res.resumed_from is None and res.completed
    # a checkpoint from different settings is not resumed either
    fit_field(scene, targets, cfg, tmp_path / "c", progress=False, stop_at=6)
    with pytest.warns(RuntimeWarning, match="different settings"):
        res = fit_field(scene, targets, _cfg(steps=12, checkpoint_every=5, eval_loss=False, seed=4),
                        tmp_path / "c", progress=False)
    assert res.resumed_from is None


def test_targets_below_camera_resolution_and_random_init(tmp_path):
    """Cameras at 2x the target resolution: K and tracks are rescaled exactly, so the fit is
    bit-identical to one with cameras at the target resolution."""
    scene, targets, _ = _scene(n_pts=20)
    pts = scene.points
    big = Scene("synthetic", "big", [c.scaled(2.0) for c in scene.cameras],
                Points(pts.xyz, pts.rgb, pts.error, pts.ids, pts.track_point, pts.track_image, pts.track_xy * 2))
    cfg = _cfg(steps=8, eval_loss=False)
    a = fit_field(scene, targets, cfg, tmp_path / "a", progress=False)
    b = fit_field(big, targets, cfg, tmp_path / "b", progress=False)
    for k in a.field.params.keys():
        assert torch.equal(a.field.params[k], b.field.params[k]), k
    nopts = Scene("synthetic", "nopts", scene.cameras, None)
    with pytest.warns(RuntimeWarning, match="random init"):
        r = fit_field(nopts, targets, _cfg(steps=3, random_init_n=50, background="mean"), tmp_path / "r",
                      progress=False)
    assert len(r.field) == 50 and np.isfinite(r.final_loss)
    bg = json.loads((tmp_path / "r" / "field.json").read_text())["background_value"]
    assert np.allclose(bg, r.norm.mean.numpy())


# ---------------------------------------------------------------- PLY, orbit, video


def test_ply_round_trip(tmp_path):
    for deg, c, rgb in ((2, 5, False), (0, 3, True)):
        f = GaussianField.random_init(17, c, seed=2, sh_degree=deg, rgb_offset=rgb)
        with torch.no_grad():
            for p in f.params.values():
                p.add_(torch.randn_like(p))
        save_ply(f, tmp_path / "pc.ply")
        header = (tmp_path / "pc.ply").read_bytes().split(b"end_header")[0].decode()
        assert "property float f_dc_0" in header and "property float rot_3" in header
        assert header.count("f_rest_") == c * ((deg + 1) ** 2 - 1)
        g = read_ply(tmp_path / "pc.ply")
        assert g.rgb_offset == rgb and g.sh_degree == deg
        for k in f.params.keys():
            assert torch.equal(f.params[k], g.params[k]), k


def test_orbit_and_video(tmp_path):
    scene, _, _ = _scene(n_pts=5)
    path = orbit_path(scene, 12)
    assert path.shape == (12, 4, 4)
    radius = np.mean([np.linalg.norm(c.center[[0, 2]]) for c in scene.cameras])
    for w2c in path:
        R = w2c[:3, :3]
        assert np.allclose(R @ R.T, np.eye(3), atol=1e-9) and np.linalg.det(R) > 0
        cam = w2c[:3, :3] @ np.zeros(3) + w2c[:3, 3]        # the origin is the focus: straight ahead
        assert cam[2] > 0 and np.allclose(cam[:2], 0, atol=1e-6)
        centre = -R.T @ w2c[:3, 3]
        assert abs(np.linalg.norm(centre[[0, 2]]) - radius) < 0.1 * radius
        assert R[1] @ np.array([0, -1.0, 0]) > 0.9              # the rig's down stays down on screen
    frames = [np.full((8, 10, 3), k / 5, np.float32) for k in range(5)]
    out = write_video(frames, tmp_path / "orbit.gif", fps=10)
    from PIL import Image

    with Image.open(out) as im:
        assert im.n_frames == 5 and im.size == (10, 8)
    out = write_video([(f * 255).astype(np.uint8) for f in frames], tmp_path / "orbit.webp")
    with Image.open(out) as im:
        assert im.n_frames == 5


def test_eps2d_is_part_of_the_field(tmp_path):
    """The screen blur a field is fitted with travels with it: a saved field renders exactly as it
    did in training, and a sharper blur really changes the render (fields saved before the
    setting existed load with 3DGS' 0.3)."""
    scene, targets, _ = _scene()
    res = fit_field(scene, targets, _cfg(steps=5, eps2d=0.1), tmp_path, progress=False)
    f2 = load_field(tmp_path / "field.safetensors")
    assert res.field.eps2d == f2.eps2d == 0.1
    cam = scene.cameras[0]
    a = f2.render(cam.w2c, cam.K, cam.width, cam.height).image
    assert torch.equal(a, res.field.render(cam.w2c, cam.K, cam.width, cam.height).image)
    f2.eps2d = 0.3
    assert not torch.allclose(a, f2.render(cam.w2c, cam.K, cam.width, cam.height).image, atol=1e-4)
    from safetensors.torch import save

    (tmp_path / "old.safetensors").write_bytes(save(f2.tensors(), metadata={"rgb_offset": "false"}))
    assert load_field(tmp_path / "old.safetensors").eps2d == 0.3
