"""A stop request that a signal handler may set: no lock is taken on either side.

Contract:
- `StopRequest.set()` is safe to call from a Python signal handler. A handler runs in the main thread
  between two bytecodes, so anything that takes a non-reentrant lock the main thread may already hold
  (`threading.Event.set()` while the main thread sits in `Event.wait()`) can deadlock the process for good.
  Here `set()` only assigns a flag and writes one byte to a non-blocking pipe.
- `wait(timeout_s)` returns True as soon as the request is set (the pipe wakes it), else after the timeout
  with False; `is_set()` never blocks. Setting it twice, or from several signals, is the same as once.
- `install()` makes SIGTERM and SIGINT set it; `close()` releases the pipe.
"""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Sequence

__all__ = ["StopRequest"]


class StopRequest:
    """A one-way flag for "stop now", set from signal handlers or other code, waited on by the main loop."""

    def __init__(self) -> None:
        self._is_set = False
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)

    def set(self) -> None:
        self._is_set = True
        try:
            os.write(self._write_fd, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is already pending) or closed: the flag is what counts

    def is_set(self) -> bool:
        return self._is_set

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until set or until `timeout_s` passes; True when set."""
        if self._is_set:
            return True
        try:
            select.select([self._read_fd], [], [], timeout_s)
        except (OSError, ValueError):
            pass  # closed meanwhile
        return self._is_set

    def install(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> StopRequest:
        """Let each of `signals` set this request (main thread only, like `signal.signal`)."""
        for signum in signals:
            signal.signal(signum, self._on_signal)
        return self

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.set()

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
