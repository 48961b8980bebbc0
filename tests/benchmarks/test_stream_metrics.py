from __future__ import annotations

import pytest

from benchmarks.metrics import RequestRecord, StreamTimer, distribution_ms, percentile, summarize


def test_stream_timer_ttft_itl_e2e_from_running_counts() -> None:
    timer = StreamTimer()
    t0 = timer.record.start_s
    assert timer.tokens(1, at=t0 + 0.100) == 1  # first token: TTFT 100 ms
    assert timer.tokens(1, at=t0 + 0.150) == 0  # a response with no new token changes nothing
    assert timer.tokens(3, at=t0 + 0.140) == 2  # two tokens after 40 ms: 20 ms each
    assert timer.tokens(4, at=t0 + 0.150) == 1
    record = timer.finish("length", at=t0 + 0.160)
    assert record.ttft_s == pytest.approx(0.100)
    assert record.itl_s == pytest.approx([0.020, 0.020, 0.010])
    assert record.gap_s == pytest.approx([0.040, 0.010])  # what a reader waits: once per response
    assert record.e2e_s == pytest.approx(0.160)
    assert record.num_output_tokens == 4
    assert record.finish_reason == "length" and record.is_ok


def test_stream_timer_counts_new_tokens_and_failures() -> None:
    timer = StreamTimer()
    t0 = timer.record.start_s
    timer.tokens(new=1, at=t0 + 0.05)
    timer.tokens(new=1, at=t0 + 0.07)
    record = timer.finish("stop", num_output_tokens=5, at=t0 + 0.08)
    assert record.num_output_tokens == 5  # the server's usage count wins when larger
    failed = StreamTimer().fail("image_input[0]: image is 12000000 bytes, over the limit")
    assert not failed.is_ok and failed.error.startswith("image_input[0]")


def test_percentile_interpolates_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(list(range(101)), 95) == 95.0
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_distribution_ms_and_empty_input() -> None:
    assert distribution_ms([0.001, 0.002, 0.003]) == {"p50": 2.0, "p95": 2.9, "p99": 2.98, "mean": 2.0}
    assert distribution_ms([]) == {"p50": None, "p95": None, "p99": None, "mean": None}


def test_summarize_counts_only_successful_requests() -> None:
    ok = [
        RequestRecord(start_s=0, ttft_s=0.1, e2e_s=1.0, itl_s=[0.01] * 9, num_output_tokens=10),
        RequestRecord(start_s=0, ttft_s=0.3, e2e_s=2.0, itl_s=[0.03] * 9, num_output_tokens=10),
    ]
    bad = [RequestRecord(start_s=0, e2e_s=0.01, error="max_tokens: 0 is under 1")] * 3
    row = summarize(ok + bad, wall_s=4.0)
    assert row["requests"] == 2 and row["errors"] == 3
    assert row["rps"] == 0.5 and row["output_tok_s"] == 5.0
    assert row["ttft_ms"]["p50"] == 200.0
    assert row["itl_ms"]["p50"] == 20.0
    assert row["e2e_ms"]["p99"] == pytest.approx(1990.0)
    assert row["error_messages"] == {"max_tokens: 0 is under 1": 3}


def test_steady_state_drops_the_opening_burst_and_measures_its_own_window() -> None:
    from benchmarks.metrics import RequestRecord, steady_state

    def rec(start: float, ttft: float, e2e: float, tokens: int = 10) -> RequestRecord:
        return RequestRecord(start_s=start, ttft_s=ttft, e2e_s=e2e, num_output_tokens=tokens)

    burst = [rec(0.0, 3.0 + i, 5.0 + i) for i in range(2)]  # both sent at once: queued first tokens
    later = [rec(5.0, 0.2, 2.0), rec(6.0, 0.4, 2.0), rec(7.0, 0.3, 1.0)]
    row = steady_state(burst + later, concurrency=2)
    assert row["requests"] == 3 and row["window_s"] == 3.0  # from 5.0 to the last finish at 8.0
    assert row["output_tok_s"] == 10.0 and row["ttft_ms"]["p50"] == 300.0
    assert steady_state(burst + later[:1], concurrency=2) is None  # fewer than 2 after the burst


def test_engine_delta_sums_the_instances_between_two_scrapes() -> None:
    from benchmarks.metrics import ENGINE_TOTALS, engine_delta, parse_totals

    def body(total: int, collections: int) -> str:
        lines = []
        for instance in ("llm_0_0", "llm_0_1"):  # two instances: their series add up
            for name in ENGINE_TOTALS:
                value = {
                    "glmv_inter_token_latency_seconds_count": total,
                    "glmv_inter_token_latency_seconds_sum": total * 0.02,
                    "glmv_model_gc_collections_total": collections,
                    "glmv_model_gc_seconds_total": collections * 0.05,
                }.get(name, 0)
                lines.append(f'{name}{{model="llm",model_instance="{instance}",version="1"}} {value}')
        return "\n".join(lines) + "\n"

    before, after = parse_totals(body(5, 0)), parse_totals(body(55, 1))
    assert after["glmv_inter_token_latency_seconds_count"] == 110.0
    delta = engine_delta(before, after)
    assert delta["llm_itl_ms_mean"] == pytest.approx(20.0)
    assert delta["stub_gc_full_collections"] == 2 and delta["stub_gc_full_ms"] == pytest.approx(100.0)
    assert delta["gc_full_collections"] == 0 and delta["steps"] == 0 and delta["ahead_fraction"] is None
    assert engine_delta(after, after)["llm_itl_ms_mean"] is None


def test_stream_timer_takes_the_engines_token_times_apart_from_the_path() -> None:
    """With each response's last_token_time_ns: the tokens' gaps as the engine made them (per token, as the
    client's) and each response's delay from the engine to the client."""
    timer = StreamTimer()
    t0, w0 = timer.record.start_s, 1_000_000_000_000
    ms = 1_000_000
    timer.tokens(1, at=t0 + 0.100, server_last_ns=w0 + 95 * ms, wall_ns=w0 + 100 * ms)  # first: path 5 ms
    timer.tokens(
        3, at=t0 + 0.160, server_last_ns=w0 + 135 * ms, wall_ns=w0 + 160 * ms
    )  # 2 tokens, held 25 ms
    timer.tokens(4, at=t0 + 0.180, server_last_ns=w0 + 155 * ms, wall_ns=w0 + 180 * ms)
    record = timer.finish("length", at=t0 + 0.190)
    assert record.itl_s == pytest.approx([0.030, 0.030, 0.020])  # the client's
    assert record.engine_itl_s == pytest.approx([0.020, 0.020, 0.020])  # the engine's
    assert record.path_s == pytest.approx([0.005, 0.025, 0.025])
    row = summarize([record], wall_s=1.0)
    assert row["engine_itl_ms"]["p50"] == pytest.approx(20.0)
    assert row["path_ms"]["p99"] == pytest.approx(25.0, abs=0.01)
    # no engine times (another backend): nothing recorded, the figures empty
    plain = StreamTimer()
    plain.tokens(1)
    plain.tokens(2)
    assert plain.record.engine_itl_s == [] and plain.record.path_s == []
    assert summarize([plain.finish("length")], wall_s=1.0)["path_ms"]["p50"] is None
