"""benchmarks.serve_profile: collapsed py-spy stacks summarized per thread and per function."""

from __future__ import annotations

from benchmarks.serve_profile import summarize

STACKS = """thread (0x1);_loop (model.py:600);step (executor.py:411);execute (model_runner.py:150) 6
thread (0x1);_loop (model.py:600);step (executor.py:411) 2
thread (0x2);_sender_loop (model.py:367);_send_output (model.py:405);send (pb_utils) 2
not a stack line
"""


def test_summarize_shares_by_thread_and_function() -> None:
    got = summarize(STACKS, top=3)
    assert got["samples"] == 10
    assert got["threads"] == [("thread (0x1)", 0.8), ("thread (0x2)", 0.2)]
    assert got["self"] == [
        ("execute (model_runner.py:150)", 0.6),
        ("step (executor.py:411)", 0.2),
        ("send (pb_utils)", 0.2),
    ]
    assert got["inclusive"][:2] == [("_loop (model.py:600)", 0.8), ("step (executor.py:411)", 0.8)]
    assert summarize("") == {"samples": 0, "threads": [], "self": [], "inclusive": []}
