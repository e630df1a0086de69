//! Wiring: backends chosen once at startup, then the listener, the
//! presence lease, the background tasks and the drain started and stopped
//! in order; [`Edge`] runs it all for tests and embedding.
use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use switchboard_node::{Stop, Stopped};
use switchboard_presence::{
    MemberStore, MemoryMembers, MemoryPresence, PresenceStore, RedisMembers, RedisPresence,
};
use switchboard_router::{
    Bus, EventTap, History, MemoryBus, MemoryHistory, NatsBus, NatsSettings, RedisHistory,
    RemoteRouter, Router, RouterLimits, StreamRole, connect_redis,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    drain,
    metrics::EdgeMetrics,
    server,
    state::{Backends, EdgeState},
};

/// The one place backends are chosen: memory standalone, NATS + Redis in a
/// cluster. Everything else sees the traits.
pub(crate) async fn backends(config: &Config) -> Result<Backends, String> {
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
        // Refused by the configuration, which names the flag.
        debug_assert!(config.event_tap.is_none(), "the tap needs a cluster");
        let members: Arc<dyn MemberStore> = Arc::new(MemoryMembers::new());
        return Ok(Backends {
            bus,
            history,
            presence,
            router,
            tap: None,
            members,
            hook: crate::hooks::authorizer(config.authorize_hook.as_ref()),
            nats: None,
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
    // Connects, closes and presence changes only: routers append messages.
    let tap = match &config.event_tap {
        Some(settings) => Some(Arc::new(
            EventTap::start(
                client.clone(),
                settings,
                StreamRole::Guest,
                None,
                &config.node_id,
            )
            .await
            .map_err(|e| e.to_string())?,
        )),
        None => None,
    };
    let redis = connect_redis(&cluster.redis_url).await.map_err(|e| {
        format!(
            "redis {}: {e}",
            switchboard_router::redact_url(&cluster.redis_url)
        )
    })?;
    let history: Arc<dyn History> = Arc::new(RedisHistory::new(redis.clone(), config.history));
    // The bucket count the routers recorded (ADR 0031).
    let members: Arc<dyn MemberStore> = Arc::new(
        RedisMembers::open(redis.clone(), None)
            .await
            .map_err(|e| format!("member store: {e}"))?,
    );
    let presence: Arc<dyn PresenceStore> = Arc::new(RedisPresence::new(redis, ttl));
    let router = Arc::new(RemoteRouter::new(
        client.clone(),
        bus.clone(),
        Duration::from_secs(2),
    ));
    Ok(Backends {
        bus,
        history,
        presence,
        router,
        tap,
        members,
        hook: crate::hooks::authorizer(config.authorize_hook.as_ref()),
        nats: Some(client),
    })
}

/// The state on its backends. The recorder exists before any metric
/// handle is registered, the backends' included.
async fn start(config: Config, control: tokio::runtime::Handle) -> Result<Arc<EdgeState>, String> {
    let prometheus = crate::metrics::prometheus();
    let metrics = Arc::new(EdgeMetrics::new());
    let backends = backends(&config).await?;
    EdgeState::new(config, backends, prometheus, metrics, Some(control)).await
}

/// A running edge (for tests and embedding).
pub struct Edge {
    addr: SocketAddr,
    grpc_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<Stopped, String>>,
}

impl Edge {
    /// Starts an edge on an already bound listener; binds the gRPC
    /// listener, if the config names one (port 0: any free port, see
    /// [`Edge::grpc_addr`]).
    pub fn start(config: Config, listener: TcpListener) -> std::io::Result<Edge> {
        let addr = listener.local_addr()?;
        let grpc = config
            .grpc_listen
            .map(std::net::TcpListener::bind)
            .transpose()?;
        let grpc_addr = grpc.as_ref().map(|l| l.local_addr()).transpose()?;
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task =
            tokio::spawn(
                async move { serve(config, listener, grpc, token.cancelled_owned()).await },
            );
        Ok(Edge {
            addr,
            grpc_addr,
            shutdown,
            task,
        })
    }

    /// The listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The gRPC listener's address, if it has one.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc_addr
    }

    /// Drains (as on SIGTERM) and waits until the edge has stopped.
    pub async fn shutdown(self) -> Stopped {
        self.shutdown.cancel();
        match self.task.await {
            Ok(Ok(stopped)) => stopped,
            _ => Stopped::GaveUp,
        }
    }

    /// Stops at once, as a crash would: no drain, no presence cleanup.
    pub fn abort(self) {
        self.task.abort();
    }
}

/// How long startup may wait for NATS and Redis.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

/// Serves until `shutdown` resolves, then drains and lets go of the
/// backends within the grace period, whatever they do. Fails only if the
/// cluster backends cannot be reached at startup, or `--grpc-listen`
/// cannot be bound.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<Stopped, String> {
    let grpc = match config.grpc_listen {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr).map_err(|e| format!("--grpc-listen {addr}: {e}"))?,
        ),
        None => None,
    };
    serve(config, listener, grpc, shutdown).await
}

/// [`run`] with the gRPC listener already bound.
async fn serve(
    config: Config,
    listener: TcpListener,
    grpc: Option<std::net::TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<Stopped, String> {
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
    // Stopped when `run` returns, after the drain.
    let control = crate::control::Control::start().map_err(|e| format!("control runtime: {e}"))?;
    let state = match tokio::time::timeout(STARTUP_TIMEOUT, start(config, control.handle())).await {
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
    state.sessions.lease().await;
    // The API's gRPC twin runs where its HTTP routes do: on the control
    // runtime, out of the sockets' way (control.rs).
    let grpc = match grpc {
        Some(listener) => {
            let addr = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let ready_state = state.clone();
            let ready: switchboard_node::grpc::Readiness = Arc::new(move || ready_state.unready());
            let runtime = state
                .control
                .clone()
                .unwrap_or_else(tokio::runtime::Handle::current);
            let server = switchboard_node::grpc::GrpcServer::start(
                listener,
                state.api.clone(),
                ready,
                &runtime,
            )
            .map_err(|e| format!("--grpc-listen {addr}: {e}"))?;
            tracing::info!(addr = %addr, "gRPC API listening");
            Some(server)
        }
        None => None,
    };
    let reloads = tokio::spawn(reload_tls_on_sighup(state.clone()));
    let stop_accepting = CancellationToken::new();
    let background = CancellationToken::new();
    let accept = tokio::spawn(server::accept_loop(
        state.clone(),
        listener,
        stop_accepting.clone(),
    ));
    let heartbeats = tokio::spawn(state.sessions.clone().heartbeats(background.clone()));
    // Admin requests from any node's admin API (ADR 0037).
    let admin_requests = match (state.admin.nats(), state.admin.local()) {
        (Some(client), Some(local)) => Some(tokio::spawn(
            switchboard_node::admin::serve_edge_requests(client, local, background.clone()),
        )),
        _ => None,
    };
    let sweeper = tokio::spawn(switchboard_node::sweep_presence(
        state.presence.clone(),
        state.bus.clone(),
        state.tap.clone(),
        state.config.presence_ttl / 3,
        background.clone(),
    ));
    // Cluster only: the memory bus and store lose nothing (ADR 0044).
    let checks = state.config.cluster.is_some().then(|| {
        let every = state.config.position_check_interval;
        let (hub, sessions, stop) = (
            state.hub.clone(),
            state.sessions.clone(),
            background.clone(),
        );
        tokio::spawn(async move {
            tokio::join!(
                hub.check_positions(every, stop.clone()),
                sessions.check_sessions(every, stop),
            );
        })
    });
    shutdown.await;
    let stop = Stop::new(state.config.shutdown_grace);
    stop.begin();
    // Every step is bounded whatever NATS and Redis do: the sockets until
    // the work deadline, then the backends until the grace ends.
    tokio::join!(drain::drain(&state, stop_accepting, &stop), async {
        if let Some(grpc) = grpc {
            grpc.stop(&stop).await;
        }
    });
    background.cancel();
    reloads.abort();
    let deadline = stop.deadline();
    // The drained sockets' closes are queued: appended before the flush.
    if let Some(tap) = &state.tap {
        // Half of what is left at most: with JetStream down the tap's
        // retries would take all of it and leave the NATS flush none.
        stop.bounded("event tap", stop.halfway_to(deadline), tap.close())
            .await;
    }
    tokio::join!(
        stop.join("accept loop", deadline, accept),
        stop.join("presence lease renewal", deadline, heartbeats),
        stop.join("presence sweep", deadline, sweeper),
        async {
            if let Some(task) = checks {
                stop.join("position and presence checks", deadline, task)
                    .await;
            }
        },
        async {
            if let Some(task) = admin_requests {
                stop.join("admin requests", deadline, task).await;
            }
        },
        // The last presence events of the drained sockets leave here.
        stop.step("NATS flush", deadline, state.bus.flush()),
    );
    let stopped = stop.stopped();
    tracing::info!(clean = stopped == Stopped::Clean, "edge stopped");
    Ok(stopped)
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
