"""Validation that means something: thresholds decide "pass", an engine that failed is marked so in
its manifest and refused by generate, deploy and serve unless --allow-failed-validation; a --force
build that fails validation leaves the engine it would have replaced as it was."""
from __future__ import annotations

import json
import shutil

import pytest
from test_export import (  # noqa: F401  (autouse)
    KEEP,
    SMALL_VALIDATION,
    one_torch_thread,
    tiny_engine,
    tiny_profile,
)

from prefixkv import defaults
from prefixkv.engine_folder import (
    ALLOW_FAILED,
    EngineError,
    check_validated,
    mark_validation,
    read_manifest,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_engine(tmp_path_factory.getbasetemp())


def failed_copy(tiny, tmp_path):
    """A copy of the tiny engine whose manifest records a failed validation (quality FAIL)."""
    target = tmp_path / "engine"
    shutil.copytree(tiny[0], target)
    report = {"passed": False, "checks": {"graph": {"passed": True}, "generation": {"passed": True},
                                          "quality": {"passed": False, "status": "FAIL"}}}
    mark_validation(target, report)
    return target


def test_the_default_tolerances_are_checked_and_written(tiny):
    from prefixkv.engines.validate import ValidationConfig, validate_engine

    engine_dir, model, _ = tiny
    quality = dict(checks=("quality",), quality_samples=1, quality_tokens=40, quality_new_tokens=4)
    lines = []
    report = validate_engine(engine_dir, ValidationConfig(**quality), model=model, log=lines.append)
    check = report["checks"]["quality"]
    assert check["thresholds"] == {"max_ppl_increase": defaults.MAX_PPL_INCREASE, "min_rouge_l": defaults.MIN_ROUGE_L}
    assert check["status"] in ("pass", "FAIL") and any(line.startswith(f"  quality: {check['status']}") for line in lines)
    # without thresholds: the numbers are reported, the word "pass" is not used, and they decide nothing
    lines.clear()
    report = validate_engine(engine_dir, ValidationConfig(**quality, max_ppl_increase=None, min_rouge_l=None), model=model,
                             log=lines.append)
    assert report["checks"]["quality"]["status"] == "reported" and report["passed"]
    assert any(line.startswith("  quality: reported") for line in lines) and not any("pass" in line for line in lines)


def test_a_failed_engine_is_refused_with_the_override_named(tiny, tmp_path):
    from prefixkv.engines import load_runner

    engine = failed_copy(tiny, tmp_path)
    manifest = read_manifest(engine)  # the verdict is outside the hashed files: the engine still verifies
    assert manifest["validation"] == {"passed": False, "checks": {"graph": "pass", "generation": "pass", "quality": "FAIL"},
                                      "report": "validation.json"}
    with pytest.raises(EngineError, match=rf"failed its validation \(quality; .*pass {ALLOW_FAILED}"):
        load_runner(engine)
    assert load_runner(engine, allow_failed_validation=True).layers == 3
    check_validated(tiny[0], read_manifest(tiny[0]))  # a passed engine is not refused
    check_validated(engine, {"files": {}})  # nor one built without validation


def test_generate_deploy_and_serve_refuse_a_failed_engine(tiny, tmp_path, capsys):
    from prefixkv.cli import main

    engine = failed_copy(tiny, tmp_path)
    repository = tmp_path / "repo"
    for command in (["generate", str(engine), "--prompt", "Hello", "--max-new-tokens", "2"],
                    ["deploy", str(engine), "--repository", str(repository)]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and ALLOW_FAILED in err[0]
    assert not repository.exists()
    assert main(["generate", str(engine), "--prompt", "Hello", "--max-new-tokens", "2", ALLOW_FAILED]) == 0
    assert main(["deploy", str(engine), "--repository", str(repository), ALLOW_FAILED]) == 0
    config = (repository / "prefixkv_llm" / "config.pbtxt").read_text()
    assert '"allow_failed_validation" value { string_value: "true" }' in config
    capsys.readouterr()
    # serve checks the repository before it starts a server: deployed with the override, it is let through
    from prefixkv.serving.repository import check_repository

    check_repository(repository)
    (repository / "prefixkv_llm" / "config.pbtxt").write_text(config.replace('string_value: "true" } }\n', 'string_value: "false" } }\n'))
    with pytest.raises(EngineError, match=ALLOW_FAILED):
        check_repository(repository)
    assert main(["serve", str(repository)]) == 2
    assert ALLOW_FAILED in capsys.readouterr().err


def test_force_build_that_fails_validation_keeps_the_old_engine(tiny, tmp_path):
    from prefixkv.engines.validate import ValidationConfig
    from prefixkv.pipeline import BuildConfig, build_engine

    engine_dir, model, profile = tiny
    target = tmp_path / "engine"
    shutil.copytree(engine_dir, target)
    before = (target / "manifest.json").read_text()
    folder = read_manifest(target)["model"]["source"]
    failing = ValidationConfig(**{**SMALL_VALIDATION, "max_ppl_increase": -1.0})  # no engine can pass this
    lines = []
    result = build_engine(BuildConfig(folder, target, KEEP, profile=profile, force=True, validation=failing), model=model,
                          log=lines.append)
    assert not result.passed and any("was left as it was" in line for line in lines)
    assert (target / "manifest.json").read_text() == before  # the old engine, untouched
    (aside,) = tmp_path.glob("engine.failed-*")
    assert result.path == aside and result.validation["engine"] == str(aside)
    assert json.loads((aside / "validation.json").read_text())["passed"] is False
    assert read_manifest(aside)["validation"]["passed"] is False
    # without an engine to keep, the failed build is written, marked, and exits 1 through the CLI's report
    fresh = tmp_path / "fresh"
    result = build_engine(BuildConfig(folder, fresh, KEEP, profile=tiny_profile(model), validation=failing), model=model,
                          log=lambda m: None)
    assert not result.passed and read_manifest(fresh)["validation"]["checks"]["quality"] == "FAIL"
