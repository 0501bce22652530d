"""The server's Prometheus metrics (GET /metrics): requests, tokens, sequences, batch sizes, latencies.

prometheus_client writes the exposition format (escaping, histogram buckets, _created samples);
each server has its own registry, so two servers in one process (tests) do not share counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Latency buckets from 1 ms (a tiny model's decode step) to a minute (a long prompt on a big one).
LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Every metric the server exports; the scheduler thread and the event loop both update them
    (prometheus_client's metrics are thread-safe)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("babyllama_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("babyllama_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("babyllama_generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge("babyllama_running_sequences", "Sequences holding a slot (prefilling or decoding)",
                             registry=r)
        self.queued = Gauge("babyllama_queued_sequences", "Sequences waiting for a slot", registry=r)
        self.batch_sequences = Histogram("babyllama_batch_sequences", "Sequences that got a token in a step",
                                         buckets=SIZES, registry=r)
        self.batch_rows = Histogram("babyllama_batch_rows", "Token rows (decode + prefill) in one engine call",
                                    buckets=SIZES, registry=r)
        self.step_seconds = Histogram("babyllama_step_seconds", "Time of one scheduler step", buckets=LATENCY,
                                      registry=r)
        self.ttft = Histogram("babyllama_time_to_first_token_seconds",
                              "From a request's arrival to its first generated token", buckets=LATENCY, registry=r)
        self.itl = Histogram("babyllama_inter_token_latency_seconds",
                             "Between consecutive generated tokens of one sequence", buckets=LATENCY, registry=r)
        self.e2e = Histogram("babyllama_request_seconds", "From a generation request's arrival to its end",
                             buckets=LATENCY, registry=r)
        self.ready = Gauge("babyllama_ready", "1 once the model is loaded and compiled", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
