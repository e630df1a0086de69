//! Metrics the edge and the router share: the Prometheus recorder and its
//! histogram buckets, process metrics read on each scrape, and labelled
//! series registered at zero so an alert's `increase()` counts the first
//! event and a dashboard shows 0 rather than "no data".
use std::sync::OnceLock;

use metrics::counter;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use switchboard_router::{HOP_SECONDS, Hop};

use crate::api::{ApiCode, Op};

/// Buckets of every `*_seconds` histogram: 0.5 ms to 5 s.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

/// Buckets of `switchboard_hop_seconds`: 50 µs to 5 s. A hop inside one
/// process (a lane's wait, a fan-out) often takes well under the 0.5 ms
/// where `SECONDS_BUCKETS` start.
pub const HOP_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
    2.0, 5.0,
];

/// Buckets of `switchboard_router_sequence_batch_size` (appends per Redis
/// round trip), up to the batch limit.
pub const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once) and returns its
/// handle. Install it before any metric handle is registered.
pub fn prometheus() -> PrometheusHandle {
    RECORDER
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .expect("static bucket list is non-empty")
                // A full name wins over the suffix above.
                .set_buckets_for_metric(Matcher::Full(HOP_SECONDS.into()), HOP_BUCKETS)
                .expect("static bucket list is non-empty")
                .set_buckets_for_metric(
                    Matcher::Full("switchboard_router_sequence_batch_size".into()),
                    BATCH_SIZE_BUCKETS,
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

/// Updates `process_resident_memory_bytes`, `process_cpu_seconds_total`,
/// `process_open_fds`, `process_max_fds`, `process_threads` and
/// `process_start_time_seconds`. Call it before rendering `/metrics`.
pub fn collect_process_metrics() {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR
        .get_or_init(|| {
            let c = metrics_process::Collector::default();
            c.describe();
            c
        })
        .collect();
}

/// Registers the series of the cluster backends (NATS, Redis) at zero.
pub fn register_cluster_series() {
    for event in ["connected", "disconnected"] {
        counter!("switchboard_nats_events_total", "event" => event).increment(0);
    }
    counter!("switchboard_nats_slow_consumer_total").increment(0);
    counter!("switchboard_nats_undecodable_total").increment(0);
    counter!("switchboard_redis_errors_total", "op" => "history").increment(0);
    counter!("switchboard_router_sequence_refused_total").increment(0);
    metrics::gauge!("switchboard_router_sequence_queue_messages").increment(0.0);
    for reason in switchboard_router::PUBLISH_ERROR_REASONS {
        counter!("switchboard_publish_errors_total", "reason" => *reason).increment(0);
    }
}

/// Registers the hops recorded on this process
/// (`switchboard_hop_seconds{hop}`), so their buckets render at 0 before
/// the first message.
pub fn register_hop_series(hops: &[Hop]) {
    for hop in hops {
        let _ = hop.histogram();
    }
}

/// Results of `POST /api/publish`
/// (`switchboard_api_publishes_total{result}`), on edges and routers.
pub const API_PUBLISH_RESULTS: &[&str] = &[
    "ok",
    "duplicate",
    "unauthorized",
    "too_large",
    "bad_request",
    "refused",
];

/// Registers the backend API's series, and the Redis connection's, at zero.
pub fn register_api_series() {
    for r in API_PUBLISH_RESULTS {
        counter!("switchboard_api_publishes_total", "result" => *r).increment(0);
    }
    for transport in [Transport::Http, Transport::Grpc] {
        for op in Op::ALL {
            for result in [Ok(()), Err(ApiCode::Unauthorized)] {
                let _ = api_requests(transport, op, result);
            }
        }
    }
    for call in crate::admin::CALLS {
        for result in ["ok", ApiCode::Unauthorized.label()] {
            counter!("switchboard_admin_requests_total", "call" => call, "result" => result)
                .increment(0);
        }
    }
    // Both edges and routers talk to Redis through `RedisConn`.
    counter!("switchboard_redis_transaction_redirects_total").increment(0);
    counter!("switchboard_redis_cluster_reconnects_total").increment(0);
}

/// Counts a backend publish by result.
pub(crate) fn api_publish(result: &'static str) {
    debug_assert!(API_PUBLISH_RESULTS.contains(&result), "{result}");
    counter!("switchboard_api_publishes_total", "result" => result).increment(1);
}

/// The backend API's two transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// JSON over HTTP/1.1 on the main listener.
    Http,
    /// gRPC on `--grpc-listen`.
    Grpc,
}

impl Transport {
    fn label(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::Grpc => "grpc",
        }
    }
}

fn api_requests(transport: Transport, op: Op, result: Result<(), ApiCode>) -> metrics::Counter {
    let result = match result {
        Ok(()) => "ok",
        Err(code) => code.label(),
    };
    counter!(
        "switchboard_api_requests_total",
        "transport" => transport.label(),
        "op" => op.name(),
        "result" => result,
    )
}

/// Counts one backend API call (`switchboard_api_requests_total{transport,
/// op, result}`); `result` is "ok" or the refusal's [`ApiCode::label`].
pub(crate) fn api_request(transport: Transport, op: Op, result: Result<(), ApiCode>) {
    api_requests(transport, op, result).increment(1);
}
