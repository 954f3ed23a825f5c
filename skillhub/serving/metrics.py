"""The server's Prometheus metrics (``/metrics``), through ``prometheus-client``.

Each app has its own collector registry, so several apps in one process (tests, an embedding
server) never mix their counts. The ``model`` label takes only model ids the server knows (an
unknown one counts as ``unknown``): clients cannot grow the label set.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    """Requests by model and status, latency, tokens, batches, pack-set switches and cache hits."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("skillhub_requests", "Requests answered, by endpoint, model id and HTTP status "
                                "(499: the client went away)", ["endpoint", "model", "status"], registry=r)
        self.latency = Histogram("skillhub_request_seconds", "Time from a request's arrival to its last byte",
                                 ["endpoint", "model"], buckets=_LATENCY, registry=r)
        self.first_token = Histogram("skillhub_first_token_seconds", "Time from a streamed request's arrival to "
                                     "its first text", ["model"], buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("skillhub_prompt_tokens", "Prompt tokens read", ["model"], registry=r)
        self.generated_tokens = Counter("skillhub_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.batch_size = Histogram("skillhub_batch_size", "Requests per generated batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.switches = Counter("skillhub_set_switches", "Times the model was switched to another pack set",
                                registry=r)
        self.cache_hits = Counter("skillhub_set_cache_hits", "Switches to a pack set whose weights were still "
                                  "computed", registry=r)
        self.routed = Counter("skillhub_routed", "auto requests by the class the router chose", ["route_class"],
                              registry=r)
        self.reloads = Counter("skillhub_registry_reloads", "Times the lineage was read again after a change",
                               registry=r)
        self.in_flight = Gauge("skillhub_requests_in_flight", "Requests being answered now", registry=r)
        self.active = 0  # the same count, read by the concurrency limit (one event loop: no lock needed)

    def observe(self, what: str, value: object) -> None:
        """The engine's observations (see :class:`~skillhub.serving.engine.Engine`)."""
        if what == "batch":
            self.batch_size.observe(value)
        elif what == "switch":
            self.switches.inc()
        elif what == "cache_hit":
            self.cache_hits.inc()
        elif what == "routed":
            self.routed.labels(value).inc()
        elif what == "reload":
            self.reloads.inc()
        elif what == "tokens":
            model, count = value
            self.generated_tokens.labels(model).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
