"""Prometheus metrics of the gateway (served at /metrics), in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "glmv_gateway_requests",
            "HTTP requests answered, by endpoint and status code",
            ("endpoint", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "glmv_gateway_request_latency_seconds",
            "Time from receiving a request to its last byte",
            ("endpoint", "stream"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "glmv_gateway_ttft_seconds",
            "Time from receiving a chat request to its first generated text (streaming requests)",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "glmv_gateway_requests_in_flight", "Chat requests being answered", registry=self.registry
        )
        self.cache = Counter(
            "glmv_gateway_cache_lookups",
            "Response cache lookups, by result",
            ("result",),
            registry=self.registry,
        )
        self.tokens = Counter(
            "glmv_gateway_tokens",
            "Tokens processed, by kind (prompt, completion)",
            ("kind",),
            registry=self.registry,
        )
        self.box_markers = Counter(
            "glmv_gateway_box_markers_stripped",
            "<|begin_of_box|> / <|end_of_box|> markers removed from answers",
            registry=self.registry,
        )
        self.backend_requests = Counter(
            "glmv_gateway_backend_requests",
            "Chat requests answered by each Triton server (several: the one an image's requests prefer)",
            ("backend",),
            registry=self.registry,
        )
        self.backend_in_flight = Gauge(
            "glmv_gateway_backend_requests_in_flight",
            "Chat requests sent to each Triton server and not finished",
            ("backend",),
            registry=self.registry,
        )
        self.failovers = Counter(
            "glmv_gateway_backend_failovers",
            "Requests moved to the next Triton server because this one could not be reached",
            ("backend",),
            registry=self.registry,
        )
        self.disconnects = Counter(
            "glmv_gateway_client_disconnects",
            "Chat requests cancelled because the client went away",
            registry=self.registry,
        )
