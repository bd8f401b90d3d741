"""Prometheus metrics of one server, in their own registry (several servers may share a process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "embedsvc_requests_total", "RPCs by method and status code", ["method", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "embedsvc_request_seconds",
            "RPC latency by method",
            ["method"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "embedsvc_batch_size",
            "inputs per forward pass",
            ["batcher"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "embedsvc_queue_depth", "inputs waiting for a forward pass", ["batcher"], registry=self.registry
        )
        self.collection_items = Gauge(
            "embedsvc_collection_items", "live items per collection", ["collection"], registry=self.registry
        )
        self.model_load_seconds = Gauge(
            "embedsvc_model_load_seconds", "seconds a model took to load", ["model"], registry=self.registry
        )

    def record_call(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def observe_batch(self, batcher: str, size: int, queued: int) -> None:
        self.batch_size.labels(batcher).observe(size)
        self.queue_depth.labels(batcher).set(queued)

    def start_http(self, host: str, port: int):
        """Serves /metrics; returns the bound port."""
        from prometheus_client import start_http_server

        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server
