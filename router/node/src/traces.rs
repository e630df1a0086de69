//! OpenTelemetry trace export (cargo feature `otel`, ADR 0038): the
//! publish path's `tracing` spans (target `switchboard::trace`) become
//! OTLP spans sent over gRPC, and W3C `traceparent` values carry their
//! context between processes.
use std::time::Duration;

use opentelemetry::{
    KeyValue,
    propagation::{Extractor, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider},
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{Layer, filter::Targets, layer::SubscriberExt, util::SubscriberInitExt};

use crate::{LogFormat, TraceSettings};

/// How long one export may take (also bounds the flush at exit).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

/// Logging as [`crate::init_logging`] sets it up, beside an OTLP exporter
/// of the trace spans; installs the propagation the publish path uses.
/// Returns what flushes the exporter. Must run inside a tokio runtime
/// (the exporter's gRPC channel lives there).
pub(crate) fn init(
    name: &str,
    log: &str,
    format: LogFormat,
    traces: &TraceSettings,
) -> Result<Box<dyn FnOnce()>, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(&traces.otlp_endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build();
    let exporter = match exporter {
        Ok(e) => e,
        Err(e) => {
            // Logging as without traces, so the failure is logged as usual.
            crate::init_logging(log, format);
            return Err(format!("--otlp-endpoint {}: {e}", traces.otlp_endpoint));
        }
    };
    let resource = Resource::builder_empty()
        .with_attributes([
            KeyValue::new("service.name", name.to_owned()),
            KeyValue::new("service.instance.id", traces.node_id.clone()),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        ])
        .build();
    let provider = SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            traces.sample_ratio,
        ))))
        .with_resource(resource)
        .with_batch_exporter(exporter)
        .build();
    let tracer = provider.tracer("switchboard");
    // Only the publish path's spans are exported, whatever the log filter.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(
            Targets::new().with_target(switchboard_router::trace::TARGET, tracing::Level::INFO),
        );
    let filter = tracing_subscriber::EnvFilter::try_new(log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_filter(filter).boxed(),
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| format!("setting up logging: {e}"))?;
    switchboard_router::trace::install(Box::new(W3c(TraceContextPropagator::new())));
    tracing::info!(
        endpoint = %traces.otlp_endpoint,
        sample_ratio = traces.sample_ratio,
        "exporting traces over OTLP"
    );
    Ok(Box::new(move || {
        if let Err(e) = provider.shutdown() {
            tracing::warn!(error = %e, "the last trace spans were not exported");
        }
    }))
}

/// W3C trace context through tracing-opentelemetry's spans.
struct W3c(TraceContextPropagator);

impl switchboard_router::trace::Propagation for W3c {
    fn traceparent(&self, span: &tracing::Span, sampled_only: bool) -> Option<String> {
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        if !sc.is_valid() || (sampled_only && !sc.is_sampled()) {
            return None;
        }
        Some(format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        ))
    }

    fn set_parent(&self, span: &tracing::Span, traceparent: &str) {
        let cx = self.0.extract(&One(traceparent));
        if cx.span().span_context().is_valid() {
            let _ = span.set_parent(cx);
        }
    }
}

/// A carrier of one `traceparent` value.
struct One<'a>(&'a str);

impl Extractor for One<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == switchboard_router::trace::TRACEPARENT).then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec![switchboard_router::trace::TRACEPARENT]
    }
}
