"""OpenTelemetry tracing of inference requests: off unless configured.

Turned on by the standard variables: ``OTEL_TRACES_EXPORTER=otlp`` or an OTLP
endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``),
unless ``OTEL_SDK_DISABLED=true``. The OpenTelemetry SDK's OTLP exporter then
reads the rest of its ``OTEL_*`` configuration itself (endpoint, headers, TLS,
timeout, compression; OTLP over gRPC), and the SDK the sampler and
``OTEL_SERVICE_NAME``.

Spans: one server span per request (``traceparent``/``tracestate`` from the
client continue its trace, and the response carries the span's own
``traceparent``), ``decode`` and ``encode`` spans for its body, a ``queue``
span for its wait in the batch queue, and one ``batch`` span per engine run,
parented to the batch's first request and linked to every request it served.
An upload (``POST /engines``) gets a server span too, and its build a ``build``
span in the same trace with one child span per build phase (``validate``,
``precision``, ``build``, ``accuracy``, ``profile``, ...), ended when the engine
is committed or the build fails.

When tracing is off every hook is a check of one module global: the hot path
pays nothing measurable (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

log = logging.getLogger("kiln.tracing")

_tracer: Tracer | None = None
"""The tracer while tracing is on; None when off (the hot path checks only this)."""
_provider: TracerProvider | None = None

_NO_HEADERS: dict[str, str] = {}


def configured_by_environment() -> bool:
    """Whether the standard ``OTEL_*`` variables ask for OTLP traces."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter == "otlp"
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def start_from_environment() -> None:
    """Turn tracing on with the OTLP exporter when the environment asks for it."""
    if not configured_by_environment():
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over this default.
    # shutdown_on_exit=False: ``shutdown`` below bounds the last export instead.
    provider = TracerProvider(resource=Resource.create({"service.name": "kiln"}), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    enable(provider)
    log.info("tracing on: OTLP export")


def enable(provider: TracerProvider) -> None:
    """Trace with ``provider`` (tests pass one with an in-memory exporter)."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer("kiln")


def disable() -> None:
    """Stop tracing; spans already ended stay with the provider's exporter."""
    global _tracer, _provider
    _tracer = _provider = None


FLUSH_AT_EXIT_S = 2.0


def shutdown() -> None:
    """At server exit: stop tracing and export the spans still buffered, waiting
    at most ``FLUSH_AT_EXIT_S``: the exporter retries an unreachable collector
    for up to its own timeout, which must not hold the exit."""
    provider = _provider
    disable()
    if provider is not None:
        flush = threading.Thread(target=provider.shutdown, name="kiln-trace-flush", daemon=True)
        flush.start()
        flush.join(FLUSH_AT_EXIT_S)


def enabled() -> bool:
    return _tracer is not None


@contextlib.contextmanager
def _request_span(tracer: Tracer, name: str, header: Callable[[str], str | None]) -> Iterator[dict[str, str]]:
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    propagator = TraceContextTextMapPropagator()
    carrier = {key: value for key in ("traceparent", "tracestate") if (value := header(key)) is not None}
    parent = propagator.extract(carrier)
    with tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER) as span:
        from service.request_id import REQUEST_ID

        request_id = REQUEST_ID.get()
        if request_id is not None:
            span.set_attribute("kiln.request_id", request_id)
        response_headers: dict[str, str] = {}
        propagator.inject(response_headers)
        yield response_headers


_OFF = contextlib.nullcontext(_NO_HEADERS)


def request_span(
    name: str, header: Callable[[str], str | None]
) -> contextlib.AbstractContextManager[dict[str, str]]:
    """A server span for one request, current for the request's task; yields the
    headers to send back (``traceparent``, ``tracestate``), empty when off.
    ``header`` looks up a request header or gRPC metadata key (lower case)."""
    tracer = _tracer
    if tracer is None:
        return _OFF
    return _request_span(tracer, name, header)


def span(name: str) -> contextlib.AbstractContextManager[Any]:
    """A child span of the current one (``decode``, ``encode``); a no-op when off."""
    tracer = _tracer
    if tracer is None:
        return _OFF
    return tracer.start_as_current_span(name)


def current_context() -> Context | None:
    """The active trace context to keep with a queued request; None when off."""
    if _tracer is None:
        return None
    from opentelemetry.context import get_current

    return get_current()


def record_batch(
    contexts: Sequence[Context | None], waits_s: Sequence[float], run_s: float, rows: int, engine: str
) -> None:
    """After a batch ran: a ``queue`` span per traced request (its wait, in its own
    trace) and one ``batch`` span for the run, parented to the first traced
    request and linked to each."""
    tracer = _tracer
    if tracer is None:
        return
    from opentelemetry.trace import Link, get_current_span

    end_ns = time.time_ns()
    run_start_ns = end_ns - round(run_s * 1e9)
    links = []
    parent: Any = None
    for context, wait in zip(contexts, waits_s, strict=True):
        if context is None:
            continue
        parent = parent or context
        span_context = get_current_span(context).get_span_context()
        links.append(Link(span_context))
        queue = tracer.start_span("queue", context=context, start_time=run_start_ns - round(wait * 1e9))
        queue.end(end_time=run_start_ns)
    if parent is None:
        return
    batch = tracer.start_span(
        "batch",
        context=parent,
        links=links,
        start_time=run_start_ns,
        attributes={"kiln.engine": engine, "kiln.batch.rows": rows, "kiln.batch.requests": len(links)},
    )
    batch.end(end_time=end_ns)


def current_trace_id() -> str | None:
    """The current span's trace id (32 hex digits) for log lines; None when off."""
    if _tracer is None:
        return None
    from opentelemetry.trace import get_current_span

    span_context = get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None


class BuildSpans:
    """A ``build`` span (a child of the context it was made in: the upload's) and
    one child span per phase, switched as the build reports its progress."""

    def __init__(self, tracer: Tracer, attributes: dict[str, str | int]) -> None:
        from opentelemetry.trace import set_span_in_context

        self._tracer = tracer
        self._build = tracer.start_span("build", attributes=attributes)
        self._context = set_span_in_context(self._build)
        self._phase_name: str | None = None
        self._phase: Any = None

    def phase(self, name: str) -> None:
        if name == self._phase_name:
            return
        if self._phase is not None:
            self._phase.end()
        self._phase_name = name
        self._phase = self._tracer.start_span(name, context=self._context)

    def end(self, error: str | None = None) -> None:
        from opentelemetry.trace import Status, StatusCode

        if self._phase is not None:
            self._phase.end()
            self._phase = None
        if error is not None:
            self._build.set_status(Status(StatusCode.ERROR, error))
        self._build.end()


def build_spans(attributes: dict[str, str | int]) -> BuildSpans | None:
    """Spans for a build started in the current context; None when tracing is off."""
    tracer = _tracer
    return None if tracer is None else BuildSpans(tracer, attributes)
