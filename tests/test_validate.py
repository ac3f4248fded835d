"""Validation: Polygraphy graph check, lockstep generation, quality report, CLI exit codes."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from test_export import SMALL_VALIDATION, one_torch_thread, tiny_engine  # noqa: F401  (autouse)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_engine(tmp_path_factory.getbasetemp())


def test_validation_passes_and_writes_json(tiny, tmp_path):
    from prefixkv.engines.validate import ValidationConfig, validate_engine

    engine_dir, model, _ = tiny
    out = tmp_path / "report.json"
    report = validate_engine(engine_dir, ValidationConfig(json_path=out, **SMALL_VALIDATION), model=model, log=lambda m: None)
    assert report["passed"]
    assert json.loads(out.read_text())["passed"] is True
    graph = report["checks"]["graph"]
    assert graph["comparator"] == "polygraphy" and graph["kept_positions_identical"]
    assert graph["feeds"][0]["input_ids"][0] == 2  # a padded batch was compared
    assert graph["outputs"]["present.0.positions"]["max_abs"] == 0
    generation = report["checks"]["generation"]
    assert generation["agree"] == [True, True, True] and generation["kept_positions_identical"]
    quality = report["checks"]["quality"]
    assert quality["ppl"]["engine"] > 0 and quality["ppl"]["full"] > 0 and 0 <= quality["rouge_l_vs_full"] <= 1


def test_validation_fails_against_another_model(tiny):
    """A reference with other weights: the graph and generation checks must fail."""
    from conftest import tiny_llama

    from prefixkv.engines.validate import ValidationConfig, validate_engine

    engine_dir = tiny[0]
    other = tiny_llama(layers=3, seed=1)
    other.config.architectures = ["LlamaForCausalLM"]  # as saved: same fingerprint, other weights
    config = ValidationConfig(checks=("graph", "generation"),
                              **{k: v for k, v in SMALL_VALIDATION.items() if not k.startswith("quality")})
    report = validate_engine(engine_dir, config, model=other, log=lambda m: None)
    assert not report["passed"]
    assert not report["checks"]["graph"]["passed"]
    assert report["checks"]["graph"]["max_abs"]["logits"] > 1e-2


def test_quality_thresholds_fail_the_report(tiny):
    from prefixkv.engines.validate import ValidationConfig, validate_engine

    engine_dir, model, _ = tiny
    config = ValidationConfig(checks=("quality",), quality_samples=1, quality_tokens=40, quality_new_tokens=4,
                              max_ppl_increase=-1.0)
    report = validate_engine(engine_dir, config, model=model, log=lambda m: None)
    assert not report["passed"] and "PPL increase" in report["checks"]["quality"]["failures"][0]


def test_cli_validate_exit_codes(tiny, tmp_path, capsys, monkeypatch):
    from prefixkv.cli import main
    from prefixkv.engines import validate

    engine_dir, model, _ = tiny
    monkeypatch.setattr("prefixkv.engines.torch.load_model", lambda source: (model, None))
    out = tmp_path / "v.json"
    args = ["validate", str(engine_dir), "--json", str(out), "--validate-prompts", "2", "--validate-tokens", "40",
            "--validate-new-tokens", "4", "--quality-samples", "0"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out) == {"passed": True, "graph": True, "generation": True}
    assert json.loads(out.read_text())["passed"]
    monkeypatch.setattr(validate, "check_generation", lambda *a, **k: {"passed": False, "agree": [False], "prompts": 1,
                                                                        "max_new_tokens": 4})
    assert main(args) == 1


def test_graph_check_of_another_backend_trims_static_width_slots(tiny):
    """Engines of other backends (TensorRT) go through the generic Polygraphy runner over their
    prefill; slots empty in every row at the front (a static width bound) are dropped before
    the comparison.  Shown with the ONNX Runtime runner under another name, with two empty
    columns added in front of every layer's cache."""
    import numpy as np
    from test_export import KEEP

    from prefixkv.engines.onnxruntime import OnnxRuntimeRunner
    from prefixkv.engines.torch import TorchRunner
    from prefixkv.engines.validate import check_graph, trim_empty_front

    assert trim_empty_front(np.array([[0, 0, 1, 1], [0, 1, 1, 1]])) == 1
    assert trim_empty_front(np.zeros((2, 3))) == 3
    engine_dir, model, profile = tiny

    class Padded:
        name = "static-width-stand-in"

        def __init__(self):
            self.inner = OnnxRuntimeRunner(engine_dir, threads=1)
            self.layers = self.inner.layers

        def prefill(self, ids, mask):
            logits, state = self.inner.prefill(ids, mask)
            padded = []
            for key, value, positions, valid in state.layers():
                kv = [np.pad(a.numpy(), [(0, 0), (0, 0), (2, 0), (0, 0)]) for a in (key, value)]
                padded.append((*kv, np.pad(positions, [(0, 0), (2, 0)], constant_values=-1), np.pad(valid, [(0, 0), (2, 0)])))
            return logits, SimpleNamespace(layers=lambda: padded)

    reference = TorchRunner(model, engine_dir, profile=profile, keep_fraction=KEEP, method="prefixkv")
    engine = Padded()
    ids, mask = engine.inner.pad([list(range(3, 40)), list(range(5, 25))])
    result = check_graph(engine_dir, reference, [{"input_ids": ids, "attention_mask": mask}], engine=engine)
    assert result["passed"] and result["kept_positions_identical"]


def test_tied_rows_excuse_only_an_equally_scored_choice():
    """Row 0 keeps 3 instead of 1, both scored 0.5 (up to rounding): a tie.  Row 1 keeps 4
    (0.1) instead of 2 (0.9): a worse choice, not excused.  Row 2 agrees.  Without scores
    no difference can be told a tie."""
    import numpy as np

    from prefixkv.engines.validate import tied_rows

    scores = [np.array([2.0, 0.5, 0.3, 0.5 * (1 + 1e-7), 0.1]), np.array([2.0, 0.5, 0.9, 0.3, 0.1]),
              np.array([2.0, 0.5, 0.9, 0.3, 0.1])]
    engine = np.array([[0, 3], [0, 4], [0, 2]])
    reference = np.array([[0, 1], [0, 2], [0, 2]])
    assert tied_rows(engine, reference, scores) == ([0], [1])
    assert tied_rows(engine, reference, None) == ([], [0, 1])
    # -1 marks an empty slot: the same kept set in another layout is no difference
    assert tied_rows(np.array([[-1, 0, 2]]), np.array([[0, -1, 2]]), None) == ([], [])
