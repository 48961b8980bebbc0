"""The llm's Triton metrics: TensorRT-LLM's request and KV-cache gauges plus glmv's own families.

Contract:
* Every series carries `model`, `version` and `model_instance` (one series per instance: with one llm per
  GPU the instances would otherwise overwrite each other's gauges; Prometheus' own `instance` label names
  the pod, not the GPU).
* `update(stats, num_active)` (the stats thread) sets the gauges from an `EngineStats` and advances the
  counters by the growth of the engine's running totals;
  `observe_latencies` and `count_finished` (the sender thread) record one response's timings and one
  request's end.
* `release()` drops every metric, then the families, while the stub still serves them (see there).
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
# fine between 5 and 50 ms, where a stream's inter-token targets lie (a P99 of 20 or 25 ms reads off an edge)
ITL_BUCKETS = [
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.0125,
    0.015,
    0.0175,
    0.02,
    0.0225,
    0.025,
    0.03,
    0.035,
    0.04,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
]
FINISH_REASONS = ("stop", "length", "abort")
STAGE_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]
REQUEST_STAGES = ("inputs", "parse", "add")  # glmv_llm_request_stage_seconds
# the LlmMetrics attributes that hold one metric each (release() drops them)
METRIC_ATTRIBUTES = (
    "waiting", "running", "active", "blocks_used", "blocks_free", "blocks_max", "blocks_cached",
    "ttft", "itl", "preemptions",
)  # fmt: skip

# counters advanced from the engine's totals (prefix cache, image cache, restarts): name -> description
ENGINE_COUNTERS = {
    "glmv_prefix_cache_queried_tokens_total": "Tokens looked up in the prefix cache",
    "glmv_prefix_cache_hit_tokens_total": "Tokens found in the prefix cache (not computed again)",
    "glmv_kv_cache_reused_blocks_total": "KV blocks mapped from the prefix cache",
    "glmv_kv_cache_evicted_blocks_total": "Cached KV blocks evicted for new content",
    "glmv_image_cache_hits_total": "Images whose ViT embeddings came from the image cache",
    "glmv_image_cache_misses_total": "Images looked up in the image cache and not found",
    "glmv_image_refs_held_total": "Images sent by reference (image_ref) whose embeddings the engine held",
    "glmv_image_refs_read_total": "Images sent by reference (image_ref) read from the shared directory",
    "glmv_image_refs_shared_total": "Images sent by reference (image_ref) whose pixels a request in flight had read",
    "glmv_grammars_compiled_total": "Guides of guided requests compiled to grammars (a guide seen before is not)",
    "glmv_engine_restarts_total": "New engine processes started after one died (engine_process)",
    "glmv_engine_steps_total": "Engine steps run (each a forward of the batch the scheduler picked)",
    "glmv_engine_steps_ahead_total": "Decode steps launched before the previous step's tokens were read",
    "glmv_engine_gc_collections_total": "Full (generation 2) garbage collections in the engine's process",
    "glmv_engine_gc_seconds_total": "Seconds the engine's process spent in full garbage collections",
}


class LlmMetrics:
    def __init__(self, args: dict) -> None:
        labels = {
            "model": args["model_name"],
            "version": args["model_version"],
            "model_instance": args.get("model_instance_name", args["model_name"]),
        }
        # The families must outlive their metrics: kept here until release().
        self.families: list = []
        requests = self._family(
            "nv_trt_llm_request_metrics",
            "Requests in the engine by state (waiting | scheduled | active)",
            pb_utils.MetricFamily.GAUGE,
        )
        blocks = self._family(
            "nv_trt_llm_kv_cache_block_metrics",
            "Paged KV cache blocks (used | free | max)",
            pb_utils.MetricFamily.GAUGE,
        )
        self.waiting = requests.Metric(labels={**labels, "request_type": "waiting"})
        self.running = requests.Metric(labels={**labels, "request_type": "scheduled"})
        self.active = requests.Metric(labels={**labels, "request_type": "active"})
        self.blocks_used = blocks.Metric(labels={**labels, "kv_cache_block_type": "used"})
        self.blocks_free = blocks.Metric(labels={**labels, "kv_cache_block_type": "free"})
        self.blocks_max = blocks.Metric(labels={**labels, "kv_cache_block_type": "max"})
        self.blocks_cached = blocks.Metric(labels={**labels, "kv_cache_block_type": "cached"})
        # name -> [counter, the engine total it has been advanced to]
        self.engine_counters = {
            name: [self._family(name, description, pb_utils.MetricFamily.COUNTER).Metric(labels=labels), 0]
            for name, description in ENGINE_COUNTERS.items()
        }
        self.ttft = self._family(
            "glmv_time_to_first_token_seconds",
            "Arrival at the engine to the first generated token",
            pb_utils.MetricFamily.HISTOGRAM,
        ).Metric(labels=labels, buckets=TTFT_BUCKETS)
        self.itl = self._family(
            "glmv_inter_token_latency_seconds",
            "Time between generated tokens of one request",
            pb_utils.MetricFamily.HISTOGRAM,
        ).Metric(labels=labels, buckets=ITL_BUCKETS)
        stages = self._family(
            "glmv_llm_request_stage_seconds",
            "Time of one request's way into the engine by stage, on Triton's execute thread: its inputs "
            "looked up (inputs), turned into an engine request with its images resolved (parse), and checked "
            "and queued by the engine (add: the input processor, the pixels pinned)",
            pb_utils.MetricFamily.HISTOGRAM,
        )
        self.stages = {
            stage: stages.Metric(labels={**labels, "stage": stage}, buckets=STAGE_BUCKETS)
            for stage in REQUEST_STAGES
        }
        self.preemptions = self._family(
            "glmv_preemptions_total",
            "Sequences preempted (by recompute) for lack of KV blocks",
            pb_utils.MetricFamily.COUNTER,
        ).Metric(labels=labels)
        self.num_preemptions_seen = 0
        finished = self._family(
            "glmv_requests_finished_total",
            "Requests finished, by finish_reason",
            pb_utils.MetricFamily.COUNTER,
        )
        self.finished_by_reason = {
            reason: finished.Metric(labels={**labels, "finish_reason": reason}) for reason in FINISH_REASONS
        }

    def _family(self, name: str, description: str, kind) -> pb_utils.MetricFamily:
        family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
        self.families.append(family)
        return family

    def update(self, stats, num_active: int) -> None:
        """Gauges from `stats` (engine.core.stats.EngineStats); counters advanced to the engine's totals."""
        self.waiting.set(stats.num_waiting)
        self.running.set(stats.num_running)
        self.active.set(num_active)
        self.blocks_used.set(stats.num_blocks_used)
        self.blocks_free.set(stats.num_blocks_total - stats.num_blocks_used)
        self.blocks_max.set(stats.num_blocks_total)
        prefix = stats.prefix_cache
        self.blocks_cached.set(prefix.num_cached_blocks)
        for name, total in (
            ("glmv_prefix_cache_queried_tokens_total", prefix.num_queried_tokens),
            ("glmv_prefix_cache_hit_tokens_total", prefix.num_hit_tokens),
            ("glmv_kv_cache_reused_blocks_total", prefix.num_reused_blocks),
            ("glmv_kv_cache_evicted_blocks_total", prefix.num_evicted_blocks),
            ("glmv_image_cache_hits_total", stats.num_image_cache_hits),
            ("glmv_image_cache_misses_total", stats.num_image_cache_misses),
            ("glmv_image_refs_held_total", stats.num_image_refs_held),
            ("glmv_image_refs_read_total", stats.num_image_refs_read),
            ("glmv_image_refs_shared_total", stats.num_image_refs_shared),
            ("glmv_grammars_compiled_total", stats.num_grammars_compiled),
            ("glmv_engine_restarts_total", stats.num_engine_restarts),
            ("glmv_engine_steps_total", stats.num_steps),
            ("glmv_engine_steps_ahead_total", stats.num_steps_ahead),
            ("glmv_engine_gc_collections_total", stats.num_gc_full_collections),
            ("glmv_engine_gc_seconds_total", stats.gc_full_seconds),
        ):
            counter = self.engine_counters[name]
            if total > counter[1]:
                counter[0].increment(total - counter[1])
                counter[1] = total
        if stats.num_preemptions > self.num_preemptions_seen:
            self.preemptions.increment(stats.num_preemptions - self.num_preemptions_seen)
            self.num_preemptions_seen = stats.num_preemptions

    def observe_latencies(self, ttft: float | None, itl: float | None) -> None:
        """Seconds to the first token and per token since the previous response; None: nothing to observe."""
        if ttft is not None:
            self.ttft.observe(ttft)
        if itl is not None:
            self.itl.observe(itl)

    def observe_stages(self, seconds: dict[str, float]) -> None:
        """One request's seconds by stage (REQUEST_STAGES)."""
        for stage, value in seconds.items():
            self.stages[stage].observe(value)

    def count_finished(self, finish_reason: str | None) -> None:
        if finish_reason in self.finished_by_reason:
            self.finished_by_reason[finish_reason].increment(1)

    def release(self) -> None:
        """Drop the metrics, then the families. Called from finalize: a MetricFamily left for the stub's own
        teardown clears its metrics through the stub being destroyed and the stub segfaults on every
        shutdown (triton-inference-server/server#8662)."""
        self.finished_by_reason.clear()
        self.engine_counters.clear()
        self.stages.clear()
        for name in METRIC_ATTRIBUTES:
            setattr(self, name, None)
        self.families.clear()
