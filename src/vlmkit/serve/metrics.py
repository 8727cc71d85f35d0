"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        # route: the template ("/v1/chat/completions") or "unknown", never the raw path (unbounded series)
        self.requests = Counter("vlmkit_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("vlmkit_request_latency_seconds", "chat completion latency",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("vlmkit_time_to_first_token_seconds", "time to first token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("vlmkit_prompt_tokens", "prompt tokens read (image positions included)",
                                     registry=self.registry)
        self.completion_tokens = Counter("vlmkit_completion_tokens", "tokens generated", registry=self.registry)
        self.queue_depth = Gauge("vlmkit_queue_depth", "requests waiting for the model", registry=self.registry)
        self.running = Gauge("vlmkit_running_requests", "requests being generated (--engine vlmkit)",
                             registry=self.registry)
        self.batch_size = Histogram("vlmkit_batch_size", "requests generated together",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=self.registry)
        self.cancelled = Counter("vlmkit_cancelled_requests", "requests whose client went away",
                                 registry=self.registry)
