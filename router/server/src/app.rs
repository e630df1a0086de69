//! Wiring: the backends (NATS, Redis) chosen once, the NATS consumer, the
//! presence sweeper and the HTTP listener, and their shutdown.
use std::{future::Future, sync::Arc, time::Duration};

use metrics::counter;
use metrics_exporter_prometheus::PrometheusHandle;
use switchboard_node::{
    Api, ApiBackends, Stop, Stopped,
    admin::{Admin, AdminBackends},
    grpc::{GrpcServer, Readiness},
};
use switchboard_presence::{PresenceStore, RedisPresence};
use switchboard_router::{
    Bus, EventTap, History, Hop, Members, MembersSettings, NatsBus, NatsSettings, RedisHistory,
    Router, RouterLimits, StreamRole, connect_redis, redact_url,
};
use tokio::net::TcpListener;

use crate::{Config, routes::Http, state::RouterState};

/// Connects the backends and serves on `listener` until `shutdown`, then
/// stops within `--shutdown-grace-ms`, whatever the backends do. Fails
/// only when it cannot start.
pub async fn run(
    config: Config,
    listener: TcpListener,
    prometheus: PrometheusHandle,
    shutdown: impl Future<Output = ()>,
) -> Result<Stopped, String> {
    register_series();
    // Bound first: a port in use fails the start before any backend is
    // touched.
    let grpc_listener = match config.grpc_listen {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr).map_err(|e| format!("--grpc-listen {addr}: {e}"))?,
        ),
        None => None,
    };
    let nats = NatsSettings {
        url: config.nats_url.clone(),
        name: config.node_id.clone(),
        subscription_capacity: 65_536,
    };
    let bus = Arc::new(NatsBus::connect(&nats).await.map_err(|e| e.to_string())?);
    let redis = connect_redis(&config.redis_url)
        .await
        .map_err(|e| format!("redis {}: {e}", redact_url(&config.redis_url)))?;
    let history: Arc<dyn History> = Arc::new(RedisHistory::with_append_batch(
        redis.clone(),
        config.history,
        config.redis_append_batch,
    ));
    let ttl_ms = config.presence_ttl.as_millis() as i64;
    let presence: Arc<dyn PresenceStore> = Arc::new(RedisPresence::new(redis.clone(), ttl_ms));
    let members = Arc::new(
        Members::new(
            redis,
            presence.clone(),
            bus.client().clone(),
            MembersSettings {
                buckets: config.channel_buckets,
                stream_replicas: usize::from(config.push_stream_replicas),
                shard_ack_wait: config.shard_ack_wait,
            },
        )
        .await
        .map_err(|e| e.to_string())?,
    );
    let tap = match &config.event_tap {
        Some(settings) => Some(Arc::new(
            EventTap::start(
                bus.client().clone(),
                settings,
                StreamRole::Owner,
                Some(history.clone()),
                &config.node_id,
            )
            .await
            .map_err(|e| e.to_string())?,
        )),
        None => None,
    };
    let mut router = Router::new(
        history.clone(),
        bus.clone(),
        presence.clone(),
        RouterLimits {
            max_payload_bytes: config.max_payload_bytes,
        },
    )
    .with_members(members.clone());
    if let Some(tap) = &tap {
        router = router.with_tap(tap.clone());
    }
    let router = Arc::new(router);
    let stop = Stop::new(config.shutdown_grace);
    // Subscribed before the HTTP listener answers /readyz: ready means
    // reachable by the edges' publish requests.
    let publishes = crate::consumer::subscribe(bus.client()).await?;
    let nats_task = tokio::spawn(crate::consumer::serve(
        bus.client().clone(),
        publishes,
        router.clone(),
        Some(members.clone()),
        stop.clone(),
    ));
    let sweep = tokio::spawn(switchboard_node::sweep_presence(
        presence.clone(),
        bus.clone() as Arc<dyn Bus>,
        tap.clone(),
        (config.presence_ttl / 3).max(Duration::from_millis(100)),
        stop.token(),
    ));
    tracing::info!(addr = %config.listen, node = %config.node_id, "switchboard router serving");
    let member_store: Arc<dyn switchboard_presence::MemberStore> =
        Arc::new(members.store().clone());
    let api = Arc::new(Api::new(
        config.api_key.clone(),
        config.max_payload_bytes,
        ApiBackends {
            publisher: router.clone(),
            bus: bus.clone(),
            presence: presence.clone(),
            history: history.clone(),
            members: member_store.clone(),
        },
    ));
    let admin = Arc::new(Admin::new(
        config.admin_key.clone(),
        AdminBackends {
            api: api.clone(),
            presence: presence.clone(),
            history,
            chats: Arc::new(crate::state::ChannelCounts(members.clone())),
            nats: Some(bus.client().clone()),
            local: None,
        },
    ));
    let state = Arc::new(RouterState {
        admin,
        member_store,
        members,
        bus,
        config,
        prometheus,
        api,
    });
    let http = Http::start(listener, state.clone(), stop.clone());
    let grpc = match grpc_listener {
        Some(listener) => {
            let addr = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let ready_state = state.clone();
            let ready: Readiness = Arc::new(move || ready_state.unready());
            let runtime = tokio::runtime::Handle::current();
            let server = GrpcServer::start(listener, state.api.clone(), ready, &runtime)
                .map_err(|e| format!("--grpc-listen {addr}: {e}"))?;
            tracing::info!(addr = %addr, "gRPC API listening");
            Some(server)
        }
        None => None,
    };
    shutdown.await;
    tracing::info!(
        grace_ms = stop.grace().as_millis() as u64,
        "router shutting down"
    );
    stop.begin();
    // Every step is bounded whatever NATS and Redis do (a flush waits for
    // a connection that may never come). First the work in hand, each part
    // bounded by the work deadline inside; then the backends are let go.
    let deadline = stop.deadline();
    tokio::join!(
        stop.join("publish requests and shard jobs", deadline, nats_task),
        http.stop(&stop),
        async {
            if let Some(grpc) = grpc {
                grpc.stop(&stop).await;
            }
        },
    );
    // The events of the publishes just finished are queued: appended
    // before the last flush, within the grace.
    if let Some(tap) = &tap {
        // Half of what is left at most: with JetStream down the tap's
        // retries would take all of it and leave the NATS flush none.
        stop.bounded("event tap", stop.halfway_to(deadline), tap.close())
            .await;
    }
    tokio::join!(
        stop.join("presence sweep", deadline, sweep),
        stop.step("NATS flush", deadline, state.bus.flush()),
    );
    let stopped = stop.stopped();
    tracing::info!(clean = stopped == Stopped::Clean, "router stopped");
    Ok(stopped)
}

/// Registers the router's series at zero.
fn register_series() {
    switchboard_node::telemetry::register_cluster_series();
    switchboard_node::telemetry::register_api_series();
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
        "switchboard_router_shard_jobs_redelivered_total",
        "switchboard_router_push_jobs_total",
        "switchboard_presence_expired_total",
        "switchboard_history_failover_lost_total",
        "switchboard_history_epoch_fenced_total",
    ] {
        counter!(name).increment(0);
    }
    for reason in ["pull", "decode", "failed", "abandoned"] {
        counter!("switchboard_router_shard_errors_total", "reason" => reason).increment(0);
    }
    for name in [
        "switchboard_router_shard_jobs_in_flight",
        "switchboard_router_shard_jobs_pending",
        "switchboard_history_rpo_tracked_streams",
    ] {
        metrics::gauge!(name).set(0.0);
    }
    // A registered histogram renders its buckets at 0 before the first publish.
    let _ = metrics::histogram!("switchboard_router_publish_duration_seconds");
    // A router acks backend publishes (`POST /api/publish`) and sequences
    // every publish; the later hops happen on the edges.
    switchboard_node::telemetry::register_hop_series(&[Hop::Ack, Hop::Sequence]);
}
