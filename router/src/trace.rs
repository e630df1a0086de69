//! Trace context from publish to delivery (ADR 0038): the hooks the
//! publish path calls, whatever exports the spans.
//!
//! The spans are plain `tracing` spans (target [`TARGET`]); a process that
//! exports traces installs a [`Propagation`] at startup (the `otel`
//! feature of `switchboard-node`), which turns them into OpenTelemetry
//! spans and reads and writes W3C `traceparent` values. Without one,
//! [`enabled`] is false, no span is made and no header is written or read:
//! the publish path and the fan-out do nothing more than one load of a
//! `OnceLock`.
use std::sync::OnceLock;

/// The `tracing` target of every span made for traces.
pub const TARGET: &str = "switchboard::trace";

/// The header carrying the W3C trace context, on NATS messages and on
/// `POST /api/publish`.
pub const TRACEPARENT: &str = "traceparent";

/// Reads and writes trace context for the spans of this process.
pub trait Propagation: Send + Sync + 'static {
    /// `span`'s W3C `traceparent`, when it is part of a trace (with
    /// `sampled_only`, of a sampled one).
    fn traceparent(&self, span: &tracing::Span, sampled_only: bool) -> Option<String>;
    /// Makes `span` (not entered yet) a child of a remote `traceparent`;
    /// an invalid one is ignored (the span starts its own trace).
    fn set_parent(&self, span: &tracing::Span, traceparent: &str);
}

static PROPAGATION: OnceLock<Box<dyn Propagation>> = OnceLock::new();

/// Installs the process's propagation (once; a second call is ignored).
pub fn install(p: Box<dyn Propagation>) {
    let _ = PROPAGATION.set(p);
}

/// Whether this process exports traces: call sites make spans only then.
#[inline]
pub fn enabled() -> bool {
    PROPAGATION.get().is_some()
}

/// The current span's `traceparent`, when traces are on and it is part
/// of a trace (with `sampled_only`, of a sampled one).
#[inline]
pub fn current_traceparent(sampled_only: bool) -> Option<String> {
    PROPAGATION
        .get()?
        .traceparent(&tracing::Span::current(), sampled_only)
}

/// Makes `span` a child of the remote `traceparent` (traces on only).
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if let Some(p) = PROPAGATION.get() {
        p.set_parent(span, traceparent);
    }
}

/// The value of a NATS message's `traceparent` header, if it has one.
pub fn nats_traceparent(headers: Option<&async_nats::HeaderMap>) -> Option<&str> {
    headers?.get(TRACEPARENT).map(|v| v.as_str())
}

/// NATS headers carrying the current span's context, when there is one
/// to carry: traces on, and this publish in a trace. With
/// `sampled_only` (deliveries, so an edge's fan-out makes no span for a
/// publish nobody will see) only a sampled one; without it (publish
/// requests), an unsampled one too, so the router keeps the decision
/// instead of sampling the request afresh.
pub fn nats_headers(sampled_only: bool) -> Option<async_nats::HeaderMap> {
    let tp = current_traceparent(sampled_only)?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(TRACEPARENT, tp.as_str());
    Some(headers)
}
