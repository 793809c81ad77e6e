"""What both fine-tuning stages share beyond the training loop (lrf.train.loop): their command
line. Each stage's `main` reads top to bottom with these pieces: the parser, the scene lists
(each --scene with its --corr or --field), and, for --measure-only, the pretrained VAE beside
the tuned one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from lrf.cli import step_parser
from lrf.errors import InputError


def stage_parser(doc: str, paired: str, paired_help: str, config: str, renders: bool = False):
    """The stages' flags: the shared step flags (lrf.cli.step_parser) plus repeatable
    --scene/--<paired> pairs to tune on, --measure-scene/--measure-<paired> pairs only measured
    (never trained on), and --measure-only. `paired` is what a scene comes with: corr | field;
    `renders`: the stage renders fields (stage 3), so it takes --backend."""
    ap = step_parser(doc, scene=False, vae="required", cfg=config, renders=renders)
    ap.add_argument("--scene", action="extend", nargs="+", type=Path, help="tuning scene.json (repeatable)")
    ap.add_argument(f"--{paired}", action="extend", nargs="+", type=Path, help=paired_help)
    ap.add_argument("--measure-scene", action="extend", nargs="+", type=Path,
                    help="scene.json only measured (before/after), never trained on")
    ap.add_argument(f"--measure-{paired}", action="extend", nargs="+", type=Path)
    ap.add_argument("--measure-only", action="store_true",
                    help="no training: the pretrained VAE against the spec's tuned part on --measure-scene")
    return ap


def paired_scenes(scenes, others, flags: str, load: Callable) -> list:
    """load(scene, other) for each pair given on the command line; one line if they do not pair up."""
    scenes, others = scenes or [], others or []
    if len(scenes) != len(others):
        raise InputError(f"{flags}: {len(scenes)} scene file(s) but {len(others)} paired path(s); give them in pairs")
    return [load(s, o) for s, o in zip(scenes, others)]


def pretrained_and_tuned(spec: dict, parts: tuple[str, ...], out: Path, weights_dir: Path, device: str):
    """For --measure-only: (pretrained VAE, VAE with the tuned `parts`, the latter's spec). Each
    tuned part is the spec's own, else `out`/<part>.safetensors from an earlier run; the first part
    must exist, the others stay pretrained where neither gives one (stage 1's decoder)."""
    from lrf.vae.factory import load_vae

    base = {k: v for k, v in spec.items() if k not in parts}
    after = dict(base)
    for k, part in enumerate(parts):
        tuned = spec.get(part) or (out / f"{part}.safetensors")
        if Path(tuned).is_file():
            after[part] = str(tuned)
        elif k == 0 or spec.get(part):
            raise InputError(f"--measure-only: {tuned}: no tuned {part} (give it as the spec's '{part}')")
    return load_vae(base, weights_dir, device), load_vae(after, weights_dir, device), after
