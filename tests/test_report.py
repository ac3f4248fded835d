"""prefixkv.report: plots are written as PNGs, tables hold the numbers given."""
from __future__ import annotations

import torch

from prefixkv.calibration import Calibration
from prefixkv.profile import Fingerprint, LayerKeep, RetentionProfile
from prefixkv.report import (
    comparison_table,
    markdown_table,
    plot_calibration,
    plot_quality,
    quality_table,
    slug,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _calibration(layers=4):
    fp = Fingerprint("LlamaForCausalLM", layers, 4, 2, 16, "0" * 16)
    budgets = {0.1: LayerKeep([0.2, 0.1, 0.05, 0.05], [0.01] * 4), 0.2: LayerKeep([0.35, 0.2, 0.15, 0.1], [0.02] * 4)}
    profiles = {"accumulated": RetentionProfile(fp, 4, budgets),
                "window(pool=5,window=8)": RetentionProfile(fp, 4, budgets, scorer="window",
                                                            scorer_params={"pool": 5, "window": 8})}
    share = torch.linspace(0, 1, 101, dtype=torch.float64)
    curves = torch.stack([share ** (1 / (l + 1)) for l in range(layers)])  # more concentrated higher up
    return Calibration(profiles, {k: curves for k in profiles}, {k: [0.0, 0.33, 0.5, 0.6] for k in profiles})


def test_plot_calibration_writes_two_pngs_per_scorer(tmp_path):
    paths = plot_calibration(_calibration(), [0.1, 0.2], tmp_path / "calib")
    names = sorted(p.name for p in paths)
    assert names == ["keep_fractions_accumulated.png", "keep_fractions_window-pool5-window8.png",
                     "lorenz_accumulated.png", "lorenz_window-pool5-window8.png"]
    for p in paths:
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 5000


def _results():
    rows = [{"label": "full", "method": "full", "scorer": None, "allocation": None, "keep_fraction": 1.0,
             "ppl": 2.0, "rouge_l": 1.0, "length": 512}]
    for label, scorer, alloc, base in (("h2o", "accumulated", "uniform", 3.0), ("prefixkv", "accumulated", "profile", 2.5),
                                       ("window+profile", "window(pool=5,window=8)", "profile", 2.2)):
        for k in (0.1, 0.2):
            rows.append({"label": label, "method": label if "+" not in label else "custom", "scorer": scorer,
                         "allocation": alloc, "keep_fraction": k, "ppl": base / k ** 0.1, "rouge_l": 0.5 + k,
                         "length": 512})
    return rows


def test_plot_quality(tmp_path):
    path = plot_quality(_results(), tmp_path / "q.png", title="continuation")
    assert path.read_bytes()[:8] == PNG
    retrieval = [dict(r, accuracy=0.5, answer_ppl=r["ppl"]) for r in _results()]
    retrieval += [dict(r, length=1024) for r in retrieval]
    path = plot_quality(retrieval, tmp_path / "r.png", facet="length")
    assert path.read_bytes()[:8] == PNG


def test_quality_table_pivots_and_bolds_the_best():
    table = quality_table(_results(), "ppl")
    lines = table.strip().splitlines()
    assert lines[0] == "| method | keep 0.1 | keep 0.2 |"
    assert lines[2] == "| full | 2.00 | 2.00 |"  # the full cache in every column, never bold
    assert lines[3].startswith("| h2o (accumulated+uniform) | 3.78 |")
    assert lines[4].startswith("| prefixkv (accumulated+profile) |")
    assert "**2.77**" in lines[5] and lines[5].startswith("| window+profile |")  # lowest PPL at keep 0.1
    rouge = quality_table(_results(), "rouge_l")
    assert "**0.700**" in rouge and "| full | 1.000 | 1.000 |" in rouge


def test_markdown_and_comparison_tables():
    assert markdown_table(["a", "b"], [[1, None]]) == "| a | b |\n|:---|---:|\n| 1 |  |\n"
    text = comparison_table([{"task": "continuation", "keep": 0.2, "a": "prefixkv", "b": "h2o", "metric": "ppl",
                              "a_value": 2.5, "b_value": 3.0, "diff": -0.5, "low": -0.7, "high": -0.3,
                              "wins": 3, "losses": 13, "verdict": "A better"}])
    assert "| continuation | 0.2 | prefixkv | h2o | ppl | 2.50 | 3.00 | -0.500 [-0.700, -0.300] | 3/13 | A better |" in text


def test_slug():
    assert slug("window(pool=5,window=8)") == "window-pool5-window8"
    assert slug("accumulated+profile") == "accumulated-profile"
