"""Per-request timing records and their summaries.

A streamed request is timed on the client with ``time.perf_counter``:

* **TTFT** — send to the first response that carries an output token;
* **ITL** (inter-token latency) — the gap between two responses that carry tokens, divided by the
  number of new tokens in the later one (one value per token, so a response with 3 tokens counts 3×);
* **response gap** — the same gaps undivided, one value per response: how long a reader watches the
  answer stand still (a server that sends several tokens together has short ITLs but longer gaps);
* **e2e** — send to the last response (the one with a finish reason).

Summaries give P50/P95/P99 (linear interpolation between order statistics, like ``numpy.percentile``)
and the mean, all in milliseconds. Throughput counts only successful requests.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

PERCENTILES = (50, 95, 99)


@dataclass
class RequestRecord:
    """What one request did, as seen by the client."""

    start_s: float  # perf_counter at send
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # one value per output token after the first
    gap_s: list[float] = field(default_factory=list)  # one value per response with tokens after the first
    # From the llm's last_token_time_ns of each response (the engine's clock as wall time): the gaps as the
    # engine made the tokens, one value per output token after the first (as itl_s), and each response's
    # delay from its last token in the engine to its arrival here (meaningful when client and server share
    # a host's clock)
    engine_itl_s: list[float] = field(default_factory=list)
    path_s: list[float] = field(default_factory=list)
    num_output_tokens: int = 0
    num_input_tokens: int | None = None
    num_cached_tokens: int | None = None  # prompt tokens the server took from its prefix cache
    finish_reason: str | None = None
    server_ttft_s: float | None = None  # first_token_time - arrival_time, from the server's clocks
    # send -> arrival at the llm (preprocessing, ensemble hops), from the server's arrival_time and the
    # client's wall clock: meaningful when client and server share a host
    pre_llm_s: float | None = None
    start_wall_ns: int = 0  # time.time_ns() at send
    error: str | None = None
    text: str = ""  # the answer's text, kept only when RequestParams.keep_text (benchmarks.clients)

    @property
    def is_ok(self) -> bool:
        return self.error is None


class StreamTimer:
    """Turns a stream of responses into a RequestRecord.

    Call :meth:`tokens` for every response with the *running* output-token count (or with the number
    of new tokens via ``new=``), then :meth:`finish` or :meth:`fail`.
    """

    def __init__(self) -> None:
        self.record = RequestRecord(start_s=time.perf_counter(), start_wall_ns=time.time_ns())
        self._last_token_s: float | None = None
        self._last_server_ns: int | None = None
        self._count = 0

    def tokens(
        self,
        running_count: int | None = None,
        *,
        new: int | None = None,
        at: float | None = None,
        server_last_ns: int | None = None,
        wall_ns: int | None = None,
    ) -> int:
        """Register a response (received at perf_counter ``at``, default now); returns its number of new
        tokens. ``server_last_ns``: the llm's last_token_time_ns of the response (wall clock), compared with
        ``wall_ns`` (time.time_ns() at receipt, default now) and with the previous response's."""
        now = time.perf_counter() if at is None else at
        num_new = (running_count - self._count) if running_count is not None else (new or 0)
        if num_new <= 0:
            return 0
        if server_last_ns:
            received_ns = time.time_ns() if wall_ns is None else wall_ns
            self.record.path_s.append(max(0, received_ns - server_last_ns) / 1e9)
            if self._last_server_ns is not None:
                gap = max(0, server_last_ns - self._last_server_ns) / 1e9 / num_new
                self.record.engine_itl_s.extend([gap] * num_new)
            self._last_server_ns = server_last_ns
        if self._last_token_s is None:
            # Tokens that arrive together with the first one have no gap of their own.
            self.record.ttft_s = now - self.record.start_s
        else:
            self.record.gap_s.append(now - self._last_token_s)
            gap = (now - self._last_token_s) / num_new
            self.record.itl_s.extend([gap] * num_new)
        self._last_token_s = now
        self._count += num_new
        self.record.num_output_tokens = self._count
        return num_new

    def restart(self) -> None:
        """The request is sent now (work done before it, such as a model lookup, is not part of it)."""
        self.record.start_s = time.perf_counter()
        self.record.start_wall_ns = time.time_ns()

    def server_times(self, arrival_ns: int | None, first_token_ns: int | None) -> None:
        """The llm's arrival_time_ns / first_token_time_ns (wall clock) of this request."""
        if arrival_ns and first_token_ns and first_token_ns >= arrival_ns:
            self.record.server_ttft_s = (first_token_ns - arrival_ns) / 1e9
        if arrival_ns and arrival_ns >= self.record.start_wall_ns:
            self.record.pre_llm_s = (arrival_ns - self.record.start_wall_ns) / 1e9

    def finish(
        self, finish_reason: str | None, num_output_tokens: int | None = None, at: float | None = None
    ) -> RequestRecord:
        self.record.e2e_s = (time.perf_counter() if at is None else at) - self.record.start_s
        self.record.finish_reason = finish_reason
        if num_output_tokens is not None and num_output_tokens > self._count:
            self.record.num_output_tokens = num_output_tokens
        return self.record

    def fail(self, message: str) -> RequestRecord:
        self.record.e2e_s = time.perf_counter() - self.record.start_s
        self.record.error = message or "unknown error"
        return self.record


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; values need not be sorted."""
    if not values:
        raise ValueError("percentile: no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def distribution_ms(values_s: Iterable[float]) -> dict[str, float | None]:
    """{p50, p95, p99, mean} in ms; every value None when there are no samples."""
    values = [v * 1000.0 for v in values_s]
    out: dict[str, float | None] = {
        f"p{p}": (round(percentile(values, p), 3) if values else None) for p in PERCENTILES
    }
    out["mean"] = round(sum(values) / len(values), 3) if values else None
    return out


def steady_state(records: Sequence[RequestRecord], concurrency: int) -> dict | None:
    """The closed loop after its opening burst: requests sent after the first `concurrency` (which all
    start at once and queue behind each other's prefill), measured over the window from the first of them
    being sent to the last of them finishing. None when fewer than `concurrency` requests follow the burst."""
    ordered = sorted(records, key=lambda r: r.start_s)
    later = [r for r in ordered[concurrency:] if r.e2e_s is not None]
    if len(later) < max(1, concurrency):
        return None
    window = max(r.start_s + r.e2e_s for r in later) - later[0].start_s
    row = summarize(later, window)
    row["window_s"] = round(window, 3)
    return row


def cache_hits(records: Sequence[RequestRecord]) -> dict:
    """Prefix-cache hit rate of the requests that report it: cached prompt tokens / prompt tokens."""
    known = [r for r in records if r.num_cached_tokens is not None and r.num_input_tokens]
    if not known:
        return {}
    prompt = sum(r.num_input_tokens for r in known)
    cached = sum(r.num_cached_tokens for r in known)
    return {"prompt_tokens": prompt, "cached_tokens": cached, "cache_hit_rate": round(cached / prompt, 4)}


def summarize(records: Sequence[RequestRecord], wall_s: float) -> dict:
    """One run's row of results.json (without the concurrency/rate and gpu_mem_gb keys)."""
    ok = [r for r in records if r.is_ok]
    errors = Counter(r.error for r in records if not r.is_ok)
    num_tokens = sum(r.num_output_tokens for r in ok)
    return {
        "requests": len(ok),
        "errors": sum(errors.values()),
        "duration_s": round(wall_s, 3),
        "rps": round(len(ok) / wall_s, 4) if wall_s > 0 else 0.0,
        "output_tok_s": round(num_tokens / wall_s, 3) if wall_s > 0 else 0.0,
        "mean_output_tokens": round(num_tokens / len(ok), 2) if ok else 0.0,
        "ttft_ms": distribution_ms(r.ttft_s for r in ok if r.ttft_s is not None),
        "itl_ms": distribution_ms(v for r in ok for v in r.itl_s),
        "response_gap_ms": distribution_ms(v for r in ok for v in r.gap_s),
        # the same tokens' gaps as the engine made them, and each response's way from the engine to here
        "engine_itl_ms": distribution_ms(v for r in ok for v in r.engine_itl_s),
        "path_ms": distribution_ms(v for r in ok for v in r.path_s),
        "e2e_ms": distribution_ms(r.e2e_s for r in ok if r.e2e_s is not None),
        "server_ttft_ms": distribution_ms(r.server_ttft_s for r in ok if r.server_ttft_s is not None),
        "pre_llm_ms": distribution_ms(r.pre_llm_s for r in ok if r.pre_llm_s is not None),
        **cache_hits(ok),
        "error_messages": {msg[:300]: n for msg, n in errors.most_common(5)},
    }


PREPROCESS_STAGES = "glmv_preprocess_stage_seconds"  # the preprocessing model's stages
LLM_STAGES = "glmv_llm_request_stage_seconds"  # the llm's: a request's way into the engine
PREPROCESS_CPU = "glmv_preprocess_cpu_seconds"  # the preprocessing thread's CPU time (stage "request")


def stage_totals(metrics_url: str, family: str = PREPROCESS_STAGES) -> dict[str, tuple[float, float]]:
    """stage -> (seconds, requests) so far of one stage histogram (the preprocessing model's
    `glmv_preprocess_stage_seconds` by default; `LLM_STAGES`), summed over the model's instances."""
    import re

    import httpx

    body = httpx.get(
        metrics_url if "://" in metrics_url else f"http://{metrics_url}/metrics", timeout=10
    ).text
    totals: dict[str, list[float]] = {}
    for kind, labels, value in re.findall(
        rf"^{re.escape(family)}_(sum|count)\{{([^}}]*)\}} (\S+)$", body, re.MULTILINE
    ):
        stage = re.search(r'stage="([^"]+)"', labels).group(1)
        totals.setdefault(stage, [0.0, 0.0])[0 if kind == "sum" else 1] += float(value)
    return {stage: (total[0], total[1]) for stage, total in totals.items()}


ENGINE_TOTALS = (
    "glmv_engine_steps_total",
    "glmv_engine_steps_ahead_total",
    "glmv_inter_token_latency_seconds_sum",
    "glmv_inter_token_latency_seconds_count",
    "glmv_engine_gc_collections_total",
    "glmv_engine_gc_seconds_total",
    "glmv_model_gc_collections_total",
    "glmv_model_gc_seconds_total",
)


def metric_totals(metrics_url: str, names: Sequence[str] = ENGINE_TOTALS) -> dict[str, float]:
    """name -> the sum of its series (every label set) in Triton's metrics now."""
    import httpx

    body = httpx.get(
        metrics_url if "://" in metrics_url else f"http://{metrics_url}/metrics", timeout=10
    ).text
    return parse_totals(body, names)


def parse_totals(body: str, names: Sequence[str] = ENGINE_TOTALS) -> dict[str, float]:
    """`metric_totals` of a Prometheus text body."""
    import re

    totals = dict.fromkeys(names, 0.0)
    for name, value in re.findall(r"^(\w+)(?:\{[^}]*\})? (\S+)$", body, re.MULTILINE):
        if name in totals:
            totals[name] += float(value)
    return totals


def engine_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float | int | None]:
    """What the engine did between two `metric_totals` readings: its steps, those launched ahead of the
    host, the mean time between two tokens of one request as the llm sent them, and the full garbage
    collections of the engine's process and of the Python models' stubs (how many, ms in all: each stalls
    whatever thread it lands on). The spread of the engine's gaps comes per token from the responses
    themselves (`summarize`'s ``engine_itl_ms``)."""
    steps = int(after["glmv_engine_steps_total"] - before["glmv_engine_steps_total"])
    ahead = int(after["glmv_engine_steps_ahead_total"] - before["glmv_engine_steps_ahead_total"])
    count = after["glmv_inter_token_latency_seconds_count"] - before["glmv_inter_token_latency_seconds_count"]
    seconds = after["glmv_inter_token_latency_seconds_sum"] - before["glmv_inter_token_latency_seconds_sum"]
    return {
        "steps": steps,
        "steps_ahead": ahead,
        "ahead_fraction": round(ahead / steps, 3) if steps else None,
        "llm_itl_ms_mean": round(seconds / count * 1e3, 3) if count else None,
        "gc_full_collections": int(
            after["glmv_engine_gc_collections_total"] - before["glmv_engine_gc_collections_total"]
        ),
        "gc_full_ms": round(
            (after["glmv_engine_gc_seconds_total"] - before["glmv_engine_gc_seconds_total"]) * 1e3, 3
        ),
        # the same in the Python models' stubs (preprocessing, the llm's own, postprocessing), all together
        "stub_gc_full_collections": int(
            after["glmv_model_gc_collections_total"] - before["glmv_model_gc_collections_total"]
        ),
        "stub_gc_full_ms": round(
            (after["glmv_model_gc_seconds_total"] - before["glmv_model_gc_seconds_total"]) * 1e3, 3
        ),
    }


def stage_means_ms(before: dict, after: dict) -> dict[str, float]:
    """Mean ms per request of each stage between two `stage_totals` readings of one family, in the
    order a request passes them."""
    order = ("inputs", "images", "template", "tokens", "positions", "outputs", "parse", "add")
    means = {}
    for stage in sorted(after, key=lambda s: (order.index(s) if s in order else len(order), s)):
        seconds, count = after[stage]
        seconds0, count0 = before.get(stage, (0.0, 0.0))
        if count > count0:
            means[stage] = round((seconds - seconds0) / (count - count0) * 1e3, 3)
    return means
