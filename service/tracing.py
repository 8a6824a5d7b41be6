"""Optional OpenTelemetry tracing: on when its packages are installed and an OTLP endpoint is set.

    pip install 'bertserve[tracing]'
    OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318 OTEL_SERVICE_NAME=bertserve bertserve

Every HTTP request becomes a server span (FastAPI instrumentation: route template, status); inference
requests get the model, the input count and the queue, tokenization and inference times as attributes.
Without the packages or the endpoint this module does nothing and costs nothing.
"""

from __future__ import annotations

import logging
import os

from service import routes

log = logging.getLogger("bertserve.tracing")


def setup_tracing(app, exporter=None) -> bool:
    """Instrument ``app``; True when tracing is on. ``exporter`` (tests) replaces the OTLP exporter."""
    if exporter is None and not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                                 or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return False
    try:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as exc:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but tracing is off: %s (pip install 'bertserve[tracing]')",
                    exc)
        return False
    if exporter is None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            log.warning("tracing is off: no OTLP exporter (%s)", exc)
            return False
        processor = BatchSpanProcessor(OTLPSpanExporter())  # endpoint and headers from OTEL_* variables
    else:
        processor = SimpleSpanProcessor(exporter)
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "bertserve")})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(processor)
    # Probes and scrapes would drown the traces that matter.
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider, excluded_urls=",".join(sorted(routes.PROBES)))
    app.state.tracer_provider = provider
    log.info("tracing on: spans go to %s", "the given exporter" if exporter is not None else "OTLP")
    return True


def annotate_request(model: str, inputs: int, timing) -> None:
    """Attributes on the current request's span, when tracing is on."""
    try:
        from opentelemetry import trace
    except ImportError:
        return
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attribute("bertserve.model", model)
    span.set_attribute("bertserve.inputs", inputs)
    for key in ("tokenization_s", "queue_s", "infer_s"):  # the fields of service.context.Timing
        seconds = getattr(timing, key)
        if seconds is not None:
            span.set_attribute(f"bertserve.{key[:-2]}_ms", round(seconds * 1000, 3))
