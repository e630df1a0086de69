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

use dashmap::DashMap;
use metrics_exporter_prometheus::PrometheusHandle;
use switchboard_presence::{MemoryPresence, PresenceStore, RedisPresence, Session};
use switchboard_protocol::{CloseReason, now_ms};
use switchboard_router::{
    Bus, BusHandler, History, MemoryBus, MemoryHistory, NatsBus, NatsSettings, Publisher,
    RedisHistory, RemoteRouter, Router, RouterLimits, connect_redis,
};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{Config, admission::Admission, hub::Hub, metrics::EdgeMetrics, server};

pub(crate) struct EdgeState {
    pub(crate) config: Config,
    pub(crate) hub: Arc<Hub>,
    pub(crate) router: Arc<dyn Publisher>,
    pub(crate) history: Arc<dyn History>,
    pub(crate) presence: Arc<dyn PresenceStore>,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) metrics: Arc<EdgeMetrics>,
    pub(crate) admission: Arc<Admission>,
    /// Handshakes in progress (`--max-handshakes`).
    pub(crate) handshakes: Arc<tokio::sync::Semaphore>,
    /// New sockets per second (`--accept-rate-*`), shared by all accepts.
    pub(crate) accept_rate: std::sync::Mutex<crate::ratelimit::Bucket>,
    pub(crate) next_conn_id: AtomicU64,
    pub(crate) draining: AtomicBool,
    /// WSS certificates, reloadable (`None`: plain WS).
    pub(crate) tls: Option<crate::tls::Tls>,
    /// The last presence lease renewal succeeded (readiness).
    pub(crate) presence_ok: AtomicBool,
    pub(crate) prometheus: PrometheusHandle,
    pub(crate) tracker: TaskTracker,
    /// Presence sessions of this node's sockets (heartbeated together).
    pub(crate) sessions: DashMap<u64, Session>,
    /// Serializes each user's presence transition with its announcement, so
    /// a socket's offline cannot overtake the online of the socket that
    /// replaced it (watchers would be left with the wrong state).
    presence_order: Box<[tokio::sync::Mutex<()>]>,
}

/// Stripes of `EdgeState::presence_order`: the lock is held across a Redis
/// round trip, so users sharing a stripe wait on each other; 4,096 keeps
/// that rare at thousands of connects per second (48 bytes each).
const PRESENCE_STRIPES: usize = 4096;

impl EdgeState {
    /// Held across one user's presence transition and its announcement.
    pub(crate) async fn presence_order(
        &self,
        user: &switchboard_protocol::UserId,
    ) -> tokio::sync::MutexGuard<'_, ()> {
        self.presence_order[crate::hub::stripe(user.as_str(), PRESENCE_STRIPES)]
            .lock()
            .await
    }
}

struct Backends {
    bus: Arc<dyn Bus>,
    history: Arc<dyn History>,
    presence: Arc<dyn PresenceStore>,
    router: Arc<dyn Publisher>,
}

/// The one place backends are chosen: memory standalone, NATS + Redis in a
/// cluster. Everything else sees the traits.
async fn backends(config: &Config) -> Result<Backends, String> {
    let ttl = config.presence_ttl.as_millis() as i64;
    let Some(cluster) = &config.cluster else {
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
        let history: Arc<dyn History> = Arc::new(MemoryHistory::new(config.history));
        let presence: Arc<dyn PresenceStore> = Arc::new(MemoryPresence::new(ttl, 100_000));
        let router = Arc::new(Router::new(
            history.clone(),
            bus.clone(),
            presence.clone(),
            RouterLimits {
                max_payload_bytes: config.max_payload_bytes,
            },
        ));
        return Ok(Backends {
            bus,
            history,
            presence,
            router,
        });
    };
    crate::metrics::register_cluster_series();
    let settings = NatsSettings {
        url: cluster.nats_url.clone(),
        name: config.node_id.clone(),
        subscription_capacity: cluster.subscription_capacity,
    };
    let nats = NatsBus::connect(&settings)
        .await
        .map_err(|e| e.to_string())?;
    let client = nats.client().clone();
    let bus: Arc<dyn Bus> = Arc::new(nats);
    let redis = connect_redis(&cluster.redis_url).await.map_err(|e| {
        format!(
            "redis {}: {e}",
            switchboard_router::redact_url(&cluster.redis_url)
        )
    })?;
    let history: Arc<dyn History> = Arc::new(RedisHistory::new(redis.clone(), config.history));
    let presence: Arc<dyn PresenceStore> = Arc::new(RedisPresence::new(redis, ttl));
    let router = Arc::new(RemoteRouter::new(
        client,
        bus.clone(),
        Duration::from_secs(2),
    ));
    Ok(Backends {
        bus,
        history,
        presence,
        router,
    })
}

impl EdgeState {
    async fn new(config: Config) -> Result<Arc<EdgeState>, String> {
        // The recorder must exist before any metric handle is registered.
        let prometheus = crate::metrics::prometheus();
        let metrics = Arc::new(EdgeMetrics::new());
        let b = backends(&config).await?;
        let hub = Hub::new(
            &config.node_id,
            b.bus.clone(),
            b.history.clone(),
            metrics.clone(),
        );
        hub.start().await.map_err(|e| e.to_string())?;
        metrics.connections_max.set(config.max_connections as f64);
        let tls = match &config.tls {
            Some(files) => Some(crate::tls::Tls::load(files.clone())?),
            None => None,
        };
        Ok(Arc::new(EdgeState {
            admission: Arc::new(Admission::new(config.max_connections)),
            handshakes: Arc::new(tokio::sync::Semaphore::new(config.max_handshakes)),
            accept_rate: std::sync::Mutex::new(crate::ratelimit::Bucket::full(config.accept_rate)),
            config,
            hub,
            router: b.router,
            history: b.history,
            presence: b.presence,
            bus: b.bus,
            metrics,
            next_conn_id: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            presence_ok: AtomicBool::new(true),
            tls,
            prometheus,
            tracker: TaskTracker::new(),
            sessions: DashMap::new(),
            presence_order: (0..PRESENCE_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }))
    }
}

/// A running edge (for tests and embedding).
pub struct Edge {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), String>>,
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

    /// Stops at once, as a crash would: no drain, no presence cleanup.
    pub fn abort(self) {
        self.task.abort();
    }
}

/// How long startup may wait for NATS and Redis.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

/// Serves until `shutdown` resolves, then drains within the grace period.
/// Fails only if the cluster backends cannot be reached at startup.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    // Raised whether or not the cap was given: a container starts with a
    // soft limit (often 1024) far below the hard one.
    let file_limit = crate::admission::raise_file_limit();
    if config.max_connections as u64 > crate::admission::usable_fds(file_limit) {
        tracing::warn!(
            max_connections = config.max_connections,
            file_limit,
            "max_connections is above the file limit; accepts will fail before the cap"
        );
    }
    // NATS is dialled with retries, so an unreachable one would hang here
    // forever; fail with a named error instead (the supervisor restarts us).
    let backends = config.cluster.as_ref().map(|c| {
        format!(
            "NATS {} / Redis {}",
            switchboard_router::redact_url(&c.nats_url),
            switchboard_router::redact_url(&c.redis_url)
        )
    });
    let state = match tokio::time::timeout(STARTUP_TIMEOUT, EdgeState::new(config)).await {
        Ok(state) => state?,
        Err(_) => {
            return Err(format!(
                "cluster backends not ready after {} s: {}",
                STARTUP_TIMEOUT.as_secs(),
                backends.unwrap_or_default()
            ));
        }
    };
    tracing::info!(
        addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        node = %state.config.node_id,
        max_connections = state.config.max_connections,
        file_limit,
        mode = if state.config.cluster.is_some() { "cluster" } else { "standalone" },
        dev = state.config.dev,
        "switchboard edge listening"
    );
    lease_presence(&state).await;
    let reloads = tokio::spawn(reload_tls_on_sighup(state.clone()));
    let stop_accepting = CancellationToken::new();
    let background = CancellationToken::new();
    let accept = tokio::spawn(server::accept_loop(
        state.clone(),
        listener,
        stop_accepting.clone(),
    ));
    let heartbeats = tokio::spawn(presence_heartbeats(state.clone(), background.clone()));
    let sweeper = tokio::spawn(switchboard_router::sweep_presence(
        state.presence.clone(),
        state.bus.clone(),
        state.config.presence_ttl / 3,
        background.clone(),
    ));
    shutdown.await;
    drain(&state, stop_accepting).await;
    background.cancel();
    let _ = accept.await;
    let _ = heartbeats.await;
    let _ = sweeper.await;
    reloads.abort();
    Ok(())
}

/// SIGHUP: read the WSS certificate and key again. Open sockets keep the
/// session they negotiated; new handshakes use the new certificate.
async fn reload_tls_on_sighup(state: Arc<EdgeState>) {
    let Some(tls) = &state.tls else { return };
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; TLS certificates will not reload");
        return;
    };
    while hup.recv().await.is_some() {
        match tls.reload() {
            Ok(()) => {
                metrics::counter!("switchboard_edge_tls_reloads_total", "result" => "ok")
                    .increment(1);
                tracing::info!("TLS certificate reloaded");
            }
            Err(e) => {
                metrics::counter!("switchboard_edge_tls_reloads_total", "result" => "error")
                    .increment(1);
                tracing::warn!(error = %e, "TLS reload failed; keeping the previous certificate");
            }
        }
    }
}

/// Renews this node's presence lease (its sessions live as long as it).
/// When the store had no live lease for us (Redis restarted empty, or a
/// stall outlived the lease and another node swept our sessions), every
/// local session is registered again and every stream is re-read from
/// history: routers could not find this edge meanwhile.
async fn presence_heartbeats(state: Arc<EdgeState>, stop: CancellationToken) {
    // One command per node per tick, so renewing often is cheap: a node
    // stalled (or starved of CPU) for up to 5 renewals keeps its lease.
    let mut tick = tokio::time::interval(state.config.presence_ttl / 6);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let node = state.config.node_id.clone();
    let addr = state.config.listen.to_string();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let renewed = state.presence.node_heartbeat(&node, &addr, now_ms()).await;
        state.presence_ok.store(renewed.is_ok(), Ordering::Release);
        metrics::gauge!("switchboard_edge_presence_available").set(if renewed.is_ok() {
            1.0
        } else {
            0.0
        });
        let fresh = match renewed {
            Ok(fresh) => fresh,
            Err(e) => {
                metrics::counter!("switchboard_edge_presence_errors_total").increment(1);
                tracing::warn!(error = %e, "presence lease not renewed");
                continue;
            }
        };
        let sessions: Vec<Session> = state.sessions.iter().map(|e| e.value().clone()).collect();
        if !fresh || sessions.is_empty() {
            continue;
        }
        tracing::warn!(
            sessions = sessions.len(),
            "presence lost this node's sessions; restoring them"
        );
        metrics::counter!("switchboard_edge_presence_restores_total").increment(1);
        match state.presence.restore(&sessions, now_ms()).await {
            Ok(back) => {
                for user in back {
                    switchboard_router::announce(state.bus.as_ref(), &user, true, now_ms(), 1)
                        .await;
                }
                // Routers could not find us meanwhile: re-read every stream.
                state.hub.on_possible_loss();
            }
            Err(e) => {
                metrics::counter!("switchboard_edge_presence_errors_total").increment(1);
                tracing::warn!(error = %e, "presence restore failed");
            }
        }
    }
}

/// Starts this node's presence lease afresh: sessions a previous run under
/// the same node id left behind go offline (announced), then the lease
/// exists before the first socket registers.
async fn lease_presence(state: &EdgeState) {
    let node = &state.config.node_id;
    match state.presence.drop_node(node, now_ms()).await {
        Ok(gone) => {
            for (user, at) in gone {
                switchboard_router::announce(state.bus.as_ref(), &user, false, at, 0).await;
            }
        }
        Err(e) => tracing::warn!(error = %e, "presence: previous sessions not dropped"),
    }
    let addr = state.config.listen.to_string();
    if let Err(e) = state.presence.node_heartbeat(node, &addr, now_ms()).await {
        tracing::warn!(error = %e, "presence lease not taken");
    }
}

/// The reconnect delay a drained socket is advised: uniform up to
/// `reconnect_jitter_max`, so its clients come back spread out.
pub(crate) fn drain_reconnect_delay_ms(config: &Config) -> u32 {
    match config.reconnect_jitter_max.as_millis() as u32 {
        0 => 0,
        max => rand::random_range(0..max),
    }
}

async fn drain(state: &Arc<EdgeState>, stop_accepting: CancellationToken) {
    let started = tokio::time::Instant::now();
    let grace = state.config.shutdown_grace;
    state.draining.store(true, Ordering::SeqCst);
    stop_accepting.cancel();
    let conns = state.hub.conns();
    let batch = state.config.drain_batch_size;
    let batches = conns.len().div_ceil(batch).max(1);
    // Spread the batches over the first half of the grace period.
    let pause = (grace / 2 / batches as u32).min(Duration::from_millis(500));
    tracing::info!(sockets = conns.len(), batches, "draining");
    for (i, chunk) in conns.chunks(batch).enumerate() {
        for conn in chunk {
            conn.close(
                CloseReason::Shutdown,
                drain_reconnect_delay_ms(&state.config),
            );
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
