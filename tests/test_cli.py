"""CLI: bad input gives one line naming the fix and a non-zero exit."""
import pytest

from prefixkv.cli import main


def test_bad_keep_fraction(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "--keep", "1.5"])
    assert exit_info.value.code == 2
    assert "keep fractions must be in (0, 1]" in capsys.readouterr().err


def test_unknown_model(capsys, tmp_path):
    assert main(["calibrate", "--model", "no-such-model", "--output", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'no-such-model'") and len(err.strip().splitlines()) == 1


def test_unknown_scorer(capsys, tmp_path):
    assert main(["calibrate", "--scorer", "vibes", "--output", str(tmp_path / "p.json")]) == 2
    assert "unknown scorer 'vibes'" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "calibrate" in capsys.readouterr().err


def test_odd_paired_process_count(capsys):
    """An odd count would weigh one load order more than the other in a paired figure."""
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "speed", "--paired-processes", "3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "need 1 process or an even count" in err and "got 3" in err
