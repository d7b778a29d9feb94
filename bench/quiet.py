"""Run a timing command only on a quiet machine.

    python bench/quiet.py [--load 0.5] [--wait 600] -- python bench/bench_e2e.py --models smollm2

Waits (checking every 10 s, up to ``--wait`` seconds) until the 1-minute load average is below
``--load``, prints the load before and after on stderr, then runs the command and exits with its
status. If the machine stays busy past ``--wait`` it says so (the timings that follow are not
comparable with quiet ones) and runs the command anyway. The defaults come from ``QUIET_LOAD``
(0.5) and ``QUIET_WAIT_S`` (600) when set.

Importable: ``wait_until_quiet(max_load, wait_s)`` returns ``(load, waited_s, quiet)`` and
``run_quietly(cmd, ...)`` waits, runs ``cmd`` and returns its exit status. The load average is read
with ``os.getloadavg`` (Linux and macOS).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

POLL_S = 10.0


def load1() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def wait_until_quiet(max_load: float = 0.5, wait_s: float = 600.0, poll_s: float = POLL_S,
                     load: Callable[[], float] = load1, sleep: Callable[[float], None] = time.sleep
                     ) -> tuple[float, float, bool]:
    """Wait until ``load()`` is below ``max_load`` or ``wait_s`` seconds have passed.

    Returns the last load read, the seconds waited and whether the machine was quiet."""
    if max_load <= 0:
        raise ValueError(f"max_load must be > 0, got {max_load}")
    if wait_s < 0:
        raise ValueError(f"wait_s must be >= 0, got {wait_s}")
    waited = 0.0
    now = load()
    while now >= max_load:
        if waited >= wait_s:
            return now, waited, False
        step = min(poll_s, wait_s - waited)
        sleep(step)
        waited += step
        now = load()
    return now, waited, True


def run_quietly(cmd: Sequence[str], max_load: float = 0.5, wait_s: float = 600.0,
                log=None, **wait_kwargs) -> int:
    """``wait_until_quiet``, then run ``cmd``; the loads go to ``log`` (stderr). Returns the exit status."""
    log = sys.stderr if log is None else log
    if not cmd:
        raise ValueError("cmd: no command given")
    now, waited, quiet = wait_until_quiet(max_load, wait_s, **wait_kwargs)
    if not quiet:
        print(f"quiet: load {now:.2f} still >= {max_load} after {waited:.0f}s; "
              "timings below are not comparable", file=log, flush=True)
    print(f"quiet: load before {now:.2f} (waited {waited:.0f}s)", file=log, flush=True)
    rc = subprocess.call(list(cmd))
    print(f"quiet: load after {load1():.2f}", file=log, flush=True)
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/quiet.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--load", type=float, default=float(os.environ.get("QUIET_LOAD", 0.5)),
                    help="run once the 1-minute load average is below this (default 0.5, QUIET_LOAD)")
    ap.add_argument("--wait", type=float, default=float(os.environ.get("QUIET_WAIT_S", 600)),
                    help="seconds to wait at most before running anyway (default 600, QUIET_WAIT_S)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="the command (after --)")
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        ap.error("no command given (bench/quiet.py [--load L] [--wait S] -- COMMAND ...)")
    if a.load <= 0:
        ap.error(f"--load must be > 0, got {a.load}")
    if a.wait < 0:
        ap.error(f"--wait must be >= 0, got {a.wait}")
    try:
        return run_quietly(cmd, a.load, a.wait)
    except FileNotFoundError:
        print(f"bench/quiet.py: error: command not found: {cmd[0]}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
