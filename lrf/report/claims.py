"""The paper's abstract, claim by claim, against this run's numbers; and stage 1/3 per-scene tables.

Every verdict is computed here from the measured numbers, per split, by one rule (RULE):
a part of a claim HOLDS when the mean change over the scenes measured is in the claimed
direction and no scene moves against it by more than the tolerance (TOLERANCE); it DOES NOT
HOLD otherwise; a part with no scene that has both numbers (method not run, run failed, no
stage-1 consistency.json) is NOT MEASURED. A claim holds when all its parts hold, does not
hold when one part does not, and is not measured otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lrf.report.collect import Run, _is_num, split_of
from lrf.report.tables import Table

HOLDS, FAILS, UNMEASURED = "holds", "does not hold", "not measured"
# How far one scene may move against the claimed direction while the claim still holds.
TOLERANCE = {"psnr": 0.1, "ratio": 0.01}
UNIT = {"psnr": "dB", "ratio": ""}
RULE = ("holds = the mean change over the scenes measured is in the claimed direction AND no scene moves "
        "against it by more than {psnr} dB (PSNR) or {ratio} (matched/random L1 ratio); does not hold = "
        "otherwise; not measured = no scene of the split has both numbers. A claim holds when all its "
        "parts hold.").format(**TOLERANCE)
SPLIT_NAME = {"in-domain": "in-domain (held-out views of the tuning scenes)",
              "cross-dataset": "cross-dataset (scenes the VAE never saw)", "-": "all scenes (no protocol)"}


@dataclass(frozen=True)
class Comparison:
    """One measurable part of a claim: `quantity` goes from `before` to `after` in direction `better`."""

    quantity: str      # "psnr" (held-out, per method) or "ratio" (stage 1 held-out consistency)
    before: str        # method name, or "pretrained encoder"
    after: str
    better: str        # "higher" | "lower"

    @property
    def label(self) -> str:
        if self.quantity == "ratio":
            return "held-out matched/random latent L1 ratio, pretrained -> stage-1 encoder (lower is better)"
        return f"held-out PSNR, {self.before} -> {self.after}"


@dataclass(frozen=True)
class Claim:
    key: str
    text: str
    parts: tuple[Comparison, ...]
    splits: tuple[str, ...] = ("in-domain", "cross-dataset", "-")


CLAIMS = (
    Claim("a", "vanilla latent 3DGS falls short of the VAE ceiling",
          (Comparison("psnr", "vanilla", "vae-ceiling", "higher"),)),
    Claim("b", "stage 1 (correspondence-aware encoder) raises 3D consistency and held-out PSNR",
          (Comparison("ratio", "pretrained encoder", "stage-1 encoder", "lower"),
           Comparison("psnr", "vanilla", "enc", "higher"))),
    Claim("c", "stage 3 (VAE-RF alignment of the decoder) raises held-out PSNR further",
          (Comparison("psnr", "enc", "full", "higher"), Comparison("psnr", "vanilla", "dec", "higher"))),
    Claim("d", "the gains hold on datasets the VAE never saw",
          (Comparison("psnr", "vanilla", "full", "higher"),), ("cross-dataset",)),
)


@dataclass
class PartResult:
    claim: Claim
    part: Comparison
    split: str
    scenes: list[str]                                       # every scene of the split
    values: dict[str, tuple[float, float]] = field(default_factory=dict)   # scene -> (before, after)
    why_missing: str = ""

    def gain(self, b: float, a: float) -> float:
        """The change in the claimed direction (positive = as claimed)."""
        return (a - b) if self.part.better == "higher" else (b - a)

    @property
    def verdict(self) -> str:
        if not self.values:
            return UNMEASURED
        g = [self.gain(b, a) for b, a in self.values.values()]
        return HOLDS if np.mean(g) > 0 and min(g) >= -TOLERANCE[self.part.quantity] else FAILS

    def evidence(self) -> str:
        if not self.values:
            return f"{self.part.label}: {self.why_missing or 'no scene has both numbers'}"
        u = UNIT[self.part.quantity]
        b = np.mean([v[0] for v in self.values.values()])
        a = np.mean([v[1] for v in self.values.values()])
        g = {s: self.gain(*v) for s, v in self.values.items()}
        worst = min(g, key=g.get)
        n, k = len(g), sum(x > 0 for x in g.values())
        return (f"{self.part.label}: mean {_n(b)} -> {_n(a)} ({_signed(a - b)}{' ' + u if u else ''}) over "
                f"{n} of {len(self.scenes)} scenes; as claimed on {k} of {n}; worst {worst} "
                f"({_signed(self.values[worst][1] - self.values[worst][0])})")


def _n(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"


def _signed(v: float) -> str:
    return ("+" if v >= 0 else "−") + _n(abs(v))


def consistency_ratios(doc: dict | None) -> dict[str, tuple[float | None, float | None]]:
    """scene -> (before, after) held-out matched/random ratio from stage 1's consistency.json
    (`tuning` holds the tuning scenes, `measure` the scenes it never trained on)."""
    out = {}
    if not isinstance(doc, dict):
        return out
    for section in ("tuning", "measure"):
        for key, d in (doc.get(section) or {}).items():
            held = (d or {}).get("heldout") if isinstance(d, dict) else None
            if isinstance(held, dict):
                out[key] = tuple(_ratio(held.get(w)) for w in ("before", "after"))
    return out


def _ratio(x) -> float | None:
    if not isinstance(x, dict):
        return None
    r = x.get("ratio")
    if _is_num(r):
        return float(r)
    if _is_num(x.get("l1")) and _is_num(x.get("l1_random")) and x["l1_random"] > 0:
        return float(x["l1"]) / float(x["l1_random"])
    return None


def check_claims(runs: list[Run], scenes: list[str], methods: list[str], protocol: dict | None,
                 consistency: dict | None) -> list[PartResult]:
    """One PartResult per (claim, split, part), in CLAIMS order."""
    by = {(r.key, r.method): r for r in runs}
    split = {k: split_of(k, protocol) for k in scenes}
    ratios = consistency_ratios(consistency)
    out = []
    no_protocol = set(split.values()) <= {"-"}
    for claim in CLAIMS:
        for sp in ("-",) if no_protocol and len(claim.splits) == 1 else claim.splits:
            members = [k for k in scenes if split[k] == sp] if len(claim.splits) > 1 else \
                [k for k in scenes if split[k] == sp and not no_protocol]
            if not members and len(claim.splits) > 1:
                continue  # (a)-(c) are checked on the splits this run has; (d) always says something
            for part in claim.parts:
                res = PartResult(claim, part, sp, members)
                if not members:
                    res.why_missing = ("no protocol: no scene is known to be unseen by the VAE"
                                       if no_protocol else "no scene outside the protocol's tuning scenes")
                elif part.quantity == "ratio":
                    if consistency is None:
                        res.why_missing = "no stage 1 consistency.json"
                    for k in members:
                        b, a = ratios.get(k, (None, None))
                        if b is not None and a is not None:
                            res.values[k] = (b, a)
                else:
                    absent = [m for m in (part.before, part.after) if m not in methods]
                    if absent:
                        res.why_missing = f"{' and '.join(absent)} not in this run's methods"
                    for k in members:
                        rb, ra = by.get((k, part.before)), by.get((k, part.after))
                        b = rb.mean("psnr") if rb is not None and rb.status == "ok" else None
                        a = ra.mean("psnr") if ra is not None and ra.status == "ok" else None
                        if b is not None and a is not None:
                            res.values[k] = (b, a)
                    if not res.values and not absent:
                        res.why_missing = f"no scene has both {part.before} and {part.after} (failed or missing runs)"
                out.append(res)
    return out


def claim_verdict(parts: list[PartResult]) -> str:
    v = {p.verdict for p in parts}
    return FAILS if FAILS in v else UNMEASURED if UNMEASURED in v else HOLDS


VERDICT_CLASS = {HOLDS: "best", FAILS: "fail", UNMEASURED: "missing"}


def claim_numbers(results: list[PartResult]) -> dict[str, int]:
    """For summary.json (DVC): claim/<letter>/<split>/holds = 1 or 0; absent when not measured."""
    groups: dict[tuple[str, str], list[PartResult]] = {}
    for r in results:
        groups.setdefault((r.claim.key, r.split), []).append(r)
    return {f"claim/{k}/{sp}/holds": int(claim_verdict(ps) == HOLDS) for (k, sp), ps in groups.items()
            if claim_verdict(ps) != UNMEASURED}


def claims_tables(results: list[PartResult]) -> list[Table]:
    """The verdicts (one row per claim and split), then every part's per-scene numbers."""
    groups: dict[tuple[str, str], list[PartResult]] = {}
    for r in results:
        groups.setdefault((r.claim.key, r.split), []).append(r)
    rows = []
    for (key, sp), parts in groups.items():
        v = claim_verdict(parts)
        rows.append([(f"({key}) {parts[0].claim.text}", ""), (SPLIT_NAME.get(sp, sp), ""),
                     (v, VERDICT_CLASS[v]), ("; ".join(f"{p.evidence()} [{p.verdict}]" for p in parts), "")])
    verdicts = Table("The paper's claims, checked against this run", ["claim", "split", "verdict", "evidence"],
                     rows, "Rule: " + RULE + " Changes are after − before; PSNR in dB over held-out views.")
    detail = []
    for r in results:
        for k in r.scenes:
            if k not in r.values:
                detail.append([(f"({r.claim.key})", ""), (r.part.label, ""), (k, ""), (r.split, ""),
                               ("—", ""), ("—", ""), ("not measured", "missing")])
                continue
            b, a = r.values[k]
            g = r.gain(b, a)
            cls = "" if g > 0 else ("fail" if g < -TOLERANCE[r.part.quantity] else "partial")
            detail.append([(f"({r.claim.key})", ""), (r.part.label, ""), (k, ""), (r.split, ""),
                           (_n(b), ""), (_n(a), ""), (_signed(a - b), cls)])
    per_scene = Table("The claims per scene", ["claim", "compared", "scene", "split", "before", "after", "change"],
                      detail, "change = after − before; red: against the claim by more than the tolerance, "
                              "shaded: against it within the tolerance.")
    return [verdicts, per_scene]


# ----------------------------------------------------------------------------- stage 1 / stage 3 tables
STAGE1_QUANTITIES = (("heldout", "ratio", "Stage 1: held-out pairs, matched/random latent L1 ratio (lower is more consistent)"),
                     ("heldout", "l1", "Stage 1: held-out pairs, matched latent L1 (lower is more consistent)"),
                     ("train", "ratio", "Stage 1: training pairs, matched/random latent L1 ratio"),
                     ("recon", "psnr", "Stage 1: decode(encode(held-out photo)) PSNR, dB"))
STAGE3_QUANTITIES = (("rendered_test", "psnr", "Stage 3: decode(rendered latent) PSNR at held-out views, dB"),
                     ("clean_test", "psnr", "Stage 3: decode(encode(held-out photo)) PSNR, dB"),
                     ("rendered_train", "psnr", "Stage 3: decode(rendered latent) PSNR at training views, dB"))
# where each stage's JSON keeps its scenes: (section, split, pooled section)
STAGE_SECTIONS = {1: (("tuning", "in-domain", "overall"), ("measure", "cross-dataset", "measure_overall")),
                  3: (("scenes", "in-domain", "overall"), ("measure", "cross-dataset", "measure_overall"))}


def stage_tables(doc: dict | None, stage: int, tag: str = "") -> list[Table]:
    """Per quantity: one row per scene (and the pooled 'all' row per split): scene, split, before,
    after, change. Empty when the document holds none of the known sections."""
    if not isinstance(doc, dict):
        return []
    quantities = STAGE1_QUANTITIES if stage == 1 else STAGE3_QUANTITIES
    tables = []
    for what, metric, title in quantities:
        rows = []
        for section, sp, pooled in STAGE_SECTIONS[stage]:
            entries = [(k, v) for k, v in (doc.get(section) or {}).items() if isinstance(v, dict)]
            if isinstance(doc.get(pooled), dict) and entries:
                entries.append((f"all ({'match' if stage == 1 and what != 'recon' else 'view'}-pooled)", doc[pooled]))
            for key, d in entries:
                ba = d.get(what)
                if not isinstance(ba, dict):
                    continue
                b, a = (_value(ba.get(w), metric) for w in ("before", "after"))
                if b is None and a is None:
                    continue
                rows.append([(key, ""), (sp, ""), (_n(b) if b is not None else "—", ""),
                             (_n(a) if a is not None else "—", ""),
                             (_signed(a - b) if a is not None and b is not None else "—", "")])
        if rows:
            tables.append(Table(title + tag, ["scene", "split", "before", "after", "change"], rows,
                                "change = after − before; in-domain: the tuning scenes; "
                                "cross-dataset: scenes the stage never trained on."))
    return tables


def _value(x, metric: str) -> float | None:
    if metric == "ratio":
        return _ratio(x)
    v = x.get(metric) if isinstance(x, dict) else None
    return float(v) if _is_num(v) else None


def selection_table(doc: dict | None, stage: int, tag: str = "") -> Table | None:
    """The stage's "validation" section (lrf.train.loop's checkpoint selection) as one row: which
    step shipped, chosen on which views, by what, and the criterion's metric at step 0, at the step
    shipped and at the last step. None when the stage ran without it."""
    sel = doc.get("validation") if isinstance(doc, dict) else None
    if not isinstance(sel, dict) or not sel.get("rows"):
        return None
    rows, key, chosen = sel["rows"], sel.get("score_metric") or "score", sel.get("chosen_step")
    at = {r.get("step"): r.get(key) for r in rows if isinstance(r, dict)}
    views = sel.get("views") or {}
    n = sum(len(v) for v in views.values() if isinstance(v, list))
    cell = lambda v: (_n(v) if _is_num(v) else "—", "")  # noqa: E731
    return Table(f"Stage {stage}{tag}: the step shipped", [
        "validated steps", "shipped step", "last step", f"{key} at step 0", f"{key} shipped", f"{key} at last step",
        "validation views", "criterion", "eligible if"], [[
            (" ".join(str(r.get("step")) for r in rows), ""), (str(chosen) if chosen is not None else "none eligible",
                                                                "" if chosen is not None else "fail"),
            (str(rows[-1].get("step")), ""), cell(at.get(0)), cell(at.get(chosen)), cell(rows[-1].get(key)),
            (f"{n} ({'; '.join(f'{k}: ' + ', '.join(v) for k, v in views.items() if isinstance(v, list))})", ""),
            (str(sel.get("criterion", "")), ""), (str(sel.get("guard", "")), "")]],
        "Step 0 is the pretrained part: the stage ships the best eligible validated step, never a "
        "worse one by its criterion; the validation views are training views kept out of the stage's training.")
