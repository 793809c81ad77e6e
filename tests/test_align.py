"""The per-scene alignment (lrf.align): crops or whole views, and the step it ships chosen on
validation views carved out of the scene's training views (held-out views: tests/test_protocol.py)."""
from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from lrf.align import align_scene
from lrf.settings import AlignConfig
from test_finetune import TinyAE, same, state, tiny_field_scene


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest


def _align(a, out, **kw):
    vae, field = TinyAE(8, seed=1), copy.deepcopy(a.field)
    cfg = AlignConfig(**{**dict(steps=6, crop=0, checkpoint_every=0, seed=2, backend="cpu", device="cpu"), **kw})
    return vae, field, align_scene(vae, field, a.scene, None, cfg, out, progress=False)


def test_whole_views_train_on_every_pixel(tmp_path):
    a = tiny_field_scene(tmp_path / "img", 8)
    _, field, rep = _align(a, tmp_path / "whole", steps=8, lr=3e-3)
    curve = pd.read_csv(tmp_path / "whole" / "curve.csv")
    assert len(curve) == 8 and curve["l1"].iloc[-3:].mean() < curve["l1"].iloc[:3].mean()
    assert not same(field.tensors(), a.field.tensors())
    assert "validation" not in rep
    with pytest.raises(Exception, match="crop must be 0 \\(whole views\\) or a positive multiple of 8"):
        AlignConfig.from_overrides({"crop": 12})


def test_alignment_ships_the_best_validated_step_or_what_it_was_given(tmp_path):
    a = tiny_field_scene(tmp_path / "img", 8)   # two training views: one validates, one trains
    start_dec = state(TinyAE(8, seed=1).decoder)
    vae, field, rep = _align(a, tmp_path / "ruin", lr=10.0, features_lr=10.0, validate_every=2)
    sel = rep["validation"]
    assert sel["views"] == ["v2.png"] and [r["step"] for r in sel["rows"]] == [0, 2, 4, 6]
    assert sel["chosen_step"] == 0 and all(r["score"] < sel["rows"][0]["score"] for r in sel["rows"][1:])
    assert same(field.tensors(), a.field.tensors()) and same(state(vae.decoder), start_dec)
    # the best-scoring step is the one shipped; a run stopped after a checkpoint and resumed makes
    # the same choice with the same weights
    kw = dict(lr=1e-3, validate_every=2, checkpoint_every=2)
    v1, f1, r1 = _align(a, tmp_path / "full", **kw)
    assert r1["validation"]["chosen_step"] == max(r1["validation"]["rows"], key=lambda r: r["score"])["step"]
    vae, field = TinyAE(8, seed=1), copy.deepcopy(a.field)
    assert align_scene(vae, field, a.scene, None, AlignConfig(**{**dict(steps=6, crop=0, seed=2, backend="cpu",
                       device="cpu"), **kw}), tmp_path / "cut", progress=False, stop_at=4) is None
    v2, f2, r2 = _align(a, tmp_path / "cut", **kw)
    assert r2["validation"]["rows"][-1]["score"] == r1["validation"]["rows"][-1]["score"]
    assert same(f1.tensors(), f2.tensors()) and same(state(v1.decoder), state(v2.decoder))
