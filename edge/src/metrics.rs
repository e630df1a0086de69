//! Metric names and handles. Handles are registered once and kept, so the
//! hot path is an atomic add. Names follow `switchboard_<component>_<what>_<unit>`;
//! labels come from closed enums only.
use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::PrometheusHandle;
use switchboard_protocol::CloseReason;
use switchboard_router::Hop;

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub(crate) fn prometheus() -> PrometheusHandle {
    switchboard_node::telemetry::prometheus()
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
    /// Frames the fan-out wrote to a socket itself / queued for its writer.
    pub(crate) offers_direct: Counter,
    pub(crate) offers_queued: Counter,
    /// Fan-outs run by the lane's task alone / shared out over the worker threads.
    pub(crate) fanouts_alone: Counter,
    pub(crate) fanouts_spread: Counter,
    pub(crate) delivery_latency: Histogram,
    pub(crate) subscriptions: Gauge,
    pub(crate) duplicates_dropped: Counter,
    pub(crate) gaps_repaired: Counter,
    pub(crate) gaps_unrecoverable: Counter,
    pub(crate) gaps_retried: Counter,
    pub(crate) pending_frames: Gauge,
    pub(crate) pending_dropped: Counter,
    pub(crate) fanout_dropped_deliveries: Counter,
    pub(crate) fanout_dropped_events: Counter,
    /// Streams checked against history's positions (ADR 0044), the ones
    /// found behind (a repair started), and position reads that failed.
    pub(crate) position_checks: Counter,
    pub(crate) position_repairs: Counter,
    pub(crate) position_errors: Counter,
    pub(crate) hops: HopMetrics,
    pub(crate) deflate: DeflateMetrics,
}

/// The hops of a message's path an edge records
/// (`switchboard_hop_seconds{hop}`, see `switchboard_router::Hop`); the
/// `sequence` hop is the router's (in-process standalone).
pub(crate) struct HopMetrics {
    /// A client's publish received → acked.
    pub(crate) ack: Histogram,
    /// The message's timestamp → reached this edge's hub from the bus.
    pub(crate) bus: Histogram,
    /// Reached the hub → taken from its lane by the fan-out.
    pub(crate) queue: Histogram,
    /// Taken by the fan-out → pushed to every local socket's mailbox.
    pub(crate) fanout: Histogram,
}

impl HopMetrics {
    fn new() -> Self {
        HopMetrics {
            ack: Hop::Ack.histogram(),
            bus: Hop::Bus.histogram(),
            queue: Hop::Queue.histogram(),
            fanout: Hop::Fanout.histogram(),
        }
    }
}

/// permessage-deflate: how often the compressor ran (once per shared frame
/// and encoding, once per reply) and on how many bytes.
pub(crate) struct DeflateMetrics {
    pub(crate) negotiated: Counter,
    pub(crate) shared: Counter,
    pub(crate) replies: Counter,
    pub(crate) input_bytes: Counter,
    pub(crate) output_bytes: Counter,
    pub(crate) inflated: Counter,
}

impl DeflateMetrics {
    fn new() -> Self {
        let m = DeflateMetrics {
            negotiated: counter!("switchboard_edge_deflate_negotiated_total"),
            shared: counter!("switchboard_edge_deflate_compressed_frames_total", "kind" => "shared"),
            replies: counter!("switchboard_edge_deflate_compressed_frames_total", "kind" => "reply"),
            input_bytes: counter!("switchboard_edge_deflate_input_bytes_total"),
            output_bytes: counter!("switchboard_edge_deflate_output_bytes_total"),
            inflated: counter!("switchboard_edge_deflate_inflated_frames_total"),
        };
        // Shown at zero from the start.
        for c in [
            &m.negotiated,
            &m.shared,
            &m.replies,
            &m.input_bytes,
            &m.output_bytes,
            &m.inflated,
        ] {
            c.increment(0);
        }
        m
    }

    /// Counts one run of the compressor over `input` bytes, of which
    /// `output` bytes go out (compressed, or plain when that was smaller).
    pub(crate) fn compressed(&self, kind: &Counter, input: usize, output: usize) {
        kind.increment(1);
        self.input_bytes.increment(input as u64);
        self.output_bytes.increment(output as u64);
    }
}

impl EdgeMetrics {
    pub(crate) fn new() -> Self {
        // Pre-register labelled series so dashboards see zeros, not gaps.
        for r in CloseReason::ALL {
            counter!("switchboard_edge_disconnects_total", "reason" => r.as_str()).absolute(0);
        }
        counter!("switchboard_edge_disconnects_total", "reason" => "client_closed").absolute(0);
        for r in SOCKET_RESET_REASONS {
            counter!("switchboard_edge_socket_resets_total", "reason" => *r).absolute(0);
        }
        for r in AUTH_FAILURE_REASONS {
            counter!("switchboard_edge_auth_failures_total", "reason" => *r).increment(0);
        }
        for r in UPGRADE_REJECT_REASONS {
            counter!("switchboard_edge_upgrades_rejected_total", "reason" => *r).increment(0);
        }
        for k in RATE_LIMIT_KINDS {
            counter!("switchboard_edge_rate_limited_total", "kind" => *k).increment(0);
        }
        switchboard_node::telemetry::register_api_series();
        for c in ERROR_REPLY_CODES {
            counter!("switchboard_edge_error_replies_total", "code" => *c).increment(0);
        }
        for r in ["ok", "error"] {
            counter!("switchboard_edge_tls_reloads_total", "result" => r).increment(0);
        }
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
            offers_direct: counter!("switchboard_edge_fanout_offers_total", "path" => "direct"),
            offers_queued: counter!("switchboard_edge_fanout_offers_total", "path" => "queued"),
            fanouts_alone: counter!("switchboard_edge_fanouts_total", "mode" => "alone"),
            fanouts_spread: counter!("switchboard_edge_fanouts_total", "mode" => "spread"),
            delivery_latency: histogram!("switchboard_edge_delivery_latency_seconds"),
            subscriptions: gauge!("switchboard_edge_subscriptions"),
            duplicates_dropped: counter!("switchboard_edge_duplicate_deliveries_total"),
            gaps_repaired: counter!("switchboard_edge_gaps_total", "result" => "repaired"),
            gaps_unrecoverable: counter!("switchboard_edge_gaps_total", "result" => "unrecoverable"),
            gaps_retried: counter!("switchboard_edge_gaps_total", "result" => "retried"),
            pending_frames: gauge!("switchboard_edge_reorder_pending_frames"),
            pending_dropped: counter!("switchboard_edge_reorder_dropped_total"),
            fanout_dropped_deliveries: counter!("switchboard_edge_fanout_dropped_total", "kind" => "delivery"),
            fanout_dropped_events: counter!("switchboard_edge_fanout_dropped_total", "kind" => "event"),
            position_checks: counter!("switchboard_edge_position_checks_total"),
            position_repairs: counter!("switchboard_edge_position_repairs_total"),
            position_errors: counter!("switchboard_edge_position_check_errors_total"),
            hops: HopMetrics::new(),
            deflate: DeflateMetrics::new(),
        }
    }
}

/// Label values, registered at zero on start (alerts' `increase()` then
/// counts the first event). Counting a value missing here is a bug that
/// debug builds catch.
pub(crate) const AUTH_FAILURE_REASONS: &[&str] = &[
    "missing",
    "malformed",
    "algorithm",
    "signature",
    "expired",
    "not_yet_valid",
    "audience_or_issuer",
    "subject",
    "other_user",
    "revoked",
    "config",
];
pub(crate) const UPGRADE_REJECT_REASONS: &[&str] = &[
    "over_capacity",
    "accept_rate",
    "handshakes",
    "draining",
    "origin",
    "tls_handshake",
    "tls_timeout",
    "unauthorized",
    "subprotocol",
    "not_websocket",
    "bad_handshake",
    "accept_error",
];
pub(crate) const ERROR_REPLY_CODES: &[&str] = &[
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_subscribed",
    "already_subscribed",
    "too_large",
    "invalid_id",
    "limit_exceeded",
    "token_expired",
    "rejected",
    "internal",
    "unavailable",
    "unspecified",
];
/// Why a socket was reset instead of closed in order (`conn::Reset`).
pub(crate) const SOCKET_RESET_REASONS: &[&str] = &["write_stalled", "close_unwritten"];
pub(crate) const RATE_LIMIT_KINDS: &[&str] = &["request", "publish", "ping"];
/// Registers the series only a cluster edge has at zero.
pub(crate) fn register_cluster_series() {
    switchboard_node::telemetry::register_cluster_series();
    counter!("switchboard_edge_presence_errors_total").increment(0);
    counter!("switchboard_edge_presence_restores_total").increment(0);
    counter!("switchboard_edge_presence_reregistered_total").increment(0);
    counter!("switchboard_edge_position_checks_total").increment(0);
    counter!("switchboard_edge_position_repairs_total").increment(0);
    counter!("switchboard_edge_position_check_errors_total").increment(0);
    counter!("switchboard_edge_router_retries_total").increment(0);
}

/// Counts a disconnect by reason.
pub(crate) fn disconnect(reason: &'static str) {
    counter!("switchboard_edge_disconnects_total", "reason" => reason).increment(1);
}

/// Counts a socket reset (SO_LINGER 0) by reason.
pub(crate) fn socket_reset(reason: &'static str) {
    debug_assert!(SOCKET_RESET_REASONS.contains(&reason), "{reason}");
    counter!("switchboard_edge_socket_resets_total", "reason" => reason).increment(1);
}

/// Counts a refused token by reason.
pub(crate) fn auth_failure(reason: &'static str) {
    debug_assert!(AUTH_FAILURE_REASONS.contains(&reason), "{reason}");
    counter!("switchboard_edge_auth_failures_total", "reason" => reason).increment(1);
}

/// Counts an upgrade refused before the WebSocket handshake.
pub(crate) fn upgrade_rejected(reason: &'static str) {
    debug_assert!(UPGRADE_REJECT_REASONS.contains(&reason), "{reason}");
    counter!("switchboard_edge_upgrades_rejected_total", "reason" => reason).increment(1);
}

/// Counts an error reply by protocol code.
pub(crate) fn error_reply(code: &'static str) {
    debug_assert!(ERROR_REPLY_CODES.contains(&code), "{code}");
    counter!("switchboard_edge_error_replies_total", "code" => code).increment(1);
}

/// Counts one frame read from a client.
pub(crate) fn frame_in(m: &EdgeMetrics, len: usize) {
    m.frames_in.increment(1);
    m.bytes_in.increment(len as u64);
}
