//! Metrics the edge and the router share: histogram buckets, process
//! metrics read on each scrape, and labelled series registered at zero so
//! an alert's `increase()` counts the first event and a dashboard shows 0
//! rather than "no data".
use std::sync::OnceLock;

use metrics::counter;

/// Buckets of every `*_seconds` histogram: 0.5 ms to 5 s.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

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
    for reason in crate::PUBLISH_ERROR_REASONS {
        counter!("switchboard_publish_errors_total", "reason" => *reason).increment(0);
    }
}

/// Registers the router's own series at zero.
pub fn register_router_series() {
    register_cluster_series();
    for result in ["ok", "duplicate"] {
        counter!("switchboard_router_publishes_total", "result" => result).increment(0);
    }
    for reason in ["publish", "presence"] {
        counter!("switchboard_router_bus_errors_total", "reason" => reason).increment(0);
    }
    for name in [
        "switchboard_router_member_work_errors_total",
        "switchboard_router_shard_jobs_published_total",
        "switchboard_router_shard_jobs_done_total",
        "switchboard_router_shard_errors_total",
        "switchboard_router_push_jobs_total",
        "switchboard_presence_expired_total",
    ] {
        counter!(name).increment(0);
    }
    // A registered histogram renders its buckets at 0 before the first publish.
    let _ = metrics::histogram!("switchboard_router_publish_duration_seconds");
}
