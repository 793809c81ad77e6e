"""The conda environment and pyproject.toml must pin the same packages at the same versions."""
from __future__ import annotations

import re
import tomllib

import yaml

from conftest import REPO


def _pins(lines) -> dict[str, str]:
    out = {}
    for ln in lines:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-\[\]]+)\s*==\s*([^\s;]+)\s*", ln)
        assert m, f"not an exact pin: {ln!r}"
        out[m.group(1).lower()] = m.group(2)
    return out


def test_conda_env_matches_pyproject():
    proj = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    want = _pins(proj["dependencies"] + proj["optional-dependencies"]["test"])
    env = yaml.safe_load((REPO / "envs" / "lrf.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert _pins(pip) == want
    py = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert py == "python=3.11" and proj["requires-python"].startswith(">=3.11")


def test_every_rule_names_the_conda_env():
    import glob

    for f in glob.glob(str(REPO / "workflow" / "rules" / "*.smk")):
        text = open(f).read()
        n_rules = len(re.findall(r"^rule \w+:", text, re.M))
        n_rules -= len(re.findall(r"^rule download:", text, re.M))  # download runs wherever it is asked
        assert text.count("CONDA_ENV") >= n_rules, f
