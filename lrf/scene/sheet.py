"""The scene sheet (config/scenes.tsv): one row per scene, read and checked in one place, for the
workflow (workflow/rules/common.smk) and the tests alike.

Columns: dataset, scene, format, path, images, poses, max_side, downscale, max_images (see
config/schemas/scenes.schema.yaml); empty cells are None, a scene's key is "dataset/scene".
"""
from __future__ import annotations

from pathlib import Path

SCHEMA = Path(__file__).resolve().parents[2] / "config" / "schemas" / "scenes.schema.yaml"
INTS, FLOATS = ("max_side", "max_images"), ("downscale",)


def split_key(key: str) -> tuple[str, str]:
    """"dataset/scene" -> (dataset, scene)."""
    dataset, _, scene = key.partition("/")
    return dataset, scene


def read_sheet(path: str | Path, schema: str | Path = SCHEMA) -> dict[str, dict]:
    """{key: row} in the sheet's order. A row that breaks the schema raises jsonschema's
    ValidationError naming the file, the line, the scene and the value; a scene listed twice,
    ValueError."""
    import jsonschema
    import pandas as pd
    import yaml

    validator = jsonschema.Draft202012Validator(yaml.safe_load(Path(schema).read_text()))
    sheet = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    rows: dict[str, dict] = {}
    for n, rec in enumerate(sheet.to_dict("records"), start=2):  # line 1 is the header
        row = {k: (v if v != "" else None) for k, v in rec.items()}
        try:
            for k in INTS:
                if row.get(k) is not None:
                    row[k] = int(row[k])
            for k in FLOATS:
                if row.get(k) is not None:
                    row[k] = float(row[k])
        except ValueError as e:
            raise ValueError(f"{path}: line {n}: {e}") from None
        err = jsonschema.exceptions.best_match(validator.iter_errors(row))
        if err is not None:
            where = "/".join(str(p) for p in err.absolute_path) or "row"
            raise jsonschema.ValidationError(
                f"{path}: line {n} ({row.get('dataset')}/{row.get('scene')}): {where}: {err.message}")
        key = f"{row['dataset']}/{row['scene']}"
        if key in rows:
            raise ValueError(f"{path}: scene {key} is listed twice")
        rows[key] = row
    return rows
