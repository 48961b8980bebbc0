"""benchmarks.idle_poll: one busy loop per asked core, each at the SCHED_IDLE policy, all gone when it stops
(on SIGTERM, and after --seconds)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from benchmarks.results import REPO_ROOT


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _wait_for(cond, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux's")
def test_idle_poll_runs_sched_idle_loops_until_stopped() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.idle_poll", "--cores", "2"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().startswith("idle_poll: 2 SCHED_IDLE busy loops")
        children = _wait_for(lambda: len(_children(proc.pid)) == 2 and _children(proc.pid))
        for pid in children:
            _wait_for(lambda pid=pid: os.sched_getscheduler(pid) == os.SCHED_IDLE)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        for pid in children:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_idle_poll_stops_after_seconds_and_refuses_no_cores() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.idle_poll", "--cores", "1", "--seconds", "0.5"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0 and "1 SCHED_IDLE busy loops" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "benchmarks.idle_poll", "--cores", "0"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "--cores: 0 must be >= 1" in bad.stderr
