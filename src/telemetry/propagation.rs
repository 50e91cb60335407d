//! W3C trace context: continued from an input's `traceparent` header and injected into the
//! outcomes it causes.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Makes `span` a child of the trace in `traceparent` (and `tracestate`), if they are valid.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    let Some(traceparent) = traceparent else {
        return;
    };
    let mut carrier = HashMap::new();
    carrier.insert("traceparent".to_owned(), traceparent.to_owned());
    if let Some(state) = tracestate {
        carrier.insert("tracestate".to_owned(), state.to_owned());
    }
    let context = TraceContextPropagator::new().extract(&carrier);
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}

/// The `traceparent` to put on an outcome caused inside `span`.
///
/// With tracing exported, it names `span` (same trace, this worker's span as parent). Without
/// it, the input's own `traceparent` is passed on unchanged, so the trace is still continued.
pub fn outgoing_traceparent(span: &tracing::Span, incoming: Option<&str>) -> Option<String> {
    let context = span.context();
    if context.span().span_context().is_valid() {
        let mut carrier: HashMap<String, String> = HashMap::new();
        TraceContextPropagator::new().inject_context(&context, &mut carrier);
        if let Some(traceparent) = carrier.remove("traceparent") {
            return Some(traceparent);
        }
    }
    incoming.map(str::to_owned)
}
