"""RetentionProfile: round trip and every rejection, with its message."""
import json

import pytest

from prefixkv.profile import SCHEMA_VERSION, Budget, Fingerprint, ProfileError, RetentionProfile

FP = Fingerprint("LlamaForCausalLM", 3, 4, 2, 16, "abc123")


def profile():
    return RetentionProfile(FP, 4, {0.2: Budget([0.3, 0.2, 0.1], [0.01, 0.02, 0.03]), 0.5: Budget([0.6, 0.5, 0.4], [0, 0, 0])},
                            scorer="window", scorer_params={"window": 8, "pool": 5}, min_layer_keep=0.25, blend=0.5,
                            calibration={"samples": 16})


def test_round_trip(tmp_path):
    path = profile().save(tmp_path / "p.json")
    loaded = RetentionProfile.load(path, FP)
    assert loaded.layer_fractions(0.2) == [0.3, 0.2, 0.1]
    assert loaded.keep_fractions == [0.2, 0.5]
    assert (loaded.scorer, loaded.scorer_params, loaded.min_layer_keep, loaded.blend) == ("window", {"window": 8, "pool": 5}, 0.25, 0.5)
    assert loaded.budgets[0.2].layer_keep_std == [0.01, 0.02, 0.03]
    assert loaded.to_dict() == profile().to_dict()
    assert not list(tmp_path.glob(".p.json.*"))  # no temporary file left


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
