"""StopRequest: set from signal handlers while the main thread waits on it, with no deadlock."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from build_engine.stop_signal import StopRequest

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_wait_returns_false_until_set_then_true() -> None:
    stop = StopRequest()
    try:
        assert stop.wait(0.01) is False
        assert stop.is_set() is False
        stop.set()
        stop.set()
        assert stop.is_set() is True
        assert stop.wait(None) is True
    finally:
        stop.close()


def test_signal_storm_while_the_main_thread_waits_never_deadlocks() -> None:
    """Thousands of SIGTERMs land while the main thread is inside wait(); each handler run must return.

    A handler that takes a lock the interrupted main thread holds (threading.Event.set() against
    Event.wait()) blocks for good; under a storm each further signal nests another blocked handler until
    RecursionError. Either way the subprocess fails or runs into the timeout.
    """
    script = textwrap.dedent(
        """
        import os, signal, threading, time
        from build_engine.stop_signal import StopRequest

        stop = StopRequest().install()
        sent = threading.Event()

        def storm():
            for _ in range(1000):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.0001)
            sent.set()

        threading.Thread(target=storm, daemon=True).start()
        waits = 0
        while not sent.is_set():
            stop.wait(0)
            waits += 1
        assert stop.is_set()
        print("ok", waits > 0)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok True"
