//! The edge's shared state, built once at startup from the chosen
//! backends: [`EdgeState`] for the listener, the routes and the drain, and
//! its narrow part [`SessionContext`] for the sockets' sessions.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64},
    },
    time::Duration,
};

use metrics::gauge;
use metrics_exporter_prometheus::PrometheusHandle;
use switchboard_node::{
    Api, ApiBackends,
    admin::{Admin, AdminBackends, StoreCounts},
};
use switchboard_presence::{MemberStore, PresenceStore};
use switchboard_router::{Bus, EventTap, History, Publisher};
use tokio_util::task::TaskTracker;

use crate::{
    admission::Admission,
    auth::AuthConfig,
    authz::ChatAuth,
    config::Config,
    hub::{FanoutLimits, Hub},
    metrics::EdgeMetrics,
    presence::Sessions,
    ratelimit::{Bucket, Rate},
};

pub(crate) struct EdgeState {
    pub(crate) config: Config,
    pub(crate) hub: Arc<Hub>,
    pub(crate) history: Arc<dyn History>,
    pub(crate) presence: Arc<dyn PresenceStore>,
    pub(crate) bus: Arc<dyn Bus>,
    /// Chat membership and contacts (the members API; `members` mode).
    pub(crate) members: Arc<dyn MemberStore>,
    pub(crate) metrics: Arc<EdgeMetrics>,
    pub(crate) admission: Arc<Admission>,
    /// Handshakes in progress (`--max-handshakes`).
    pub(crate) handshakes: Arc<tokio::sync::Semaphore>,
    /// New sockets per second (`--accept-rate-*`), shared by all accepts.
    pub(crate) accept_rate: std::sync::Mutex<Bucket>,
    pub(crate) next_conn_id: AtomicU64,
    pub(crate) draining: AtomicBool,
    /// WSS certificates, reloadable (`None`: plain WS).
    pub(crate) tls: Option<crate::tls::Tls>,
    /// Where the API and probe requests of plain connections are served
    /// (`control.rs`); `None`: on the main runtime.
    pub(crate) control: Option<tokio::runtime::Handle>,
    pub(crate) prometheus: PrometheusHandle,
    pub(crate) tracker: TaskTracker,
    /// This node's presence lease and its sockets' presence sessions.
    pub(crate) sessions: Arc<Sessions>,
    /// The event tap, closed after the drain.
    pub(crate) tap: Option<Arc<EventTap>>,
    /// What each socket's session reaches (clones of the handles above).
    pub(crate) context: Arc<SessionContext>,
    /// The backend API, shared by its HTTP routes and its gRPC service.
    pub(crate) api: Arc<Api>,
    /// The admin API (ADR 0037).
    pub(crate) admin: Arc<Admin>,
}

/// What a socket's session may reach, shared by all sessions behind one
/// `Arc`: each idle socket holds one pointer, not the whole state.
pub(crate) struct SessionContext {
    pub(crate) hub: Arc<Hub>,
    pub(crate) router: Arc<dyn Publisher>,
    pub(crate) history: Arc<dyn History>,
    /// Receipts to a user go over the bus to the edges presence names.
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) presence: Arc<dyn PresenceStore>,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) metrics: Arc<EdgeMetrics>,
    pub(crate) auth: AuthConfig,
    /// Chat authorization (`--chat-auth`, `--dm-policy`).
    pub(crate) authz: Arc<ChatAuth>,
    /// The moderation hook (`--moderation-url`), before client publishes.
    pub(crate) moderation: Option<crate::hooks::Moderation>,
    pub(crate) settings: SessionSettings,
}

/// The settings a socket's session and reader read (see `Config`).
pub(crate) struct SessionSettings {
    pub(crate) node_id: String,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) max_frame_bytes: usize,
    pub(crate) max_subscriptions: usize,
    pub(crate) max_presence_watches: usize,
    pub(crate) rate_requests: Rate,
    pub(crate) rate_publish: Rate,
    pub(crate) token_expiry_warning: Duration,
    /// The drain's reconnect spread (`--reconnect-jitter-max-ms`).
    pub(crate) reconnect_jitter_max: Duration,
}

impl SessionSettings {
    fn new(config: &Config) -> Self {
        SessionSettings {
            node_id: config.node_id.clone(),
            heartbeat_interval: config.heartbeat_interval,
            max_frame_bytes: config.max_frame_bytes,
            max_subscriptions: config.max_subscriptions_per_connection,
            max_presence_watches: config.max_presence_watches_per_connection,
            rate_requests: config.rate_requests,
            rate_publish: config.rate_publish,
            token_expiry_warning: config.token_expiry_warning,
            reconnect_jitter_max: config.reconnect_jitter_max,
        }
    }
}

/// The backends, chosen once at startup (see `app`).
pub(crate) struct Backends {
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) history: Arc<dyn History>,
    pub(crate) presence: Arc<dyn PresenceStore>,
    pub(crate) router: Arc<dyn Publisher>,
    /// The event tap (cluster, `--event-tap`).
    pub(crate) tap: Option<Arc<EventTap>>,
    pub(crate) members: Arc<dyn MemberStore>,
    /// The backend's authorization hook (`proxy` mode).
    pub(crate) hook: Option<Arc<dyn crate::authz::AuthorizeHook>>,
    /// The NATS connection (cluster): admin requests to other edges.
    pub(crate) nats: Option<async_nats::Client>,
}

impl EdgeState {
    /// Starts the hub on the backends and loads the TLS certificates.
    /// `prometheus` and `metrics` exist before the backends, whose metric
    /// handles need the recorder.
    pub(crate) async fn new(
        config: Config,
        b: Backends,
        prometheus: PrometheusHandle,
        metrics: Arc<EdgeMetrics>,
        control: Option<tokio::runtime::Handle>,
    ) -> Result<Arc<EdgeState>, String> {
        if config.authz.mode == crate::authz::ChatAuthMode::Proxy && b.hook.is_none() {
            return Err("--chat-auth proxy needs an authorization hook (--authorize-url)".into());
        }
        crate::hooks::register_series();
        let authz = Arc::new(ChatAuth::new(config.authz, b.members.clone(), b.hook));
        let hub = Hub::new(
            &config.node_id,
            b.bus.clone(),
            b.history.clone(),
            metrics.clone(),
            FanoutLimits {
                max_frames: config.fanout_queue_max_frames,
            },
            authz.clone(),
        );
        hub.start().await.map_err(|e| e.to_string())?;
        metrics.connections_max.set(config.max_connections as f64);
        gauge!("switchboard_edge_fanout_queue_max_frames")
            .set(config.fanout_queue_max_frames as f64);
        let tls = match &config.tls {
            Some(files) => Some(crate::tls::Tls::load(files.clone())?),
            None => None,
        };
        let sessions = Arc::new(Sessions::new(
            &config,
            b.presence.clone(),
            b.bus.clone(),
            b.router.clone(),
            hub.clone(),
            b.tap.clone(),
        ));
        let context = Arc::new(SessionContext {
            hub: hub.clone(),
            router: b.router.clone(),
            history: b.history.clone(),
            bus: b.bus.clone(),
            presence: b.presence.clone(),
            sessions: sessions.clone(),
            metrics: metrics.clone(),
            auth: config.auth.clone(),
            authz,
            moderation: config
                .moderation
                .as_ref()
                .map(|m| crate::hooks::Moderation::new(m, config.max_payload_bytes)),
            settings: SessionSettings::new(&config),
        });
        let api = Arc::new(Api::new(
            config.api_key.clone(),
            config.max_payload_bytes,
            ApiBackends {
                publisher: b.router.clone(),
                bus: b.bus.clone(),
                presence: b.presence.clone(),
                history: b.history.clone(),
                members: b.members.clone(),
            },
        ));
        let runtime = tokio::runtime::Handle::current();
        let admin_key = config.admin_key.clone();
        Ok(Arc::new_cyclic(|weak| EdgeState {
            admin: Arc::new(Admin::new(
                admin_key,
                AdminBackends {
                    api: api.clone(),
                    presence: b.presence.clone(),
                    history: b.history.clone(),
                    chats: Arc::new(StoreCounts(b.members.clone())),
                    nats: b.nats,
                    local: Some(Arc::new(crate::admin::AdminEdge {
                        node: config.node_id.clone(),
                        state: weak.clone(),
                        runtime,
                    })),
                },
            )),
            admission: Arc::new(Admission::new(config.max_connections)),
            handshakes: Arc::new(tokio::sync::Semaphore::new(config.max_handshakes)),
            accept_rate: std::sync::Mutex::new(Bucket::full(config.accept_rate)),
            config,
            hub,
            history: b.history,
            presence: b.presence,
            bus: b.bus,
            members: b.members,
            metrics,
            next_conn_id: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            tls,
            control,
            prometheus,
            tracker: TaskTracker::new(),
            sessions,
            tap: b.tap,
            context,
            api,
        }))
    }

    /// Why the edge should get no new work (`/readyz` answers 503, gRPC
    /// health NOT_SERVING), or `None`: new sockets would fail (no bus, or
    /// presence could not route to them); open ones keep being served.
    pub(crate) fn unready(&self) -> Option<&'static str> {
        if self.draining.load(std::sync::atomic::Ordering::Acquire) {
            Some("draining")
        } else if !self.bus.connected() {
            Some("bus (NATS) disconnected")
        } else if !self.sessions.renewed() {
            Some("presence (Redis) unavailable")
        } else {
            None
        }
    }

    /// Updates gauges that are cheaper to read on scrape than to track.
    pub(crate) fn refresh_gauges(&self) {
        gauge!("switchboard_edge_connections_max").set(self.admission.max() as f64);
        gauge!("switchboard_edge_connections_admitted").set(self.admission.open() as f64);
        gauge!("switchboard_edge_bus_subscriptions").set(self.bus.subscriptions() as f64);
        let idle = self.handshakes.available_permits();
        gauge!("switchboard_edge_handshakes")
            .set(self.config.max_handshakes.saturating_sub(idle) as f64);
        gauge!("switchboard_history_streams").set(self.history.streams() as f64);
        gauge!("switchboard_edge_fanout_queue_frames").set(self.hub.fanout_queued() as f64);
    }
}
