"""Plots (matplotlib, Agg backend) and markdown tables for calibration and quality results.

Only presentation: every function takes results computed elsewhere (``calibration``,
``evaluation``, ``stats``) and writes files or returns text.

    plot_calibration(calibration, [0.1, 0.2], "report/")  # keep fractions + Lorenz curves per scorer
    plot_quality(results, "quality.png")                   # PPL / ROUGE-L vs keep fraction
    quality_table(results, "ppl")                          # markdown: label x keep fraction
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .search import curve_gini

METRIC_NAMES = {
    "ppl": "PPL (lower is better)",
    "rouge_l": "ROUGE-L F1 vs full cache (higher is better)",
    "accuracy": "answer accuracy (higher is better)",
    "answer_ppl": "answer PPL (lower is better)",
    "kv_fraction": "KV entries held / prompt entries",
}
LOG_METRICS = {"ppl", "answer_ppl"}


def slug(text: str) -> str:
    """A file-name-safe form of a label or scorer key: ``window(pool=5,window=8)`` -> ``window-pool5-window8``."""
    text = re.sub(r"[=]", "", str(text))
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "x"


# -- calibration ----------------------------------------------------------------------------------
def plot_calibration(calibration, keep_fractions: Sequence[float] | None, out_dir) -> list[Path]:
    """Two PNGs per scorer: per-layer keep fractions for each budget, and per-layer
    cumulative-priority (Lorenz) curves with each layer's Gini coefficient.

    calibration: a ``prefixkv.calibration.Calibration``; keep_fractions: the keep fractions to draw
    (None: all calibrated).  Returns the written paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, profile in calibration.profiles.items():
        kfs = [k for k in profile.keep_fractions if keep_fractions is None or any(math.isclose(k, f) for f in keep_fractions)]
        if kfs:
            paths.append(_plot_layer_fractions(profile, kfs, key, out_dir / f"keep_fractions_{slug(key)}.png"))
        if key in calibration.curves:
            paths.append(_plot_lorenz(calibration.curves[key], calibration.gini.get(key), key,
                                      out_dir / f"lorenz_{slug(key)}.png"))
    return paths


def _plot_layer_fractions(profile, kfs, key, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.cm.viridis([i / max(len(kfs) - 1, 1) for i in range(len(kfs))])
    for kf, color in zip(kfs, colors):
        budget = profile.calibrated[kf]
        y = budget.layer_keep_fractions
        layers = range(len(y))
        ax.plot(layers, y, marker="o", ms=3, color=color, label=f"keep {kf:g}")
        low = [max(v - s, 0) for v, s in zip(y, budget.layer_keep_std)]
        high = [min(v + s, 1) for v, s in zip(y, budget.layer_keep_std)]
        ax.fill_between(layers, low, high, color=color, alpha=0.15, lw=0)
        ax.axhline(kf, color=color, ls=":", lw=1)
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("layer keep fraction")
    calib = profile.calibration or {}
    ax.set_title(f"PrefixKV per-layer keep fractions ({key}; {calib.get('samples', '?')} calibration prompts)\n"
                 "dotted: uniform share; band: ±1 std over prompts", fontsize=10)
    ax.set_ylim(0, min(1.0, max(max(profile.calibrated[k].layer_keep_fractions) for k in kfs) * 1.15 + 0.02))
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_lorenz(curves, gini, key, path: Path) -> Path:
    import torch

    c = torch.as_tensor(curves, dtype=torch.float64)
    layers, points = c.shape
    share = [i / (points - 1) for i in range(points)]
    if gini is None:
        gini = curve_gini(c).tolist()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [1.2, 1]})
    cmap = plt.cm.plasma
    for layer in range(layers):
        left.plot(share, c[layer].tolist(), color=cmap(layer / max(layers - 1, 1)), lw=1)
    left.plot([0, 1], [0, 1], "k--", lw=1, label="equal importance")
    left.set_xlabel("share of entries kept (most important first)")
    left.set_ylabel("cumulative priority (share of importance)")
    left.set_title(f"per-layer cumulative priority ({key})", fontsize=10)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, layers - 1))
    fig.colorbar(sm, ax=left, label="layer")
    left.legend(fontsize=8, loc="lower right")
    left.grid(alpha=0.3)
    right.bar(range(layers), gini, color=[cmap(layer / max(layers - 1, 1)) for layer in range(layers)])
    right.set_xlabel("layer")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_ylabel("Gini coefficient")
    right.set_ylim(0, 1)
    right.set_title("Gini per layer (higher: importance more concentrated)", fontsize=10)
    right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- quality ------------------------------------------------------------------------------------------
def _is_full(r: dict) -> bool:
    return r.get("method") == "full"


def plot_quality(results: Sequence[dict], out_path, metrics: Sequence[str] | None = None, facet: str | None = None,
                 title: str | None = None) -> Path:
    """Each metric vs keep fraction, one line per label; the full cache is a dashed line.

    results: ``evaluate`` dicts; metrics: default ``ppl`` + ``rouge_l`` (``accuracy`` +
    ``answer_ppl`` when results carry ``accuracy``); facet: a result key (e.g. ``length``)
    giving one row of panels per value.
    """
    results = list(results)
    if not results:
        raise ValueError("no results to plot")
    if metrics is None:
        metrics = ("accuracy", "answer_ppl") if "accuracy" in results[0] else ("ppl", "rouge_l")
    facets = sorted({r.get(facet) for r in results}, key=lambda v: (v is None, v)) if facet else [None]
    labels = list(dict.fromkeys(r["label"] for r in results if not _is_full(r)))
    cmap = plt.cm.tab20 if len(labels) > 10 else plt.cm.tab10
    colors = {label: cmap(i % cmap.N) for i, label in enumerate(labels)}
    legend_rows = math.ceil((len(labels) + 1) / 5)  # the labels and the full cache, five per row
    height = 3.6 * len(facets) + 0.6 + 0.22 * legend_rows
    fig, axes = plt.subplots(len(facets), len(metrics), figsize=(5.2 * len(metrics), height), squeeze=False)
    for row, value in enumerate(facets):
        subset = [r for r in results if facet is None or r.get(facet) == value]
        for col, metric in enumerate(metrics):
            ax = axes[row][col]
            for label in labels:
                points = sorted((r["keep_fraction"], r[metric]) for r in subset
                                if r["label"] == label and r.get(metric) is not None)
                if points:
                    style = "-" if any(tag in label for tag in ("profile", "prefixkv", "online")) else "--"
                    ax.plot(*zip(*points), style, marker="o", ms=4, color=colors[label], label=label)
            for r in subset:
                if _is_full(r) and r.get(metric) is not None:
                    ax.axhline(r[metric], color="black", ls=":", lw=1.2, label="full cache")
            if metric in LOG_METRICS:
                ax.set_yscale("log")
            ax.set_xlabel("keep fraction")
            ax.set_ylabel(METRIC_NAMES.get(metric, metric), fontsize=9)
            ax.set_title(f"{facet} = {value}" if facet else METRIC_NAMES.get(metric, metric).split(" (")[0], fontsize=10)
            ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(names, handles))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=min(len(unique), 5), fontsize=8,
               bbox_to_anchor=(0.5, 0.0))
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, (0.25 + 0.22 * legend_rows) / height, 1, 1))  # room for the legend, in inches
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110, bbox_inches="tight")  # nothing cropped, however long the labels
    plt.close(fig)
    return out_path


# -- markdown --------------------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` one char per column (l/r/c), default: first left, rest right."""
    align = align or "l" + "r" * (len(headers) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(str(h) for h in headers) + " |",
             "|" + "|".join(marks[a] for a in align) + "|"]
    for row in rows:
        lines.append("| " + " | ".join("" if v is None else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def fmt(value, metric: str = "") -> str:
    """Numbers as tables show them: PPL 2 decimals, shares 3, counts as is."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int):
        return str(value)
    if metric in ("rouge_l", "accuracy", "kv_fraction"):
        return f"{value:.3f}"
    return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"


def describe(r: dict) -> str:
    """``label (scorer+allocation)`` for named methods, the label for pairs."""
    if _is_full(r) or r.get("scorer") is None:
        return r["label"]
    pair = f"{r['scorer'].split('(')[0]}+{r['allocation']}"
    return r["label"] if r["label"] == pair else f"{r['label']} ({pair})"


def quality_table(results: Sequence[dict], metric: str, facet: str | None = None, bold_best: bool = True) -> str:
    """Markdown: one row per label, one column per keep fraction (per facet value), full cache first.

    The best value per column (lowest for PPL, highest otherwise) is bold.
    """
    results = list(results)
    facets = sorted({r.get(facet) for r in results}) if facet else [None]
    keeps = sorted({r["keep_fraction"] for r in results if not _is_full(r)})
    columns = [(f, k) for f in facets for k in keeps]
    headers = ["method"] + [(f"{facet} {f}, " if facet else "") + f"keep {k:g}" for f, k in columns]
    lower = metric in LOG_METRICS
    cell = {}
    for r in results:
        for f, k in columns:
            if (facet is None or r.get(facet) == f) and (_is_full(r) or math.isclose(r["keep_fraction"], k)):
                cell[(describe(r), f, k)] = r.get(metric)
    best = {}
    for f, k in columns:
        values = [v for (name, ff, kk), v in cell.items() if ff == f and kk == k and v is not None
                  and not name.startswith("full")]
        if values:
            best[(f, k)] = min(values) if lower else max(values)
    names = list(dict.fromkeys(describe(r) for r in sorted(results, key=lambda r: not _is_full(r))))
    rows = []
    for name in names:
        row = [name]
        for f, k in columns:
            v = cell.get((name, f, k))
            text = fmt(v, metric)
            if bold_best and v is not None and not name.startswith("full") and best.get((f, k)) == v:
                text = f"**{text}**"
            row.append(text)
        rows.append(row)
    return markdown_table(headers, rows)


def comparison_table(rows: Sequence[dict]) -> str:
    """Markdown of paired comparisons: dicts with ``task``, ``keep``, ``a``, ``b``, ``metric``,
    ``a_value``, ``b_value``, ``diff``, ``low``, ``high`` (and optional ``wins``/``losses``/``verdict``)."""
    headers = ["task", "keep", "A", "B", "metric", "A", "B", "A − B [95% CI]", "prompts A>B / A<B", "verdict"]
    out = []
    for r in rows:
        m = r["metric"]
        ci = f"{r['diff']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]"
        wl = f"{r['wins']}/{r['losses']}" if r.get("wins") is not None else "–"
        out.append([r["task"], f"{r['keep']:g}", r["a"], r["b"], m, fmt(r["a_value"], m), fmt(r["b_value"], m), ci, wl,
                    r.get("verdict", "")])
    return markdown_table(headers, out, align="llllllrrrl")
