//! Metric names and handles. Handles are registered once and kept, so the
//! hot path is an atomic add. Names follow `switchboard_<component>_<what>_<unit>`;
//! labels come from closed enums only.
use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use switchboard_protocol::CloseReason;

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub(crate) fn prometheus() -> PrometheusHandle {
    RECORDER
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
                        5.0,
                    ],
                )
                .expect("static bucket list is non-empty");
            match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is already global (an embedding app's):
                // keep a private one so /metrics still renders ours.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// Hot-path metric handles of one edge.
pub(crate) struct EdgeMetrics {
    pub(crate) connections: Gauge,
    pub(crate) connections_max: Gauge,
    pub(crate) opened: Counter,
    pub(crate) frames_in: Counter,
    pub(crate) bytes_in: Counter,
    pub(crate) frames_out: Counter,
    pub(crate) bytes_out: Counter,
    pub(crate) deliveries: Counter,
    pub(crate) slow_consumer_drops: Counter,
    pub(crate) delivery_latency: Histogram,
    pub(crate) subscriptions: Gauge,
    pub(crate) duplicates_dropped: Counter,
    pub(crate) gaps_repaired: Counter,
    pub(crate) gaps_unrecoverable: Counter,
    pub(crate) gaps_retried: Counter,
    pub(crate) pending_frames: Gauge,
    pub(crate) pending_dropped: Counter,
}

impl EdgeMetrics {
    pub(crate) fn new() -> Self {
        // Pre-register labelled series so dashboards see zeros, not gaps.
        for r in CloseReason::ALL {
            counter!("switchboard_edge_disconnects_total", "reason" => r.as_str()).absolute(0);
        }
        counter!("switchboard_edge_disconnects_total", "reason" => "client_closed").absolute(0);
        EdgeMetrics {
            connections: gauge!("switchboard_edge_connections"),
            connections_max: gauge!("switchboard_edge_connections_max"),
            opened: counter!("switchboard_edge_connections_opened_total"),
            frames_in: counter!("switchboard_edge_received_frames_total"),
            bytes_in: counter!("switchboard_edge_received_bytes_total"),
            frames_out: counter!("switchboard_edge_sent_frames_total"),
            bytes_out: counter!("switchboard_edge_sent_bytes_total"),
            deliveries: counter!("switchboard_edge_deliveries_total"),
            slow_consumer_drops: counter!("switchboard_edge_queue_drops_total", "reason" => "slow_consumer"),
            delivery_latency: histogram!("switchboard_edge_delivery_latency_seconds"),
            subscriptions: gauge!("switchboard_edge_subscriptions"),
            duplicates_dropped: counter!("switchboard_edge_duplicate_deliveries_total"),
            gaps_repaired: counter!("switchboard_edge_gaps_total", "result" => "repaired"),
            gaps_unrecoverable: counter!("switchboard_edge_gaps_total", "result" => "unrecoverable"),
            gaps_retried: counter!("switchboard_edge_gaps_total", "result" => "retried"),
            pending_frames: gauge!("switchboard_edge_reorder_pending_frames"),
            pending_dropped: counter!("switchboard_edge_reorder_dropped_total"),
        }
    }
}

/// Counts a disconnect by reason.
pub(crate) fn disconnect(reason: &'static str) {
    counter!("switchboard_edge_disconnects_total", "reason" => reason).increment(1);
}

/// Counts a refused token by reason.
pub(crate) fn auth_failure(reason: &'static str) {
    counter!("switchboard_edge_auth_failures_total", "reason" => reason).increment(1);
}

/// Counts an upgrade refused before the WebSocket handshake.
pub(crate) fn upgrade_rejected(reason: &'static str) {
    counter!("switchboard_edge_upgrades_rejected_total", "reason" => reason).increment(1);
}

/// Counts an error reply by protocol code.
pub(crate) fn error_reply(code: &'static str) {
    counter!("switchboard_edge_error_replies_total", "code" => code).increment(1);
}

/// Counts one frame read from a client.
pub(crate) fn frame_in(m: &EdgeMetrics, len: usize) {
    m.frames_in.increment(1);
    m.bytes_in.increment(len as u64);
}

/// Counts a backend publish by result.
pub(crate) fn api_publish(result: &'static str) {
    counter!("switchboard_api_publishes_total", "result" => result).increment(1);
}

/// Updates gauges that are cheaper to read on scrape than to track.
pub(crate) fn refresh_gauges(state: &crate::app::EdgeState) {
    gauge!("switchboard_edge_connections_max").set(state.admission.max() as f64);
    gauge!("switchboard_edge_connections_admitted").set(state.admission.open() as f64);
    gauge!("switchboard_edge_bus_subscriptions").set(state.bus.subscriptions() as f64);
    let idle = state.handshakes.available_permits();
    gauge!("switchboard_edge_handshakes")
        .set(state.config.max_handshakes.saturating_sub(idle) as f64);
    gauge!("switchboard_history_streams").set(state.history.streams() as f64);
}
