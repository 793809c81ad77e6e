"""Settings are checked before the DAG starts, and method names have one source (lrf/methods.py).

Every override section (field.latent, field.rgb, stage1, stage3, align) is checked against its
dataclass in lrf.settings by workflow/rules/common.smk: a typo or a wrong type fails `snakemake -n`
with one line naming the section, not the stage hours later.
"""
from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, lrf_env, make_workflow, snakemake_cmd
from lrf.methods import METHODS, field_name
from lrf.settings import (SECTIONS, AlignConfig, DensifyConfig, FieldConfig, Stage1Config, Stage3Config,
                          check_config)

DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
SCHEMA = yaml.safe_load((REPO / "config" / "schemas" / "config.schema.yaml").read_text())


def _with(section: str, key: str, value) -> dict:
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    node = cfg
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[key] = value
    return cfg


@pytest.mark.parametrize("preset", [None, "paper.yaml", "cross-dataset.yaml"])
def test_default_and_presets_pass(preset):
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    if preset:
        cfg.update(yaml.safe_load((REPO / "config" / "presets" / preset).read_text()))
    check_config(cfg)


def test_cross_dataset_preset_selects_the_corpus(shared_dir):
    """Tune on six scenes, evaluate on three others; `select` (the corpus group) holds all nine,
    each a row of the sheet whose folder exists."""
    import pandas as pd

    preset = yaml.safe_load((REPO / "config" / "presets" / "cross-dataset.yaml").read_text())
    tune, ev = preset["protocol"]["tune"], preset["protocol"]["eval"]
    assert tune == ["nerf_synthetic/lego", "instant-ngp/fox", "nerd/statue-of-liberty", "llff/flower",
                    "nerf_synthetic/mic", "middlebury/temple-sparse-ring"]
    assert ev == ["llff/fern", "strecha/herz-jesu-p25", "nerd/mary-rose"]
    corpus = DEFAULT["groups"][preset["select"]]
    assert preset["select"] == "corpus" and sorted(corpus) == sorted(tune + ev) and len(set(corpus)) == 9
    sheet = pd.read_csv(REPO / "config" / "scenes.tsv", sep="\t", dtype=str, keep_default_na=False)
    rows = {f"{r.dataset}/{r.scene}": r for r in sheet.itertuples()}
    assert set(corpus) <= set(rows)
    for key in corpus:
        assert (shared_dir / "data" / rows[key].path).is_dir(), key
    assert rows["middlebury/temple-sparse-ring"].format == "middlebury"


# (section, a misspelt key, a key with a value of the wrong type)
CASES = [("field.latent", "stpes", ("steps", "many")),
         ("field.rgb", "refine_strat", ("max_gaussians", 1.5)),
         ("stage1", "stpes", ("crop", "96")),
         ("stage3", "clean_fractoin", ("clean_fraction", True)),
         ("align", "tune_decodr", ("tune_decoder", 1))]


def test_every_override_section_is_checked():
    assert set(SECTIONS) == {c[0] for c in CASES}
    assert SECTIONS == {"field.latent": FieldConfig, "field.rgb": FieldConfig, "stage1": Stage1Config,
                        "stage3": Stage3Config, "align": AlignConfig}


@pytest.mark.parametrize("section,typo,wrong", CASES, ids=[c[0] for c in CASES])
def test_typo_and_wrong_type_fail_by_name(section, typo, wrong):
    with pytest.raises(ValueError, match=rf"^config {section}: \w+: unknown key\(s\) {typo}; known: "):
        check_config(_with(section, typo, 1))
    key, value = wrong
    with pytest.raises(ValueError, match=rf"^config {section}: \w+: {key} must be \w+, got "):
        check_config(_with(section, key, value))


def test_renamed_key_names_the_new_one():
    """A run's length is `steps` in every trainer's settings; a config that still says
    `iterations` (the field's old name) fails with a line naming the new key."""
    with pytest.raises(ValueError, match=r"^config field.latent: FieldConfig: 'iterations' is now called 'steps'"):
        check_config(_with("field.latent", "iterations", 2000))
    for cls in (FieldConfig, Stage1Config, Stage3Config, AlignConfig):
        names = {f.name for f in dataclasses.fields(cls)}
        assert "steps" in names and "iterations" not in names, cls


def test_stage_ranges_are_checked_too():
    with pytest.raises(ValueError, match=r"^config stage1: Stage1Config: crop must be a positive multiple of 8"):
        check_config(_with("stage1", "crop", 90))


@pytest.mark.parametrize("section,typo", [(c[0], c[1]) for c in CASES], ids=[c[0] for c in CASES])
def test_typo_fails_snakemake_dry_run(tmp_path, shared_dir, section, typo):
    """The real thing: `snakemake -n` stops before the DAG, naming the section and the key."""
    cfg = _with(section, typo, 1)
    wf = make_workflow(tmp_path / "wf", [], shared_dir, **{k: cfg[k] for k in ("field", "stage1", "stage3", "align")
                                                            if k in cfg})
    r = subprocess.run(snakemake_cmd(wf, "-n", "--cores", "1"), cwd=wf, env=lrf_env(shared_dir),
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-2000:]
    assert f"config {section}: " in out and f"unknown key(s) {typo}" in out, out[-2000:]
    assert "rule " not in r.stdout, out[-2000:]   # no job was planned


# ----------------------------------------------------------------------------- defaults
def test_densify_schedule_has_one_set_of_defaults():
    """FieldConfig is a DensifyConfig (its schedule's defaults live there only), and
    densify_config() carries every schedule setting over."""
    assert issubclass(FieldConfig, DensifyConfig)
    names = [f.name for f in dataclasses.fields(DensifyConfig)]
    field_own = {f.name for f in dataclasses.fields(FieldConfig)} - set(names)
    assert not field_own & set(vars(DensifyConfig)["__annotations__"])
    odd = FieldConfig(**{k: getattr(DensifyConfig(), k) * 2 for k in names})
    assert {k: getattr(odd.densify_config(), k) for k in names} == {k: getattr(DensifyConfig(), k) * 2 for k in names}
    assert "refine_start" not in FieldConfig.__dict__.get("__annotations__", {})


# ----------------------------------------------------------------------------- method names
def test_schema_method_enums_are_lrf_methods():
    props = SCHEMA["properties"]
    assert props["methods"]["items"]["enum"] == list(METHODS)
    orbit = props["orbit"]["properties"]["methods"]["items"]["enum"]
    assert orbit == [m for m in METHODS if METHODS[m]["kind"] != "ceiling"]


def test_config_and_report_use_known_methods():
    from lrf.report.collect import GRID_METHODS, METHOD_ORDER

    assert METHOD_ORDER == tuple(METHODS)
    assert set(GRID_METHODS) <= set(METHODS)
    assert set(DEFAULT["methods"]) <= set(METHODS)
    assert set(DEFAULT["orbit"]["methods"]) <= set(METHODS)


def test_rule_constraints_come_from_lrf_methods():
    """No rule file spells a method name in a wildcard constraint: they are built from METHODS."""
    rules = (REPO / "workflow" / "rules")
    for smk in rules.glob("*.smk"):
        for line in smk.read_text().splitlines():
            if line.strip().startswith(("method=", "field=")) and "|" in line:
                pytest.fail(f"{smk.name}: a literal method list in a constraint: {line.strip()}")
    text = (rules / "common.smk").read_text()
    assert 'FIELDS = sorted({field_name(m) for m in METHODS if METHODS[m]["kind"] != "ceiling"})' in text
    assert sorted({field_name(m) for m in METHODS if METHODS[m]["kind"] != "ceiling"}) == ["enc", "rgb-3dgs", "vanilla"]
