"""Engine folder: manifest contents, tamper detection, atomic builds, refused inputs."""
from __future__ import annotations

import json
import shutil

import pytest
from test_export import (  # noqa: F401  (autouse)
    KEEP,
    LAYERS,
    one_torch_thread,
    tiny_engine,
    tiny_model_folder,
    tiny_profile,
)

from prefixkv.engine_folder import (
    MANIFEST,
    SCHEMA,
    EngineError,
    EngineExistsError,
    is_engine,
    output_lock,
    read_manifest,
    remove_stale_builds,
    sha256,
    staging,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_engine(tmp_path_factory.getbasetemp())


@pytest.fixture
def engine_copy(tiny, tmp_path):
    target = tmp_path / "engine"
    shutil.copytree(tiny[0], target)
    return target


def test_manifest_describes_the_engine(tiny):
    engine_dir, model, profile = tiny
    manifest = read_manifest(engine_dir)
    assert manifest["schema"] == "prefixkv.engine" and manifest["schema_version"] == 7
    assert manifest["keep_fraction"] == KEEP
    assert manifest["layer_keep_fractions"] == profile.layer_fractions(KEEP)
    assert manifest["model"]["fingerprint"]["layers"] == LAYERS
    assert manifest["opset"] >= 18 and manifest["max_context"] == 512
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(manifest["libraries"])
    assert manifest["backend"] == "onnxruntime" and manifest["tensorrt"] is None
    assert "report/keep_fractions_accumulated.png" in manifest["files"]  # the profile's per-layer plot
    assert manifest["tool"]["name"] == "prefixkv"
    expected = {"decoder.onnx", "decoder.onnx.data", "compact.onnx", "profile.json",
                "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert expected <= set(manifest["files"])
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256(engine_dir / name)
    decoder = manifest["graphs"]["decoder"]
    assert [i["name"] for i in decoder["inputs"][:3]] == ["input_ids", "position_ids", "prompt_lengths"]
    assert decoder["outputs"][0] == {"name": "logits", "dtype": "float32", "shape": ["batch", 256]}
    assert {"name": "past.valid", "dtype": "bool", "shape": ["batch", "past_slots"]} in decoder["inputs"]
    compact = manifest["graphs"]["compact"]
    assert compact["data"] is None and compact["inputs"][0]["name"] == "attention_mask"
    assert json.loads((engine_dir / "validation.json").read_text())["passed"] is True


@pytest.mark.parametrize("name", ["profile.json", "decoder.onnx.data", "tokenizer.json"])
def test_a_modified_file_is_refused(engine_copy, name):
    from prefixkv.engines.onnxruntime import OnnxRuntimeRunner

    path = engine_copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit flipped
    path.write_bytes(bytes(data))
    with pytest.raises(EngineError, match=f"{name} was modified.*rebuild"):
        read_manifest(engine_copy)
    with pytest.raises(EngineError, match="modified"):
        OnnxRuntimeRunner(engine_copy)


def test_missing_or_mismatched_files_are_refused(engine_copy):
    (engine_copy / "decoder.onnx.data").unlink()
    with pytest.raises(EngineError, match="decoder.onnx.data is missing"):
        read_manifest(engine_copy)


def test_manifest_that_disagrees_with_the_profile_is_refused(engine_copy):
    manifest = json.loads((engine_copy / "manifest.json").read_text())
    manifest["keep_fraction"] = 0.7
    (engine_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="profile does not match"):
        read_manifest(engine_copy)


def test_not_an_engine(tmp_path):
    with pytest.raises(EngineError, match="no engine folder"):
        read_manifest(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    with pytest.raises(EngineError, match="no manifest.json"):
        read_manifest(tmp_path / "half")
    assert not is_engine(tmp_path / "half")


def test_interrupted_build_leaves_no_engine(tmp_path, monkeypatch):
    from prefixkv import pipeline as build
    from prefixkv.pipeline import BuildConfig

    model, folder = tiny_model_folder(tmp_path)

    def interrupted(model, spec, folder, opset, log):
        (folder / "decoder.onnx").write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "export_engine_graphs", interrupted)
    target = tmp_path / "out" / "engine"
    with pytest.raises(KeyboardInterrupt):
        build.build_engine(BuildConfig(str(folder), target, KEEP, profile=tiny_profile(model), validate=False), model=model)
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no partial folder either


def test_existing_output_needs_force(tmp_path):
    target = tmp_path / "engine"
    target.mkdir()
    (target / MANIFEST).write_text(json.dumps({"schema": SCHEMA}))
    with pytest.raises(EngineExistsError, match="--force"):
        with staging(target):
            pass
    with staging(target, force=True) as tmp:
        (tmp / "new").write_text("new engine")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["engine"]


def test_force_replaces_only_an_engine_folder(tmp_path, capsys):
    """--force over a folder that is not an engine (no prefixkv manifest) deletes nothing: refused
    before any work, in one line."""
    from prefixkv.cli import main

    target = tmp_path / "photos"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"precious")
    (target / MANIFEST).write_text('{"schema": "somebody-else"}')
    with pytest.raises(EngineExistsError, match="is not a prefixkv engine.*--force replaces only an engine folder"):
        with staging(target, force=True):
            pytest.fail("staged over a folder that is not an engine")
    code = main(["build", "--model", "no-such-model", "--calibrate", "--output", str(target), "--force", "--no-validate"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is not a prefixkv engine" in err[0]
    assert (target / "holiday.jpg").read_bytes() == b"precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    with staging(empty, force=True) as tmp:  # an empty folder holds nothing to lose
        (tmp / "new").write_text("x")
    assert [p.name for p in empty.iterdir()] == ["new"]


def test_a_second_build_into_the_same_folder_is_refused(tmp_path):
    """Two builds to one --output: the one that comes second is refused at its start (the
    first holds the folder's lock for its whole build), and the lock goes with the build."""
    from prefixkv.pipeline import BuildConfig, build_engine

    model, folder = tiny_model_folder(tmp_path)
    target = tmp_path / "out" / "engine"
    with output_lock(target):
        with pytest.raises(EngineExistsError, match=r"another prefixkv build is writing .*engine \(pid \d+\)"):
            build_engine(BuildConfig(str(folder), target, KEEP, profile=tiny_profile(model), validate=False), model=model)
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []  # the lock file went with the lock
    with output_lock(target):  # free again
        pass


def test_a_folder_that_appears_during_the_build_is_not_replaced(tmp_path):
    """The swap checks the target again: what appeared meanwhile stays, and the new engine is
    kept next to it instead of being thrown away."""
    target = tmp_path / "engine"
    with pytest.raises(EngineExistsError, match=r"appeared during the build and was left as it is; the new engine is in"):
        with staging(target) as tmp:
            (tmp / "new").write_text("new engine")
            target.mkdir()
            (target / "theirs").write_text("somebody else's")
    assert [p.name for p in target.iterdir()] == ["theirs"]
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("engine.new-")]
    assert len(kept) == 1 and (kept[0] / "new").read_text() == "new engine"


def test_stale_partial_builds_are_removed_by_the_next_build(tmp_path):
    """Folders a killed build left (.NAME.partial-*, .NAME.old-*) go with the next build into the same
    parent, one line each; a folder of a build that is still running (its lock held) stays."""
    for name in (".engine.partial-abc123", ".other.partial-x", ".other.old-y", ".running.partial-z"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "prefill.onnx.data").write_bytes(b"\0" * 4096)
    (tmp_path / "keep.partial-not-hidden").mkdir()
    lines = []
    with output_lock(tmp_path / "running"):
        with staging(tmp_path / "engine", log=lines.append) as tmp:
            (tmp / "new").write_text("x")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".running.partial-z", "engine", "keep.partial-not-hidden"]
    assert len(lines) == 3 and all(line.startswith("removed ") and "left by an interrupted build" in line for line in lines)
    assert remove_stale_builds(tmp_path / "nowhere") == []


def test_build_refuses_bad_input_before_any_work(tmp_path, monkeypatch):
    from prefixkv import pipeline as build
    from prefixkv.models import ModelError
    from prefixkv.pipeline import BuildConfig
    from prefixkv.profile import ProfileError

    monkeypatch.setattr(build, "export_engine_graphs", lambda *a, **k: pytest.fail("exported despite bad input"))
    model, folder = tiny_model_folder(tmp_path)
    target = tmp_path / "engine"
    with pytest.raises(ModelError, match="unknown model"):
        build.build_engine(BuildConfig("no-such-model", target, KEEP, validate=False))
    with pytest.raises(ProfileError, match="keep fraction 0.3 is not in this profile.*calibrated: 0.4"):
        build.build_engine(BuildConfig(str(folder), target, 0.3, profile=tiny_profile(model), validate=False), model=model)
    from prefixkv.profile import Fingerprint, LayerKeep, RetentionProfile

    mine = Fingerprint.of(model.config)  # a profile made for a model with one more layer
    other = RetentionProfile(Fingerprint(**{**mine.__dict__, "layers": LAYERS + 1}), sink=4,
                             calibrated={KEEP: LayerKeep([0.4] * (LAYERS + 1), [0.0] * (LAYERS + 1))})
    path = other.save(tmp_path / "other.json")
    with pytest.raises(ProfileError, match="another model"):
        build.build_engine(BuildConfig(str(folder), target, KEEP, profile=str(path), validate=False), model=model)
    with pytest.raises(ValueError, match=r"keep fraction must be in \(0, 1\]"):
        build.build_engine(BuildConfig(str(folder), target, 1.5, validate=False), model=model)
    target.mkdir()
    with pytest.raises(EngineExistsError, match="pass --force"):
        build.build_engine(BuildConfig(str(folder), target, KEEP, profile=tiny_profile(model), validate=False), model=model)
    assert list(target.iterdir()) == []


def test_build_calibrates_when_no_profile_is_given(tmp_path):
    from prefixkv.pipeline import CalibrationConfig, DataConfig, resolve_profile
    from prefixkv.tokenizer import Tokenizer

    model, folder = tiny_model_folder(tmp_path)
    calibration = CalibrationConfig(data=DataConfig(samples=2, tokens=48))
    profile, run = resolve_profile(None, model, Tokenizer(folder), KEEP, calibration, log=lambda m: None)
    fractions = profile.layer_fractions(KEEP)
    assert run is not None and run.curves["accumulated"].shape == (LAYERS, 101)  # for the Lorenz plot
    assert len(fractions) == LAYERS and all(0 < f <= 1 for f in fractions)


def test_cli_refuses_existing_output_with_one_line(tmp_path, capsys):
    from prefixkv.cli import main

    (tmp_path / "engine").mkdir()
    code = main(["build", "--model", "no-such-model", "--calibrate", "--output", str(tmp_path / "engine"), "--no-validate"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "--force" in err[0]


def test_cli_build_asks_for_a_profile_or_calibrate(tmp_path, capsys):
    """Calibration is its own explicit flag: `--profile PATH`, `--calibrate` or `--tune`, one of them."""
    from prefixkv.cli import main

    for extra, message in (([], "one of the arguments --profile --calibrate --tune is required"),
                           (["--profile", "p.json", "--calibrate"], "not allowed with argument"),
                           (["--tune", "--calibrate"], "not allowed with argument")):
        with pytest.raises(SystemExit) as exit_info:
            main(["build", "--output", str(tmp_path / "engine"), *extra])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("version", [1, 2, 3, 4, 5, 6])
def test_an_engine_of_an_older_layout_is_refused(engine_copy, version):
    """Schema version 1 (prefill.onnx + decode.onnx, two copies of the weights), 2 (a
    separate score graph, the decoder returning queries), 3 (a decoder without
    past_lengths), 4 (positions and valid per layer), 5 (a decoder of one phase) and 6
    (shared slots right-aligned, masked by a bias): one line, "rebuild"."""
    from prefixkv.engines.onnxruntime import OnnxRuntimeRunner

    manifest = json.loads((engine_copy / "manifest.json").read_text())
    manifest["schema_version"] = version
    if version == 1:
        manifest["graphs"] = {"prefill": manifest["graphs"]["decoder"], "decode": manifest["graphs"]["decoder"]}
    elif version == 2:
        manifest["graphs"]["score"] = manifest["graphs"]["compact"]
    (engine_copy / "manifest.json").write_text(json.dumps(manifest))
    for load in (read_manifest, OnnxRuntimeRunner):
        with pytest.raises(EngineError, match=rf"schema version {version}; this prefixkv reads version 7: rebuild") as err:
            load(engine_copy)
        assert "\n" not in str(err.value)
