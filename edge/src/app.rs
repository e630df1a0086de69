//! Wiring: backends chosen once at startup, the shared state, the accept
//! loop and the drain.
use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use metrics_exporter_prometheus::PrometheusHandle;
use switchboard_presence::{MemoryPresence, PresenceStore};
use switchboard_protocol::CloseReason;
use switchboard_router::{Bus, History, MemoryBus, MemoryHistory, Router, RouterLimits};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{Config, admission::Admission, hub::Hub, metrics::EdgeMetrics, server};

pub(crate) struct EdgeState {
    pub(crate) config: Config,
    pub(crate) hub: Arc<Hub>,
    pub(crate) router: Arc<Router>,
    pub(crate) history: Arc<dyn History>,
    pub(crate) presence: Arc<dyn PresenceStore>,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) metrics: Arc<EdgeMetrics>,
    pub(crate) admission: Arc<Admission>,
    pub(crate) next_conn_id: AtomicU64,
    pub(crate) draining: AtomicBool,
    pub(crate) prometheus: PrometheusHandle,
    pub(crate) tracker: TaskTracker,
}

impl EdgeState {
    fn standalone(config: Config) -> Arc<EdgeState> {
        // The recorder must exist before any metric handle is registered.
        let prometheus = crate::metrics::prometheus();
        let metrics = Arc::new(EdgeMetrics::new());
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
        let history: Arc<dyn History> = Arc::new(MemoryHistory::new(config.history));
        // Standalone sessions die with the process; the TTL only matters
        // for the contract shared with the Redis backend.
        let presence: Arc<dyn PresenceStore> = Arc::new(MemoryPresence::new(
            3 * config.heartbeat_interval.as_millis() as i64,
            100_000,
        ));
        let router = Arc::new(Router::new(
            history.clone(),
            bus.clone(),
            RouterLimits {
                max_payload_bytes: config.max_payload_bytes,
            },
        ));
        let hub = Hub::new(bus.clone(), history.clone(), metrics.clone());
        metrics.connections_max.set(config.max_connections as f64);
        Arc::new(EdgeState {
            admission: Arc::new(Admission::new(config.max_connections)),
            config,
            hub,
            router,
            history,
            presence,
            bus,
            metrics,
            next_conn_id: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            prometheus,
            tracker: TaskTracker::new(),
        })
    }
}

/// A running edge (for tests and embedding).
pub struct Edge {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Edge {
    /// Starts an edge on an already bound listener.
    pub fn start(config: Config, listener: TcpListener) -> std::io::Result<Edge> {
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task =
            tokio::spawn(async move { run(config, listener, token.cancelled_owned()).await });
        Ok(Edge {
            addr,
            shutdown,
            task,
        })
    }

    /// The listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drains (as on SIGTERM) and waits until the edge has stopped.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// Serves until `shutdown` resolves, then drains within the grace period.
pub async fn run(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let state = EdgeState::standalone(config);
    tracing::info!(
        addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        node = %state.config.node_id,
        max_connections = state.config.max_connections,
        dev = state.config.dev,
        "switchboard edge listening (standalone)"
    );
    let stop_accepting = CancellationToken::new();
    let accept = tokio::spawn(server::accept_loop(
        state.clone(),
        listener,
        stop_accepting.clone(),
    ));
    shutdown.await;
    drain(&state, stop_accepting).await;
    let _ = accept.await;
}

async fn drain(state: &Arc<EdgeState>, stop_accepting: CancellationToken) {
    let started = tokio::time::Instant::now();
    let grace = state.config.shutdown_grace;
    state.draining.store(true, Ordering::Release);
    stop_accepting.cancel();
    let conns = state.hub.conns();
    let batch = state.config.drain_batch_size;
    let batches = conns.len().div_ceil(batch).max(1);
    // Spread the batches over the first half of the grace period.
    let pause = (grace / 2 / batches as u32).min(Duration::from_millis(500));
    let jitter_ms = state.config.reconnect_jitter_max.as_millis() as u32;
    tracing::info!(sockets = conns.len(), batches, "draining");
    for (i, chunk) in conns.chunks(batch).enumerate() {
        for conn in chunk {
            let delay = if jitter_ms == 0 {
                0
            } else {
                rand::random_range(0..jitter_ms)
            };
            conn.close(CloseReason::Shutdown, delay);
        }
        if i + 1 < batches {
            tokio::time::sleep(pause).await;
        }
    }
    state.tracker.close();
    if tokio::time::timeout_at(started + grace, state.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = state.hub.conn_count(),
            "drain deadline reached; exiting with sockets open"
        );
    }
    tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "drained");
}
