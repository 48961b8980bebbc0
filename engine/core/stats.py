"""Engine counters for health checks and metrics (a snapshot; cheap to read from any thread)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.core.block_manager import PrefixCacheStats


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int = 0
    """Requests queued (new, or preempted and waiting to re-prefill)."""
    num_running: int = 0
    """Sequences holding KV blocks."""
    num_blocks_used: int = 0
    num_blocks_total: int = 0
    num_preemptions: int = 0
    """Preemptions by recompute since start."""
    num_steps: int = 0
    """Non-empty scheduler steps since start."""
    num_steps_ahead: int = 0
    """Of those, decode steps launched before the previous step's tokens were read (run ahead of the host;
    engine.core.engine_core): at one stream every decode step but the first should be one."""
    num_finished: int = 0
    """Requests finished since start (any finish_reason)."""
    num_prompt_tokens: int = 0
    """Prompt tokens of finished requests since start."""
    num_generation_tokens: int = 0
    """Tokens generated since start."""
    last_step_time: float | None = None
    """time.monotonic() at the end of the last step (health heartbeat); None before the first step."""
    last_step_duration: float = 0.0
    """Seconds the last step took."""
    last_step_num_tokens: int = 0
    """Tokens batched in the last step."""
    is_loop_running: bool = False
    """Whether the loop thread (start/stop) is alive."""
    prefix_cache: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    """Prefix-cache lookups, hits and blocks (engine.core.block_manager)."""
    num_image_cache_hits: int = 0
    """Images whose ViT embeddings came from the image cache, since start."""
    num_image_cache_misses: int = 0
    """Images looked up in the image cache and not found, since start."""
    image_cache_bytes: int = 0
    """Bytes of embeddings held by the image cache now."""
    num_image_refs_held: int = 0
    """Images sent by reference (``GenerationRequest.image_refs``) whose embeddings the cache held."""
    num_image_refs_read: int = 0
    """Images sent by reference read from their files in the shared resize directory."""
    num_image_refs_shared: int = 0
    """Images sent by reference whose pixels a request still in flight had read (not read again)."""
    num_grammars_compiled: int = 0
    """Guided requests' guides compiled to grammars since start (a guide seen before is not compiled again)."""
    num_engine_restarts: int = 0
    """New engine processes started after one died (``engine.engine_process``; 0 in process)."""
    num_gc_full_collections: int = 0
    """Full (generation 2) garbage collections in the engine's process since it started (engine.core.gc_watch)."""
    gc_full_seconds: float = 0.0
    """Seconds those collections took."""
    num_gc_frozen_objects: int = 0
    """Objects the engine's process froze when its loop started (a full collection does not walk them)."""
