"""RetentionProfile: round trip and every rejection, with its message."""
import json

import pytest

from prefixkv.profile import (
    SCHEMA_VERSION,
    Fingerprint,
    LayerKeep,
    ProfileError,
    RetentionProfile,
)

FP = Fingerprint("LlamaForCausalLM", 3, 4, 2, 16, "abc123")


def profile():
    return RetentionProfile(FP, 4, {0.2: LayerKeep([0.3, 0.2, 0.1], [0.01, 0.02, 0.03]), 0.5: LayerKeep([0.6, 0.5, 0.4], [0, 0, 0])},
                            scorer="window", scorer_params={"window": 8, "pool": 5}, min_layer_keep=0.25, blend=0.5,
                            calibration={"samples": 16})


def test_round_trip(tmp_path):
    path = profile().save(tmp_path / "p.json")
    loaded = RetentionProfile.load(path, FP)
    assert loaded.layer_fractions(0.2) == [0.3, 0.2, 0.1]
    assert loaded.keep_fractions == [0.2, 0.5]
    assert (loaded.scorer, loaded.scorer_params, loaded.min_layer_keep, loaded.blend) == ("window", {"window": 8, "pool": 5}, 0.25, 0.5)
    assert loaded.calibrated[0.2].layer_keep_std == [0.01, 0.02, 0.03]
    assert loaded.to_dict() == profile().to_dict()
    assert not list(tmp_path.glob(".p.json.*"))  # no temporary file left


def test_the_decode_rule_round_trips_and_defaults_to_25(tmp_path):
    from dataclasses import replace

    from prefixkv.defaults import EVICT_DISTANCE, OLDEST

    assert "evict_distance" not in profile().to_dict() and profile().evict_distance == EVICT_DISTANCE
    streaming = replace(profile(), evict_distance=OLDEST)
    assert streaming.to_dict()["evict_distance"] == OLDEST
    assert RetentionProfile.load(streaming.save(tmp_path / "s.json")).evict_distance == OLDEST


def write(tmp_path, mutate):
    data = profile().to_dict()
    mutate(data)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["budgets"]["0.2"].update(layer_keep_fractions=[0.3, 0.2]), "expected 3 layer keep fractions"),
    (lambda d: d["budgets"]["0.2"].update(layer_keep_fractions=[0.3, 1.2, 0.0]), r"must be in \(0, 1\]; layers \[1, 2\]"),
    (lambda d: d.update(schema_version=SCHEMA_VERSION + 1), "unknown schema version"),
    (lambda d: d.update(schema="something-else"), "not a prefixkv retention profile"),
    (lambda d: d.update(budgets={}), "no calibrated keep fractions"),
    (lambda d: d["budgets"].update({"1.5": d["budgets"]["0.2"]}), r"outside \(0, 1\]"),
    (lambda d: d.pop("model"), "fingerprint is missing"),
])
def test_rejections(tmp_path, mutate, message):
    with pytest.raises(ProfileError, match=message):
        RetentionProfile.load(write(tmp_path, mutate))


def test_malformed_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        RetentionProfile.load(bad)
    with pytest.raises(ProfileError, match="prefixkv calibrate"):
        RetentionProfile.load(tmp_path / "missing.json")


def test_missing_keep_fraction_offers_nearest():
    with pytest.raises(ProfileError, match=r"calibrated: 0.2, 0.5\); use the nearest, 0.2 or 0.5"):
        profile().layer_fractions(0.3)


def test_model_mismatch(tmp_path):
    path = profile().save(tmp_path / "p.json")
    with pytest.raises(ProfileError, match="the profile has 3 layers but the model has 30"):
        RetentionProfile.load(path, Fingerprint("LlamaForCausalLM", 30, 9, 3, 64, "zzz"))
    with pytest.raises(ProfileError, match="config_hash: profile 'abc123' vs model 'other'"):
        RetentionProfile.load(path, Fingerprint("LlamaForCausalLM", 3, 4, 2, 16, "other"))


def test_fingerprint_of_a_config():
    from transformers import LlamaConfig

    fp = Fingerprint.of(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    assert (fp.layers, fp.heads, fp.kv_heads, fp.head_dim) == (3, 4, 2, 16)


# -- strict schema (issue 16): exact types, finite ranges, unique keys, exact keep fractions ---
def load_error(tmp_path, mutate) -> str:
    with pytest.raises(ProfileError) as caught:
        RetentionProfile.load(write(tmp_path, mutate))
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"{tmp_path / 'p.json'}: ")
    return message[len(f"{tmp_path / 'p.json'}: "):]


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(protect_last="false"), 'protect_last: must be true or false, got "false"'),
    (lambda d: d.update(sink=True), "sink: must be an integer, got true"),
    (lambda d: d.update(sink=4.0), "sink: must be an integer, got 4.0"),
    (lambda d: d.update(sink=-1), r"sink: must be in \[0, 1000000\], got -1"),
    (lambda d: d.update(sink=2**64), r"sink: must be in \[0, 1000000\], got 18446744073709551616"),
    (lambda d: d["allocation"].update(blend=float("nan")), "allocation.blend: must be a finite number, got nan"),
    (lambda d: d["allocation"].update(blend=1.5), r"allocation.blend: must be in \[0, 1\], got 1.5"),
    (lambda d: d["allocation"].update(min_layer_keep=-0.1), r"allocation.min_layer_keep: must be in \[0, 1\], got -0.1"),
    (lambda d: d["budgets"]["0.2"].update(layer_keep_std=[0.0, float("inf"), 0.0]),
     r'budgets."0.2".layer_keep_std\[1\]: must be a finite number, got inf'),
    (lambda d: d["budgets"]["0.2"].update(layer_keep_std=[0.0, -1.0, 0.0]), r'budgets."0.2".layer_keep_std\[1\]: must be >= 0'),
    (lambda d: d["budgets"]["0.2"].update(layer_keep_std=[0.0]), r'budgets."0.2".layer_keep_std: expected 3 layer keep spreads'),
    (lambda d: d["budgets"]["0.2"]["layer_keep_fractions"].__setitem__(2, 1.5),
     r'budgets."0.2".layer_keep_fractions\[2\]: must be in \(0, 1\], got 1.5'),
    (lambda d: d["budgets"]["0.2"]["layer_keep_fractions"].__setitem__(2, True),
     r'budgets."0.2".layer_keep_fractions\[2\]: must be a finite number, got true'),
    (lambda d: d["budgets"].update({"0.20": d["budgets"]["0.2"]}), r'budgets."0.20": keep fraction 0.2 is given twice'),
    (lambda d: d["budgets"].update({"0.2000000000001": d["budgets"]["0.2"]}), "within 1e-09 of 0.2"),
    (lambda d: d["budgets"].update({" 0.3": d["budgets"]["0.2"]}), r'budgets." 0.3": keep fraction key must be a number'),
    (lambda d: d["budgets"].update({"nan": d["budgets"]["0.2"]}), r'budgets.nan: keep fraction key must be a number'),
    (lambda d: d.update(unknown=1), "unknown: is not a field of a version 1 profile"),
    (lambda d: d["model"].update(layers="3"), 'model.layers: must be an integer, got "3"'),
    (lambda d: d["model"].update(layers=0), r"model.layers: must be in \[1, 10000\]"),
    (lambda d: d["model"].update(architecture="x" * 300), "model.architecture: must be at most 256 characters"),
    (lambda d: d.update(calibration={"a": json.loads("[" * 20 + "]" * 20)}), "calibration.a.*: is nested deeper than 16 levels"),
    (lambda d: d.update(calibration={"n": float("nan")}), "calibration.n: must be a finite number"),
    (lambda d: d.update(scorer={"name": "window", "params": {"window": 10**30}}), "scorer.params.window: must be a 64-bit integer"),
    (lambda d: d.update(schema_version=True), "unknown schema version true"),
    (lambda d: d.update(evict_distance=0), r"evict_distance: must be in \[1, 1073741824\], got 0"),
    (lambda d: d.update(evict_distance=25.0), "evict_distance: must be an integer, got 25.0"),
])
def test_strict_rejections(tmp_path, mutate, message):
    import re

    assert re.search(message, load_error(tmp_path, mutate))


def test_any_json_is_refused_with_one_profile_error(tmp_path):
    path = tmp_path / "p.json"
    for raw, message in [(b"[1, 2]", "not a prefixkv retention profile"), (b"null", "not a prefixkv retention profile"),
                         (b"[" * 100_000, "nested too deeply"), (b"1" * 5000, "not valid JSON"),
                         (b"\xff\xfe{}", "not UTF-8"), (b'{"schema": 1, "schema": 2}', "schema: the key appears more than once")]:
        path.write_bytes(raw)
        with pytest.raises(ProfileError, match=message) as caught:
            RetentionProfile.load(path)
        assert type(caught.value) is ProfileError and len(str(caught.value).splitlines()) == 1
    for data in [[], "x", 3, None, {1: 2}]:
        with pytest.raises(ProfileError, match="^in-memory: "):
            RetentionProfile.from_dict(data, "in-memory")


def test_duplicate_json_keys_are_named_by_path(tmp_path):
    text = json.dumps(profile().to_dict()).replace('"0.5": {', '"0.5": {"layer_keep_std": [1, 1, 1], ')
    (tmp_path / "p.json").write_text(text)
    with pytest.raises(ProfileError, match=r'budgets."0.5".layer_keep_std: the key appears more than once'):
        RetentionProfile.load(tmp_path / "p.json")


def test_keep_fractions_round_trip_exactly(tmp_path):
    p = profile()
    p.calibrated[0.123456789] = LayerKeep([0.1, 0.1, 0.1], [0.0, 0.0, 0.0])
    p.calibrated[0.2000001] = LayerKeep([0.4, 0.4, 0.4], [0.0, 0.0, 0.0])
    loaded = RetentionProfile.load(p.save(tmp_path / "p.json"))
    assert loaded.keep_fractions == [0.123456789, 0.2, 0.2000001, 0.5]
    assert loaded.layer_fractions(0.123456789) == [0.1, 0.1, 0.1]
    assert loaded.layer_fractions(0.2) == [0.3, 0.2, 0.1] and loaded.layer_fractions(0.2000001) == [0.4, 0.4, 0.4]
    assert loaded.layer_fractions(0.2 + 1e-10) == [0.3, 0.2, 0.1]  # float noise
    with pytest.raises(ProfileError, match="keep fraction 0.20000001 is not in this profile"):
        loaded.layer_fractions(0.2 + 1e-8)
    assert '"0.123456789":' in (tmp_path / "p.json").read_text()


def test_files_with_6_digit_keys_still_load(tmp_path):
    data = profile().to_dict()
    data["budgets"] = {"1": {"layer_keep_fractions": [1, 1, 1]}, "0.123457": data["budgets"]["0.2"], "1e-05": data["budgets"]["0.5"]}
    (tmp_path / "p.json").write_text(json.dumps(data))
    loaded = RetentionProfile.load(tmp_path / "p.json")
    assert loaded.keep_fractions == [1e-05, 0.123457, 1.0]
    assert loaded.calibrated[1.0].layer_keep_std == [0.0, 0.0, 0.0]  # absent spread: zeros
    assert all(type(f) is float for f in loaded.calibrated[1.0].layer_keep_fractions)


@pytest.mark.parametrize("build,message", [
    (lambda: RetentionProfile(FP, -1, {}), r"sink: must be in \[0, 1000000\], got -1"),
    (lambda: RetentionProfile(FP, True, {}), "sink: must be an integer, got true"),
    (lambda: RetentionProfile(FP, 4, {}, protect_last="false"), "protect_last: must be true or false"),
    (lambda: RetentionProfile(FP, 4, {}, blend=float("nan")), "blend: must be a finite number"),
    (lambda: RetentionProfile(FP, 4, {0.2: LayerKeep([0.3, 0.2], [0, 0])}), "expected 3 layer keep fractions"),
    (lambda: RetentionProfile(FP, 4, {1.5: LayerKeep([0.3, 0.2, 0.1], [0, 0, 0])}), r"keep fraction 1.5 is outside \(0, 1\]"),
    (lambda: RetentionProfile(FP, 4, {0.2: LayerKeep([0.3] * 3, [0] * 3), 0.2 + 1e-12: LayerKeep([0.3] * 3, [0] * 3)}), "within 1e-09"),
    (lambda: RetentionProfile(FP, 4, {}, calibration={"x": object()}), "calibration.x: must be a JSON value"),
    (lambda: LayerKeep([0.1, float("nan")], [0, 0]), r"LayerKeep.layer_keep_fractions\[1\]: must be a finite number"),
    (lambda: LayerKeep([0.1, 0.0], [0, 0]), r"LayerKeep.layer_keep_fractions\[1\]: must be in \(0, 1\], got 0.0"),
    (lambda: LayerKeep([0.1], [0, 0]), "LayerKeep.layer_keep_std: expected 1 values"),
])
def test_profiles_built_in_code_are_held_to_the_same_rules(build, message):
    with pytest.raises(ProfileError, match=message) as caught:
        build()
    assert str(caught.value).startswith("RetentionProfile: ")


def test_save_refuses_what_load_would(tmp_path):
    empty = RetentionProfile(FP, 4, {})  # allowed in code, to be filled in
    with pytest.raises(ProfileError, match="no calibrated keep fractions"):
        empty.save(tmp_path / "p.json")
    p = profile()
    p.blend = float("inf")  # changed after construction
    with pytest.raises(ProfileError, match="allocation.blend: must be a finite number"):
        p.save(tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()


def test_the_message_names_file_and_field(tmp_path):
    def mutate(d):
        d["model"]["layers"] = 4
        for b in d["budgets"].values():
            b["layer_keep_fractions"] = [0.3, 0.2, 0.1, 1.5]
            b["layer_keep_std"] = [0.0] * 4
    assert load_error(tmp_path, mutate) == 'budgets."0.2".layer_keep_fractions[3]: must be in (0, 1], got 1.5'


def test_sizes_are_bounded(tmp_path):
    def many(d):
        entry = d["budgets"]["0.2"]
        d["budgets"] = {repr(i / 2000): entry for i in range(1, 1002)}
    assert "budgets: must have at most 1000 entries, got 1001" in load_error(tmp_path, many)
    assert "scorer.name: must be at most 256 characters" in load_error(tmp_path, lambda d: d["scorer"].update(name="s" * 257))
    assert "must be at most 10000 characters" in load_error(tmp_path, lambda d: d["calibration"].update(note="n" * 10_001))
