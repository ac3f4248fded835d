"""`prefixkv profile import`: the released PrefixKV lists (per-layer evicted fractions) as retention profiles."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from test_export import tiny_model_folder

from prefixkv.cache import PrefixKVCache, cache_argument
from prefixkv.cli import main
from prefixkv.profile import Fingerprint, ProfileError, RetentionProfile
from prefixkv.released import (
    import_profiles,
    kept_fractions,
    model_config,
    ratio_from_name,
)

# hand-made released lists for the tiny model's 3 layers: means 0.8 - 0.01 and 0.5 + 0.01 evicted
TINY_08 = [0.7, 0.81, 0.86]
TINY_05 = [0.2, 0.53, 0.8]


def write(folder: Path, name: str, value) -> Path:
    path = folder / name
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return path


def expected(evicted: list[float], keep: float) -> list[float]:
    """1 - r_l, scaled so the mean is ``keep`` (written here from the rule, not taken from the code)."""
    kept = [1 - r for r in evicted]
    return [k * keep * len(kept) / sum(kept) for k in kept]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, folder, fingerprint): the tiny Llama saved with a tokenizer, and its config's fingerprint."""
    from transformers import AutoConfig

    model, folder = tiny_model_folder(tmp_path_factory.mktemp("tiny"))
    return model, folder, Fingerprint.of(AutoConfig.from_pretrained(folder))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("name, ratio", [
    ("prefixkv_llava-v1.5-7b_0.8.json", 0.8), ("prefixkv_llava-v1.5-13b_0.1.json", 0.1), ("x_0.25.json", 0.25),
    ("x_1.json", 1.0), ("x_-0.2.json", -0.2), ("profile.json", None), ("x_abc.json", None), ("x_0.8.txt", None),
])
def test_ratio_from_the_file_name(name, ratio):
    assert ratio_from_name(Path("confs") / name) == ratio


def test_cli_import_for_the_tiny_model(tiny, tmp_path, capsys):
    """Two released budgets -> one profile: keep 1 - ratio, layers 1 - r_l rescaled, the sources and settings recorded."""
    _, folder, fingerprint = tiny
    f08 = write(tmp_path, "prefixkv_tiny_0.8.json", TINY_08)
    f05 = write(tmp_path, "prefixkv_tiny_0.5.json", TINY_05)
    out = tmp_path / "imported.json"
    assert main(["profile", "import", str(f08), str(f05), "--model", str(folder), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "keep 0.2 (released ratio 0.8)" in err and f"profile: {out}" in err

    profile = RetentionProfile.load(out, fingerprint)  # as eval / build / validate load it
    assert profile.keep_fractions == [0.2, 0.5]
    for keep, evicted in ((0.2, TINY_08), (0.5, TINY_05)):
        fractions = profile.layer_fractions(keep)
        assert fractions == pytest.approx(expected(evicted, keep), abs=1e-12)
        assert sum(fractions) / 3 == pytest.approx(keep, abs=1e-12)
    assert (profile.sink, profile.protect_last, profile.scorer, profile.scorer_params) == (1, True, "accumulated", {})
    assert (profile.blend, profile.min_layer_keep, profile.curve) == (1.0, 0.0, "all") and profile.departures() == []
    cal = profile.calibration
    assert cal["settings"] == "released PrefixKV (THU-MIG/PrefixKV)"
    assert cal["imported_from"] == [{"file": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in (f08, f05)]
    assert cal["released_ratio"] == {"0.2": 0.8, "0.5": 0.5}
    assert cal["raw_mean_keep"]["0.2"] == pytest.approx(0.21) and cal["raw_mean_keep"]["0.5"] == pytest.approx(0.49)

    # an existing profile is kept unless --force
    assert main(["profile", "import", str(f08), "--model", str(folder), "--output", str(out)]) == 2
    assert "pass --force" in one_line_error(capsys)
    assert main(["profile", "import", str(f08), "--model", str(folder), "--output", str(out), "--force"]) == 0
    assert RetentionProfile.load(out, fingerprint).keep_fractions == [0.2]


@torch.no_grad()
def test_the_imported_profile_drives_the_cache(tiny, tmp_path):
    """Applied like a calibrated profile: per-layer lengths round(f x N), then a short generate."""
    model, _, fingerprint = tiny
    path = tmp_path / "p.json"
    import_profiles([write(tmp_path, "released_0.8.json", TINY_08)], fingerprint).save(path)
    profile = RetentionProfile.load(path, fingerprint)
    profile.check_model(Fingerprint.of(model.config))
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    cache = PrefixKVCache(profile, keep_fraction=0.2)
    model(input_ids=ids, **cache_argument(model, cache))
    assert cache.layer_lengths()[:, 0].tolist() == [round(f * 40) for f in expected(TINY_08, 0.2)]
    out = model.generate(ids, max_new_tokens=5, do_sample=False, **cache_argument(model, PrefixKVCache(profile, keep_fraction=0.2)))
    assert out.shape == (1, 45)


def test_eval_takes_the_imported_profile(tiny, tmp_path, capsys):
    folder = tiny[1]
    out = tmp_path / "p.json"
    assert main(["profile", "import", str(write(tmp_path, "released_0.5.json", TINY_05)), "--model", str(folder),
                 "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(folder), "--profile", str(out), "--keep", "0.5", "--samples", "1",
                 "--tokens", "48", "--max-new-tokens", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == "prefixkv" and result["keep_fraction"] == 0.5


def test_library_import_with_an_explicit_ratio(tiny, tmp_path):
    _, _, fingerprint = tiny
    profile = import_profiles([write(tmp_path, "lists.json", TINY_05)], fingerprint, ratio=0.5)
    assert profile.layer_fractions(0.5) == pytest.approx(expected(TINY_05, 0.5), abs=1e-12)
    assert kept_fractions([0.0, 0.25, 0.5], 3) == [1.0, 0.75, 0.5]
    # a layer pushed over 1 by the rescale is capped there
    capped = import_profiles([write(tmp_path, "c_0.2.json", [0.05, 0.9, 0.9])], fingerprint).layer_fractions(0.8)
    assert max(capped) == 1.0


def test_smollm2_thirty_layers(tmp_path, capsys):
    """SmolLM2-135M's 30 layers, by built-in name (its config only: no weights are loaded)."""
    fingerprint = Fingerprint.of(model_config("smollm2-135m"))
    assert fingerprint.layers == 30
    evicted = {r: [min(max(r + 0.1 * ((i % 5) - 2) / 2, 0.0), 0.99) for i in range(30)] for r in (0.9, 0.8, 0.7, 0.5)}
    files = [write(tmp_path, f"prefixkv_smollm2-135m_{r}.json", v) for r, v in evicted.items()]
    out = tmp_path / "smollm2.json"
    assert main(["profile", "import", *map(str, files), "--model", "smollm2-135m", "--output", str(out)]) == 0
    profile = RetentionProfile.load(out, fingerprint)
    assert profile.keep_fractions == pytest.approx([0.1, 0.2, 0.3, 0.5])
    for r, v in evicted.items():
        fractions = profile.layer_fractions(round(1 - r, 12))
        assert len(fractions) == 30 and sum(fractions) / 30 == pytest.approx(1 - r, abs=1e-12)
        assert fractions == pytest.approx(expected(v, 1 - r), abs=1e-12)
    # the same lists with the library
    assert import_profiles(files, fingerprint).calibrated == profile.calibrated
    capsys.readouterr()
    # the tiny model's lists are refused: wrong layer count
    assert main(["profile", "import", str(write(tmp_path, "t_0.8.json", TINY_08)), "--model", "smollm2-135m",
                 "--output", str(tmp_path / "t.json")]) == 2
    err = one_line_error(capsys)
    assert "t_0.8.json: has 3 layer fractions but the model has 30 layers" in err


ERRORS = [  # (file name, content, extra args, message fragment)
    ("a_0.8.json", {"0": 0.8}, [], "is not a released PrefixKV profile: expected a JSON list of numbers"),
    ("a_0.8.json", [0.8, "0.8", 0.8], [], "expected a JSON list of numbers"),
    ("a_0.8.json", [0.8, True, 0.8], [], "expected a JSON list of numbers"),
    ("a_0.8.json", "[0.8, 0.8", [], "is not valid JSON (line 1"),
    ("a_0.8.json", [0.8, 0.8], [], "a_0.8.json: has 2 layer fractions but the model has 3 layers"),
    ("a_0.8.json", [0.8, 1.5, 0.8], [], "a_0.8.json: layer 1: evicted fraction 1.5 is outside [0, 1]"),
    ("a_0.8.json", [0.8, 0.8, -0.1], [], "layer 2: evicted fraction -0.1 is outside [0, 1]"),
    ("a_0.8.json", "[0.8, NaN, 0.8]", [], "layer 1: evicted fraction nan is outside [0, 1]"),
    ("a_0.8.json", [0.8, 0.8, 1.0], [], "layer 2: evicted fraction 1.0 keeps nothing"),
    ("lists.json", TINY_08, [], "lists.json: no ratio in the file name (expected ..._<ratio>.json"),
    ("a_0.json", TINY_08, [], "a_0.json: released ratio 0.0 is outside (0, 1)"),
    ("a_1.json", TINY_08, [], "released ratio 1.0 is outside (0, 1)"),
    ("a_-0.2.json", TINY_08, [], "released ratio -0.2 is outside (0, 1)"),
    ("lists.json", TINY_08, ["--ratio", "1.2"], "released ratio 1.2 is outside (0, 1) (the released ratio is the share evicted"),
    ("lists.json", TINY_08, ["--ratio", "0"], "released ratio 0.0 is outside (0, 1)"),
    ("a_0.8.json", TINY_08, ["--ratio", "0.2"], "--ratio 0.2 disagrees with the file name's 0.8"),
]


@pytest.mark.parametrize("name, content, extra, message", ERRORS, ids=[m[:40] for *_, m in ERRORS])
def test_bad_input_is_one_line(tiny, tmp_path, capsys, name, content, extra, message):
    _, folder, fingerprint = tiny
    path = write(tmp_path, name, content)
    out = tmp_path / "out.json"
    assert main(["profile", "import", str(path), "--model", str(folder), "--output", str(out), *extra]) == 2
    assert message in one_line_error(capsys)
    assert not out.exists()
    ratio = float(extra[1]) if extra else None
    with pytest.raises(ProfileError, match="^" + re.escape(str(path))):
        import_profiles([path], fingerprint, ratio=ratio)


def test_several_files_errors(tiny, tmp_path, capsys):
    _, folder, _ = tiny
    a = write(tmp_path, "a_0.8.json", TINY_08)
    b = write(tmp_path, "b_0.80.json", TINY_08)
    c = write(tmp_path, "c_0.5.json", TINY_05)
    out = str(tmp_path / "out.json")
    assert main(["profile", "import", str(a), str(b), "--model", str(folder), "--output", out]) == 2
    assert "b_0.80.json: gives keep fraction 0.2 (ratio 0.8), as a_0.8.json does; import each budget once" in one_line_error(capsys)
    assert main(["profile", "import", str(a), str(c), "--ratio", "0.8", "--model", str(folder), "--output", out]) == 2
    assert "--ratio applies to one file, got 2" in one_line_error(capsys)
    assert main(["profile", "import", str(tmp_path / "missing_0.8.json"), "--model", str(folder), "--output", out]) == 2
    assert "no released profile at" in one_line_error(capsys)
    assert main(["profile", "import", str(a), "--model", "no-such-model", "--output", out]) == 2
    assert "unknown model 'no-such-model'" in one_line_error(capsys)
    assert not Path(out).exists()


def test_the_command_needs_files_and_says_how_the_ratio_maps(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "import", "--model", "x", "--output", "y"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(["profile", "import", "--help"])
    assert "share EVICTED: it becomes keep 1 - r" in " ".join(capsys.readouterr().out.split())
    assert main(["profile"]) == 2
    assert "import" in capsys.readouterr().err
