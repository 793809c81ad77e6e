"""Figures (matplotlib, PNG bytes): metrics per method, before/after bars, fine-tuning and field curves."""
from __future__ import annotations

import io

import numpy as np

from lrf.methods import METHODS, per_scene
from lrf.report.collect import LABEL, measured, METHOD_ORDER, ordered_methods, Run
from lrf.report.tables import _mean_std


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def method_colors(methods: list[str]) -> dict[str, tuple]:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(ordered_methods(list(METHOD_ORDER) + methods))}


def figure_metrics(runs: list[Run], methods: list[str]) -> bytes | None:
    """Grouped bars: datasets on x, one bar per method, error bars = std over scenes."""
    ok = [r for r in runs if r.status == "ok"]
    if not ok:
        return None
    plt = _plt()
    datasets = list(dict.fromkeys(r.dataset for r in runs))
    colors = method_colors(methods)
    quality = measured(runs)
    fig, axes = plt.subplots(1, len(quality), figsize=(4.2 * len(quality), 3.6), squeeze=False)
    width = 0.8 / max(len(methods), 1)
    for ax, metric in zip(axes[0], quality):
        for j, m in enumerate(methods):
            mean, std, short = [], [], []
            for d in datasets:
                v = [x for x in (r.mean(metric) for r in ok if r.dataset == d and r.method == m) if x is not None]
                mu, sd = _mean_std(v)
                mean.append(np.nan if mu is None else mu)
                std.append(np.nan if sd is None else sd)
                short.append(len(v) < sum(1 for r in runs if r.dataset == d and r.method == m))
            x = np.arange(len(datasets)) + (j - (len(methods) - 1) / 2) * width
            ceiling = METHODS.get(m, {}).get("kind") == "ceiling"
            ax.bar(x, mean, width, yerr=None if np.all(np.isnan(std)) else std, capsize=2, label=m,
                   color="#d0d0d0" if ceiling else colors[m], hatch="///" if ceiling else None,
                   edgecolor="#888888" if ceiling else "white", linewidth=0.5)
            # a red x under every bar that lost scenes: failures must be visible in the figure too
            bad = [xx for xx, sh in zip(x, short) if sh]
            if bad:
                ax.plot(bad, [0.02] * len(bad), "x", color="#d93025", ms=6, mew=2,
                        transform=ax.get_xaxis_transform(), label="_failed", clip_on=False)
        ax.set_xticks(np.arange(len(datasets)), datasets, rotation=20, ha="right")
        ax.set_title(LABEL[metric])
        ax.grid(axis="y", alpha=0.3)
        if metric == "psnr":
            vals = [r.mean("psnr") for r in ok if r.mean("psnr") is not None]
            if vals:
                ax.set_ylim(max(0.0, min(vals) - 3), max(vals) + 1.5)
    handles, labels = axes[0][0].get_legend_handles_labels()
    from matplotlib.lines import Line2D

    if any(r.status != "ok" for r in runs):
        handles.append(Line2D([], [], ls="", marker="x", color="#d93025", mew=2))
        labels.append("scenes failed/missing")
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), bbox_to_anchor=(0.5, 1.07), frameon=False)
    fig.tight_layout()
    return fig_bytes(fig)


def figure_before_after(title: str, rows) -> bytes | None:
    """Before/after bars per measured set, one panel per metric (L1 and its ratio to random pairs)."""
    rows = [r for r in rows if r[2] is not None or r[3] is not None]
    if not rows:
        return None
    plt = _plt()
    metrics = list(dict.fromkeys(r[1] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(5.0, 0.9 * len(rows) / len(metrics) + 2.5) * len(metrics) ** 0.8,
                                                        3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        rs = [r for r in rows if r[1] == metric]
        labels = [_short_path(r[0]) for r in rs]
        x = np.arange(len(rs))
        b = [np.nan if r[2] is None else r[2] for r in rs]
        a = [np.nan if r[3] is None else r[3] for r in rs]
        ax.bar(x - 0.2, b, 0.4, label="before", color="#9aa5b1")
        ax.bar(x + 0.2, a, 0.4, label="after", color="#2b7bba")
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig_bytes(fig)


def _short_path(p: str) -> str:
    parts = [x for x in p.split(" / ") if x not in ("tuning", "scenes", "heldout")]
    return " / ".join(parts) or "(all)"


def _smooth(y: np.ndarray, n: int) -> np.ndarray:
    if n <= 1 or len(y) < 3:
        return y
    n = min(n, len(y))
    k = np.ones(n) / n
    pad = np.concatenate([np.full(n - 1, y[0]), y])
    return np.convolve(pad, k, mode="valid")


def figure_finetune_curves(curves: dict[str, object]) -> bytes | None:
    """Stage 1 / stage 3 losses per step (raw faint, moving average bold)."""
    curves = {k: v for k, v in curves.items() if v is not None}
    if not curves:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.6), squeeze=False)
    for ax, (name, df) in zip(axes[0], curves.items()):
        step = df["step"].to_numpy(float)
        cols = [c for c in df.columns if c not in ("step", "seconds", "clean")]
        win = max(1, len(step) // 50)
        for i, c in enumerate(cols):
            y = df[c].to_numpy(float)
            if not np.isfinite(y).any():
                continue
            color = plt.get_cmap("tab10")(i)
            if c == "loss":
                ax.plot(step, y, color=color, alpha=0.25, lw=0.7)
            ax.plot(step, _smooth(y, win), color=color, lw=1.8 if c == "loss" else 1.0, label=c)
        pos = df[cols].to_numpy(float)
        if np.all(pos[np.isfinite(pos)] > 0):
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig_bytes(fig)


def figure_field_curves(logs: dict[str, dict[str, object]]) -> bytes | None:
    """One column per field (vanilla, enc, rgb-3dgs); loss and Gaussian count vs step, a line per scene."""
    logs = {f: logs[f] for f in ordered_methods(list(logs)) if logs[f]}
    if not logs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(2, len(logs), figsize=(5.0 * len(logs), 6.2), squeeze=False, sharex="col")
    for j, (fname, per_scene) in enumerate(logs.items()):
        for key, df in per_scene.items():
            if "loss" in df.columns:
                axes[0][j].plot(df["step"], df["loss"], lw=1.2, label=key)
            if "n_gaussians" in df.columns:
                axes[1][j].plot(df["step"], df["n_gaussians"], lw=1.2, label=key)
        axes[0][j].set_title(f"field: {fname}")
        axes[0][j].set_ylabel("loss")
        vals = np.concatenate([d["loss"].to_numpy(float) for d in per_scene.values() if "loss" in d.columns] or [[]])
        if vals.size and np.all(vals[np.isfinite(vals)] > 0):
            axes[0][j].set_yscale("log")
        axes[1][j].set_ylabel("Gaussians")
        axes[1][j].set_xlabel("step")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
        axes[0][j].legend(fontsize=7)
    fig.tight_layout()
    return fig_bytes(fig)


def figure_validation(title: str, sel: dict) -> bytes | None:
    """A stage's checkpoint selection: its criterion's metric and its guard's per validated step,
    ineligible steps as red crosses, the step shipped as a star (lrf.train.loop)."""
    rows = [r for r in sel.get("rows") or [] if isinstance(r, dict) and "step" in r]
    keys = [k for k in (sel.get("score_metric") or "score", sel.get("guard_metric")) if k]
    if not rows or not keys:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.8 * len(keys), 3.4), squeeze=False)
    chosen = sel.get("chosen_step")
    for ax, key in zip(axes[0], keys):
        step = np.array([r["step"] for r in rows], float)
        y = np.array([np.nan if r.get(key) is None else r[key] for r in rows], float)
        ok = np.array([bool(r.get("eligible")) for r in rows])
        ax.plot(step, y, color="#2b7bba", lw=1.2)
        ax.plot(step[ok], y[ok], "o", color="#2b7bba", ms=4, label="eligible")
        if (~ok).any():
            ax.plot(step[~ok], y[~ok], "x", color="#d93025", ms=7, mew=2, label="not eligible")
        if chosen is not None and (step == chosen).any():
            ax.plot([chosen], y[step == chosen][:1], "*", color="#188038", ms=14, label=f"shipped (step {chosen})")
        if key == sel.get("guard_metric") and _is_finite(y[0]) and sel.get("max_drop_db") is not None:
            ax.axhline(y[0] - float(sel["max_drop_db"]), color="#d93025", ls="--", lw=0.8, label="guard")
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig_bytes(fig)


def _is_finite(v) -> bool:
    return v is not None and bool(np.isfinite(v))
