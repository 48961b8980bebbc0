"""Keep a host's cores from idling: one busy loop per core at the SCHED_IDLE policy, until stopped.

``python -m benchmarks.idle_poll [--cores N] [--seconds S]``. A SCHED_IDLE thread runs only when nothing
else on its core wants to, and yields to a waking thread at once, so the cores never halt between
requests while every other process runs as before: what the kernel's ``idle=poll`` does, from user space
and for as long as this runs (each core at 100 % busy: power). For measuring what a host's idle states
cost the server's Python stages (a Triton stub sleeps between requests): run it beside a benchmark, then
without. Stops on SIGTERM / SIGINT or after ``--seconds``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def _spin() -> None:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    while True:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="busy loops (default: every core)")
    ap.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: until signalled)")
    args = ap.parse_args(argv)
    if args.cores < 1:
        ap.error(f"--cores: {args.cores} must be >= 1")
    children = []
    for _ in range(args.cores):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _spin()
        children.append(pid)

    def stop(*_) -> None:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in children:
            os.waitpid(pid, 0)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"idle_poll: {args.cores} SCHED_IDLE busy loops (pids {children[0]}..{children[-1]})", flush=True)
    if args.seconds > 0:
        time.sleep(args.seconds)
        stop()
    while True:
        signal.pause()


if __name__ == "__main__":
    raise SystemExit(main())
