"""bench/quiet.py, the benchmarks' timing helper: it waits for a quiet machine, gives up after the
wait it was given, and passes the command's exit status through."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

QUIET = Path(__file__).resolve().parents[1] / "bench" / "quiet.py"
spec = importlib.util.spec_from_file_location("quiet", QUIET)
quiet = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quiet)


def fake(loads):
    """A load() that returns ``loads`` in turn and a sleep() that records its naps."""
    it, naps = iter(loads), []
    return (lambda: next(it)), naps.append, naps


def test_waits_until_the_load_drops():
    load, sleep, naps = fake([2.0, 1.0, 0.4, 9.0])
    assert quiet.wait_until_quiet(0.5, 600, poll_s=10, load=load, sleep=sleep) == (0.4, 20, True)
    assert naps == [10, 10]


def test_quiet_at_once_does_not_sleep():
    load, sleep, naps = fake([0.1])
    assert quiet.wait_until_quiet(0.5, 600, load=load, sleep=sleep) == (0.1, 0, True)
    assert naps == []


def test_gives_up_after_the_wait():
    load, sleep, naps = fake([3.0] * 10)
    now, waited, ok = quiet.wait_until_quiet(0.5, 25, poll_s=10, load=load, sleep=sleep)
    assert (now, waited, ok) == (3.0, 25, False)
    assert naps == [10, 10, 5]  # never sleeps past the wait


@pytest.mark.parametrize("kw", [{"max_load": 0}, {"wait_s": -1}])
def test_bad_arguments(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        quiet.wait_until_quiet(**kw)


def test_cli_passes_the_exit_status_and_reports_the_load():
    r = subprocess.run([sys.executable, str(QUIET), "--load", "1000", "--", sys.executable, "-c",
                        "print('ran'); raise SystemExit(3)"], capture_output=True, text=True)
    assert r.returncode == 3
    assert r.stdout == "ran\n"
    assert "quiet: load before" in r.stderr and "quiet: load after" in r.stderr


def test_busy_machine_runs_anyway_and_says_so(capsys):
    load, sleep, naps = fake([3.0] * 5)
    rc = quiet.run_quietly([sys.executable, "-c", "raise SystemExit(4)"], 0.5, 20, poll_s=10,
                           load=load, sleep=sleep)
    assert rc == 4 and naps == [10, 10]
    assert "load 3.00 still >= 0.5 after 20s" in capsys.readouterr().err


def test_cli_without_a_command_is_a_usage_error():
    r = subprocess.run([sys.executable, str(QUIET), "--load", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and "no command given" in r.stderr
