"""Optional OpenTelemetry tracing of the request path: the call, its tokenization, its Triton requests.

Off unless --otel-exporter is set (the SDK and the OTLP exporter come with the `tracing` extra).
The W3C trace context is injected into each Triton request's metadata, so a Triton started with
`--trace-config mode=opentelemetry` continues the trace.
"""

from __future__ import annotations

import sys

from opentelemetry import propagate, trace

tracer = trace.get_tracer("rerank_server")


def configure_tracing(exporter: str | None, service_name: str = "rerank-frontend") -> None:
    if exporter is None:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter == "console":
        # One span per line on stderr: readable by tests and by `jq`.
        console = ConsoleSpanExporter(out=sys.stderr, formatter=lambda span: span.to_json(indent=None) + "\n")
        provider.add_span_processor(SimpleSpanProcessor(console))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def propagation_headers() -> dict[str, str]:
    """The current trace context as request metadata (traceparent, tracestate)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier
