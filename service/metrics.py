"""Prometheus metrics: one collector registry per app, fed by the HTTP and gRPC layers and the batchers' events.

Labels come from the server's own vocabulary only (loaded model names, route templates, status codes,
rejection reasons), never from a request body: an unknown model a client names is counted as ``none``,
so nobody can grow the series count by sending made-up names.

One uvicorn worker per process is the supported layout (the batcher needs every request of a model in
one process to form batches); scale out with replicas, each scraped on its own. So no multiprocess mode.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from service import routes

CONTENT_TYPE = CONTENT_TYPE_LATEST
NO_MODEL = "none"  # requests that never resolved to a loaded model (unknown name, bad JSON, ...)

# Seconds, resolving single milliseconds at the low end so that p50/p99 of a 5-10 ms request is readable,
# and reaching the request timeout at the top.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25,
                   0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FAST_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)
BATCH_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
PADDING_BUCKETS = (1.0, 1.05, 1.1, 1.15, 1.25, 1.5, 2.0, 3.0, 5.0)

# Error types of service.errors (and validation) -> rejection reason.
REJECTION_REASONS = ("overloaded", "timeout", "too_large", "invalid", "not_found", "not_ready", "cancelled",
                     "unauthorized")
_REASON_BY_ERROR_TYPE = {
    "overloaded": "overloaded", "timeout": "timeout", "payload_too_large": "too_large",
    "invalid_input": "invalid", "bad_request": "invalid", "model_not_found": "not_found",
    "not_found": "not_found", "method_not_allowed": "invalid", "not_ready": "not_ready",
    "client_disconnected": "cancelled", "unauthorized": "unauthorized", "forbidden": "unauthorized",
}


class ServiceMetrics:
    """Every bertserve_* metric of one app. Thread-safe: batch events arrive from worker threads."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._request_children: dict[tuple, tuple] = {}
        # (route, protocol) of the inference routes whose request series exist per model from start-up.
        self._inference_routes = [(route, "http") for route in routes.INFERENCE]
        # gRPC calls count here too: route is then the RPC method (ModelInfer), and code the HTTP status
        # the same outcome has over HTTP (200, 404, 429, 499, ...), so one query covers both protocols.
        self.requests = Counter("bertserve_requests", "Requests answered, by model, route template (gRPC: "
                                "the method), status code (gRPC: the HTTP status of the same outcome) and "
                                "protocol (http, grpc)", ["model", "route", "code", "protocol"], registry=r)
        self.request_duration = Histogram("bertserve_request_duration_seconds", "Time from request start to the "
                                          "end of the response, by model, route template and protocol",
                                          ["model", "route", "protocol"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("bertserve_queue_wait_seconds", "Time an item waited in its model's queue "
                                    "before its batch started", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokenization = Histogram("bertserve_tokenization_seconds", "Tokenization time per request",
                                      ["model"], buckets=FAST_BUCKETS, registry=r)
        self.inference = Histogram("bertserve_inference_seconds", "Backend time per batch", ["model"],
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("bertserve_batch_size", "Items per batch", ["model"],
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("bertserve_batch_tokens", "Padded tokens per batch (items x longest item)",
                                      ["model"], buckets=BATCH_TOKEN_BUCKETS, registry=r)
        self.padding_ratio = Histogram("bertserve_batch_padding_ratio", "Padded tokens / real tokens per batch",
                                       ["model"], buckets=PADDING_BUCKETS, registry=r)
        self.input_tokens = Counter("bertserve_input_tokens", "Tokens of the inputs sent to inference "
                                    "(special tokens included)", ["model"], registry=r)
        self.rejections = Counter("bertserve_rejections", "Requests refused or failed before inference, by "
                                  "reason", ["model", "reason"], registry=r)
        self.inference_errors = Counter("bertserve_inference_errors", "Batches whose backend raised", ["model"],
                                        registry=r)
        self.stalled_batches = Counter("bertserve_stalled_batches", "Batches the watchdog found running far "
                                       "past their expected time (the model reports not ready until each "
                                       "ends)", ["model"], registry=r)
        self._model_state = _ModelStateCollector()
        r.register(self._model_state)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    # ------------------------------------------------------------- wiring

    def add_inference_routes(self, protocol: str, names: tuple[str, ...]) -> None:
        """Inference routes of another protocol (gRPC's ModelInfer) whose series exist from start-up;
        before ``attach``."""
        self._inference_routes += [(name, protocol) for name in names]

    def attach(self, model_registry) -> None:
        """Read model state from ``model_registry`` at every scrape; create every per-model series now."""
        self._model_state.model_registry = model_registry
        model_registry.subscribe(self.on_event)
        for name in model_registry.names():
            self.init_model(name)
        for route, protocol in self._inference_routes:  # the templates requests later count into
            self.request_duration.labels(NO_MODEL, route, protocol)
            self.requests.labels(NO_MODEL, route, "200", protocol)
        for reason in REJECTION_REASONS:
            self.rejections.labels(NO_MODEL, reason)

    def init_model(self, name: str) -> None:
        for route, protocol in self._inference_routes:  # the templates requests later count into
            self.requests.labels(name, route, "200", protocol)
            self.request_duration.labels(name, route, protocol)
        for metric in (self.queue_wait, self.tokenization, self.inference, self.batch_size, self.batch_tokens,
                       self.padding_ratio, self.input_tokens, self.inference_errors, self.stalled_batches):
            metric.labels(name)
        for reason in REJECTION_REASONS:
            self.rejections.labels(name, reason)

    # ------------------------------------------------------------- feeding

    def on_event(self, kind: str, data: dict) -> None:
        """The registry's events: batches and failed batches (see Batcher), requests tokenized (see
        ModelEntry), and loaded versions, whose model gets its series at once if it is new. Rejections
        are counted per request by the HTTP layer (``observe_request``), which also sees those that
        never reach a queue."""
        model = data.get("model", NO_MODEL)
        if kind == "loaded":
            self.init_model(model)
        elif kind == "batch":
            self.batch_size.labels(model).observe(data["size"])
            self.batch_tokens.labels(model).observe(data["padded_tokens"])
            self.padding_ratio.labels(model).observe(data["padded_tokens"] / max(1, data["real_tokens"]))
            self.inference.labels(model).observe(data["infer_s"])
            wait = self.queue_wait.labels(model)
            for seconds in data["queue_wait_s"]:
                wait.observe(seconds)
        elif kind == "error":
            self.inference_errors.labels(model).inc()
        elif kind == "stalled":
            self.stalled_batches.labels(model).inc()
        elif kind == "tokenized":
            self.observe_tokenization(model, data["seconds"], data["tokens"])

    def observe_request(self, model: str | None, route: str, status: int, seconds: float,
                        error_type: str | None, protocol: str = "http") -> None:
        # Every request passes here, refusals under overload too (hundreds a second): the label
        # children are looked up once per (model, route, status, reason, protocol) and kept, since
        # prometheus_client's ``labels()`` validates and locks on every call.
        key = (model, route, status, error_type, protocol)
        children = self._request_children.get(key)
        if children is None:
            name = model or NO_MODEL
            reason = _REASON_BY_ERROR_TYPE.get(error_type or "")
            children = (self.requests.labels(name, route, str(status), protocol),
                        self.request_duration.labels(name, route, protocol),
                        self.rejections.labels(name, reason) if reason is not None else None)
            if len(self._request_children) < 10_000:  # label values are bounded; this is a backstop
                self._request_children[key] = children
        count, duration, rejection = children
        count.inc()
        duration.observe(seconds)
        if rejection is not None:
            rejection.inc()

    def observe_tokenization(self, model: str, seconds: float, tokens: int) -> None:
        self.tokenization.labels(model).observe(seconds)
        self.input_tokens.labels(model).inc(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ModelStateCollector:
    """Series read from the model registry at scrape time, so they are right after loads and unloads."""

    def __init__(self) -> None:
        self.model_registry = None

    def describe(self):
        return []  # unchecked collector: its series depend on what is loaded

    def collect(self):
        info = GaugeMetricFamily("bertserve_model_info", "A loaded (or failed) model variant: always 1",
                                 labels=["model", "version", "format", "precision", "provider"])
        ready = GaugeMetricFamily("bertserve_model_ready", "1 when the model version serves requests and no "
                                  "batch of it is stuck in a backend (its readiness routes answer 200), else 0",
                                  labels=["model", "version"])
        depth = GaugeMetricFamily("bertserve_queue_depth", "Items waiting in the model's queue (batches already "
                                  "inside a backend not counted)", labels=["model"])
        capacity = GaugeMetricFamily("bertserve_queue_capacity", "Items the model's queue holds before 429",
                                     labels=["model"])
        failures = CounterMetricFamily("bertserve_model_load_failures", "Model versions that failed to load",
                                       labels=["model"])
        registry = self.model_registry
        if registry is not None:
            depths: dict[str, int] = {}
            capacities: dict[str, int] = {}
            # Versions loading or draining too (not ready; a draining one's queue is still worked off),
            # one series per version: a retry of a failed version is in both places while it loads.
            seen: set[tuple[str, int]] = set()
            for entry in [*registry.entries.values(), *registry.transitions]:
                if (entry.name, entry.version) in seen:
                    continue
                seen.add((entry.name, entry.version))
                version = str(entry.version)
                manifest = entry.manifest
                if entry.status != "loading":  # its labels are not known until it has loaded
                    provider = entry.backends[0].info.provider if entry.backends else ""
                    info.add_metric([entry.name, version, manifest.format if manifest else "",
                                     manifest.precision if manifest else "", provider], 1)
                ready.add_metric([entry.name, version], 1 if entry.ready and not entry.stalled else 0)
                if entry.batcher is not None and entry.status in ("ready", "unloading"):
                    depths[entry.name] = depths.get(entry.name, 0) + entry.batcher.queue_depth
                    if entry.ready:
                        capacities[entry.name] = capacities.get(entry.name, 0) + entry.batcher.max_queue_items
            for name, value in sorted(depths.items()):
                depth.add_metric([name], value)
                capacity.add_metric([name], capacities.get(name, 0))
            # A counter must not vanish when its model is unloaded: every name that ever failed stays.
            for name in sorted(set(registry.names()) | set(registry.load_failures)):
                failures.add_metric([name], registry.load_failures.get(name, 0))
        yield from (info, ready, depth, capacity, failures)
