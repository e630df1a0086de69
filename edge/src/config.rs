//! Edge configuration: flags, `SWITCHBOARD_*` environment variables and an
//! optional TOML file (flags and environment win over the file), layered
//! as the router's (`switchboard_node::config`); the settings both share
//! are [`ClusterSettings`]. Every setting is validated before a port is
//! bound.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use serde::{Deserialize, Serialize};
use switchboard_node::{
    ClusterSettings,
    config::{millis as ms, positive},
};
use switchboard_router::HistoryLimits;

use crate::{
    auth::{AuthConfig, AuthError},
    ratelimit::Rate,
};

/// `switchboard-edge`: the WebSocket edge of Switchboard. With no `--nats` /
/// `--redis` it runs standalone: router, bus, presence and history in this
/// one process.
#[derive(Debug, Default, Clone, Parser, Serialize, Deserialize)]
#[command(name = "switchboard-edge", version, about, long_about = None)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// TOML file with any of the settings below (snake_case keys, e.g.
    /// `listen = "0.0.0.0:8080"`). Flags and environment override it.
    #[arg(long, env = "SWITCHBOARD_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// host:port of the HTTP/WebSocket listener. Default 127.0.0.1:8080.
    #[arg(long, env = "SWITCHBOARD_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,

    /// host:port of the gRPC listener: the backend API as gRPC
    /// (`switchboard.api.v1.Switchboard`, behind the same --api-key) and
    /// the standard health service. Unset: no gRPC.
    #[arg(long, env = "SWITCHBOARD_GRPC_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_listen: Option<String>,

    /// Settings shared with the routers.
    #[command(flatten)]
    #[serde(flatten)]
    pub cluster: ClusterSettings,

    /// HS256 secret for client JWTs (development, or tokens minted by a
    /// trusted backend).
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_secret: Option<String>,

    /// PEM file with an RSA (RS256) or EC P-256 (ES256) public key for
    /// client JWTs.
    #[arg(long, env = "SWITCHBOARD_JWT_PUBLIC_KEY_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_public_key_file: Option<PathBuf>,

    /// Required `aud` claim, if set.
    #[arg(long, env = "SWITCHBOARD_JWT_AUDIENCE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_audience: Option<String>,

    /// Required `iss` claim, if set.
    #[arg(long, env = "SWITCHBOARD_JWT_ISSUER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_issuer: Option<String>,

    /// Clock skew allowed for `exp`/`nbf`, seconds. Default 5.
    #[arg(long, env = "SWITCHBOARD_JWT_LEEWAY_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_leeway_secs: Option<u64>,

    /// DEV ONLY: serve the demo chat page at `/` and mint tokens for anyone
    /// at `/dev/token`. Never enable in production.
    #[arg(long, env = "SWITCHBOARD_DEV", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dev: Option<bool>,

    /// How chats no token grants are authorized: `token` (refused),
    /// `members` (the member store the backend keeps through the API),
    /// `proxy` (the backend's hook, `--authorize-url`), `open` (allowed;
    /// development only). Default `token`; `--dev` defaults to `open`.
    #[arg(long, env = "SWITCHBOARD_CHAT_AUTH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_auth: Option<String>,

    /// Who may message a user directly: `anyone`, or `contacts` (users the
    /// backend made contacts of the recipient). Default `anyone`.
    #[arg(long, env = "SWITCHBOARD_DM_POLICY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dm_policy: Option<String>,

    /// How long a membership or hook allow is cached per (user, chat), ms.
    /// Removals through the API reach every edge at once; this bounds a
    /// removal the bus lost. Default 60000.
    #[arg(long, env = "SWITCHBOARD_CHAT_AUTH_CACHE_TTL_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_auth_cache_ttl_ms: Option<u64>,

    /// Most cached allows. Default 100000.
    #[arg(long, env = "SWITCHBOARD_CHAT_AUTH_CACHE_ENTRIES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_auth_cache_entries: Option<usize>,

    /// The backend's authorization hook of `--chat-auth proxy`:
    /// `http://host[:port]/path` (a JSON POST) or `grpc://host:port` (the
    /// `switchboard.hooks.v1.Hooks/Authorize` RPC). See docs/operations.md.
    #[arg(long, env = "SWITCHBOARD_AUTHORIZE_URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorize_url: Option<String>,

    /// Deadline of one authorization hook call, ms; past it the request is
    /// refused (`Unavailable`, fail closed). Default 500.
    #[arg(long, env = "SWITCHBOARD_AUTHORIZE_TIMEOUT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorize_timeout_ms: Option<u64>,

    /// The backend's moderation hook, asked before each client publish is
    /// sequenced: `http://host[:port]/path` or `grpc://host:port`
    /// (`Hooks/Moderate`). Unset: no moderation.
    #[arg(long, env = "SWITCHBOARD_MODERATION_URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moderation_url: Option<String>,

    /// Deadline of one moderation call, ms. Default 500.
    #[arg(long, env = "SWITCHBOARD_MODERATION_TIMEOUT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moderation_timeout_ms: Option<u64>,

    /// A moderation call that fails or times out accepts the message as
    /// sent (true) instead of refusing it with `Unavailable`. Default false.
    #[arg(long, env = "SWITCHBOARD_MODERATION_FAIL_OPEN", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moderation_fail_open: Option<bool>,

    /// Most open sockets. Default: 90% of the process file limit minus 64
    /// (the limit is raised to its hard maximum first). Upgrades beyond get
    /// HTTP 503 with Retry-After.
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,

    /// Largest WebSocket message accepted from a client, bytes. Default 65536.
    #[arg(long, env = "SWITCHBOARD_MAX_FRAME_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_frame_bytes: Option<usize>,

    /// Frames queued for one socket before it is closed as a slow consumer.
    /// Default 1024.
    #[arg(long, env = "SWITCHBOARD_SEND_QUEUE_MAX_FRAMES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_queue_max_frames: Option<usize>,

    /// Bytes queued for one socket before it is closed as a slow consumer.
    /// Default 1048576.
    #[arg(long, env = "SWITCHBOARD_SEND_QUEUE_MAX_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_queue_max_bytes: Option<usize>,

    /// Frames waiting for fan-out on this edge, all streams together (one
    /// stream may take a quarter): publishes are acked before their
    /// fan-out. Beyond, a delivery is dropped, counted and read back from
    /// history. Default 65536.
    #[arg(long, env = "SWITCHBOARD_FANOUT_QUEUE_MAX_FRAMES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fanout_queue_max_frames: Option<usize>,

    /// WebSocket ping interval, ms; a socket silent for two intervals is
    /// closed. Default 25000.
    #[arg(long, env = "SWITCHBOARD_HEARTBEAT_INTERVAL_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval_ms: Option<u64>,

    /// Time from TCP accept to a successful Connect frame, ms. Default 10000.
    #[arg(long, env = "SWITCHBOARD_HANDSHAKE_TIMEOUT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handshake_timeout_ms: Option<u64>,

    /// Chats one socket may subscribe to. Default 512.
    #[arg(long, env = "SWITCHBOARD_MAX_SUBSCRIPTIONS_PER_CONNECTION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_subscriptions_per_connection: Option<usize>,

    /// Users one socket may watch for presence. Default 1000.
    #[arg(long, env = "SWITCHBOARD_MAX_PRESENCE_WATCHES_PER_CONNECTION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_presence_watches_per_connection: Option<usize>,

    /// Browser origins allowed to open a socket (comma-separated), e.g.
    /// `https://app.example.com,https://*.example.com`; `*` allows any.
    /// Requests without an `Origin` header (apps, servers) are not
    /// affected. Default: any origin.
    #[arg(long, env = "SWITCHBOARD_ALLOWED_ORIGINS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_origins: Option<Vec<String>>,

    /// PEM certificate chain for WSS (with --tls-key-file). Replaced files
    /// are picked up on SIGHUP without dropping open sockets.
    #[arg(long, env = "SWITCHBOARD_TLS_CERT_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key for WSS (with --tls-cert-file).
    #[arg(long, env = "SWITCHBOARD_TLS_KEY_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,

    /// Handshakes (upgrade to connectResult: token check, presence,
    /// history) in progress at once; beyond, new upgrades get 503 +
    /// Retry-After, so a reconnect storm queues at the clients, not here.
    /// Default 1000.
    #[arg(long, env = "SWITCHBOARD_MAX_HANDSHAKES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_handshakes: Option<usize>,

    /// New sockets accepted per second, sustained; beyond, 503 +
    /// Retry-After. Default 2000.
    #[arg(long, env = "SWITCHBOARD_ACCEPT_RATE_PER_SEC")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accept_rate_per_sec: Option<usize>,

    /// New sockets accepted at once after a quiet spell. Default 2000.
    #[arg(long, env = "SWITCHBOARD_ACCEPT_RATE_BURST")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accept_rate_burst: Option<usize>,

    /// Requests (any frame, WebSocket pings included) one socket may send
    /// per second, sustained. Default 50.
    #[arg(long, env = "SWITCHBOARD_RATE_REQUESTS_PER_SEC")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_requests_per_sec: Option<usize>,

    /// Requests one socket may send at once after a quiet spell: enough to
    /// resubscribe every chat after a reconnect. Default 600.
    #[arg(long, env = "SWITCHBOARD_RATE_REQUESTS_BURST")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_requests_burst: Option<usize>,

    /// Publishes, receipts and typing events one socket may send per
    /// second, sustained. Default 20.
    #[arg(long, env = "SWITCHBOARD_RATE_PUBLISH_PER_SEC")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_publish_per_sec: Option<usize>,

    /// Publishes one socket may send at once. Default 60.
    #[arg(long, env = "SWITCHBOARD_RATE_PUBLISH_BURST")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_publish_burst: Option<usize>,

    /// The whole stop after SIGTERM/SIGINT, ms: the drain of the sockets,
    /// then the last NATS flush. The edge exits within it whatever NATS
    /// and Redis do (exit 75 when it gave up on something). Default 30000.
    #[arg(long, env = "SWITCHBOARD_SHUTDOWN_GRACE_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_grace_ms: Option<u64>,

    /// Sockets disconnected per drain batch. Default 1000.
    #[arg(long, env = "SWITCHBOARD_DRAIN_BATCH_SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_batch_size: Option<usize>,

    /// Upper bound of the random reconnect delay advised on drain, ms.
    /// Default 10000.
    #[arg(long, env = "SWITCHBOARD_RECONNECT_JITTER_MAX_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconnect_jitter_max_ms: Option<u64>,

    /// Warn a socket this long before its token expires, ms. Default 60000.
    #[arg(long, env = "SWITCHBOARD_TOKEN_EXPIRY_WARNING_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_expiry_warning_ms: Option<u64>,

    /// Streams with history held in memory (standalone). Default 100000.
    #[arg(long, env = "SWITCHBOARD_HISTORY_MAX_STREAMS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history_max_streams: Option<usize>,

    /// Accept permessage-deflate (RFC 7692) when a client offers it (browsers
    /// do), without context takeover: each broadcast is compressed once for
    /// every compressing socket. Default true.
    #[arg(long, env = "SWITCHBOARD_DEFLATE", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deflate: Option<bool>,

    /// Frames shorter than this go uncompressed even on a compressing
    /// socket, bytes. Default 256.
    #[arg(long, env = "SWITCHBOARD_DEFLATE_MIN_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deflate_min_bytes: Option<usize>,

    /// How often every stream with local sockets is checked against
    /// history's positions, ms (cluster only, ADR 0044): a stream whose
    /// last message the bus lost is repaired within about this long even
    /// when nothing signalled the loss. Default 15000.
    #[arg(long, env = "SWITCHBOARD_POSITION_CHECK_INTERVAL_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position_check_interval_ms: Option<u64>,

    /// Messages NATS buffers per subscription before dropping (the edge
    /// then repairs from history). Default 8192.
    #[arg(long, env = "SWITCHBOARD_NATS_SUBSCRIPTION_CAPACITY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_subscription_capacity: Option<usize>,
}

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file, or a value, with the flag at fault.
    #[error(transparent)]
    Settings(#[from] switchboard_node::ConfigError),
    /// The token settings cannot be used.
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// The validated configuration of one edge.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listener address (the binary binds it; tests pass their own listener).
    pub listen: SocketAddr,
    /// This node's name.
    pub node_id: String,
    /// Token verification.
    pub auth: AuthConfig,
    /// Key for the backend publish API; `None` disables it.
    pub api_key: Option<String>,
    /// Key of the admin API (ADR 0037); `None` disables it.
    pub admin_key: Option<String>,
    /// The gRPC listener's address (ADR 0033); `None`: no gRPC. The
    /// process binds it when it starts.
    pub grpc_listen: Option<SocketAddr>,
    /// Demo page and dev token endpoint.
    pub dev: bool,
    /// Chat authorization (`--chat-auth`, `--dm-policy`, the cache).
    pub authz: crate::authz::AuthzSettings,
    /// The authorization hook (`--authorize-url`), for `proxy` mode.
    pub authorize_hook: Option<crate::hooks::HookSettings>,
    /// The moderation hook (`--moderation-*`); `None`: none.
    pub moderation: Option<crate::hooks::ModerationSettings>,
    /// Most open sockets.
    pub max_connections: usize,
    /// Largest client WebSocket message, bytes.
    pub max_frame_bytes: usize,
    /// Largest publish payload, bytes.
    pub max_payload_bytes: usize,
    /// Per-socket queue limit, frames.
    pub send_queue_max_frames: usize,
    /// Per-socket queue limit, bytes.
    pub send_queue_max_bytes: usize,
    /// Frames waiting for fan-out, all streams together.
    pub fanout_queue_max_frames: usize,
    /// WebSocket ping interval.
    pub heartbeat_interval: Duration,
    /// Accept-to-Connect deadline.
    pub handshake_timeout: Duration,
    /// Chats per socket.
    pub max_subscriptions_per_connection: usize,
    /// Presence watches per socket.
    pub max_presence_watches_per_connection: usize,
    /// WSS certificate and key; `None`: plain WS (behind a TLS-terminating
    /// load balancer, or for development).
    pub tls: Option<crate::TlsFiles>,
    /// Handshakes in progress at once.
    pub max_handshakes: usize,
    /// New sockets per second.
    pub accept_rate: Rate,
    /// Browser origins allowed to upgrade (empty: any).
    pub allowed_origins: Vec<String>,
    /// Any frame from one socket.
    pub rate_requests: Rate,
    /// Publishes, receipts and typing from one socket.
    pub rate_publish: Rate,
    /// From the shutdown signal to the exit, at most.
    pub shutdown_grace: Duration,
    /// Sockets per drain batch.
    pub drain_batch_size: usize,
    /// Upper bound of advised reconnect delay on drain.
    pub reconnect_jitter_max: Duration,
    /// Warning lead before token expiry.
    pub token_expiry_warning: Duration,
    /// Accept permessage-deflate offers.
    pub deflate: bool,
    /// Frames under this many bytes go uncompressed.
    pub deflate_min_bytes: usize,
    /// Memory history limits.
    pub history: HistoryLimits,
    /// Cluster backends; `None`: standalone.
    pub cluster: Option<ClusterConfig>,
    /// This node's presence lease.
    pub presence_ttl: Duration,
    /// How often streams are checked against history (cluster only).
    pub position_check_interval: Duration,
    /// Log filter.
    pub log: String,
    /// Log line format (`--log-format`).
    pub log_format: switchboard_node::LogFormat,
    /// Trace export (`--otlp-endpoint`, ADR 0038); `None`: off.
    pub traces: Option<switchboard_node::TraceSettings>,
    /// The event tap (cluster only): connects, closes and presence
    /// changes of this edge's sockets; `None`: off.
    pub event_tap: Option<switchboard_router::TapSettings>,
}

/// Where the cluster's shared services are.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// NATS URL(s).
    pub nats_url: String,
    /// Redis URL.
    pub redis_url: String,
    /// Messages buffered per NATS subscription.
    pub subscription_capacity: usize,
}

impl Settings {
    /// Fills settings missing here from the TOML file named by `--config`.
    pub fn with_file(self) -> Result<Settings, ConfigError> {
        let path = self.config.clone();
        let mut out = switchboard_node::config::read_over(self, path.as_deref())?;
        out.config = path;
        Ok(out)
    }

    /// These settings over those of a TOML document.
    pub fn over_toml(self, toml_text: &str) -> Result<Settings, String> {
        let config = self.config.clone();
        let mut out = switchboard_node::config::over_toml(self, toml_text)?;
        out.config = config;
        Ok(out)
    }

    /// Applies defaults and validates.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let listen_text = self.listen.unwrap_or_else(|| "127.0.0.1:8080".into());
        let listen = listen_text
            .parse()
            .map_err(|e| invalid("--listen", format!("{listen_text:?}: {e}")))?;
        let node = self.cluster.resolve(|| {
            std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| format!("edge-{:06x}", rand::random::<u32>() & 0xff_ffff))
        })?;
        let dev = self.dev.unwrap_or(false);
        let public_key_pem =
            match &self.jwt_public_key_file {
                Some(p) => Some(std::fs::read(p).map_err(|e| {
                    invalid("--jwt-public-key-file", format!("{}: {e}", p.display()))
                })?),
                None => None,
            };
        let mut secret = self.jwt_secret.map(String::into_bytes);
        if dev && secret.is_none() {
            // Dev mode mints its own tokens; a per-process secret keeps them
            // from working anywhere else.
            secret = Some(format!("dev-{:032x}", rand::random::<u128>()).into_bytes());
        }
        let auth = AuthConfig::new(
            secret,
            public_key_pem,
            self.jwt_audience,
            self.jwt_issuer,
            self.jwt_leeway_secs.unwrap_or(5),
        )?;
        let authz = crate::authz::AuthzSettings {
            mode: match self.chat_auth.as_deref() {
                Some(m) => m.parse().map_err(|e| invalid("--chat-auth", e))?,
                None if dev => crate::authz::ChatAuthMode::Open,
                None => crate::authz::ChatAuthMode::Token,
            },
            dm: match self.dm_policy.as_deref() {
                Some(p) => p.parse().map_err(|e| invalid("--dm-policy", e))?,
                None => crate::authz::DmPolicy::Anyone,
            },
            cache_ttl: ms(
                "--chat-auth-cache-ttl-ms",
                self.chat_auth_cache_ttl_ms,
                60_000,
            )?,
            cache_entries: positive(
                "--chat-auth-cache-entries",
                self.chat_auth_cache_entries,
                100_000,
            )?,
        };
        let authorize_hook = match &self.authorize_url {
            Some(url) => Some(crate::hooks::HookSettings {
                url: url.parse().map_err(|e| invalid("--authorize-url", e))?,
                timeout: ms("--authorize-timeout-ms", self.authorize_timeout_ms, 500)?,
            }),
            None => None,
        };
        if authz.mode == crate::authz::ChatAuthMode::Proxy && authorize_hook.is_none() {
            return Err(invalid(
                "--chat-auth",
                "proxy needs the backend's hook: set --authorize-url",
            )
            .into());
        }
        let moderation = match &self.moderation_url {
            Some(url) => Some(crate::hooks::ModerationSettings {
                hook: crate::hooks::HookSettings {
                    url: url.parse().map_err(|e| invalid("--moderation-url", e))?,
                    timeout: ms("--moderation-timeout-ms", self.moderation_timeout_ms, 500)?,
                },
                fail_open: self.moderation_fail_open.unwrap_or(false),
            }),
            None => None,
        };
        let max_connections = match self.max_connections {
            Some(0) => return Err(invalid("--max-connections", "must be greater than 0").into()),
            Some(n) => n,
            None => crate::admission::default_max_connections(),
        };
        let max_frame_bytes = positive("--max-frame-bytes", self.max_frame_bytes, 64 * 1024)?;
        let max_payload_bytes = node.max_payload_bytes;
        if max_payload_bytes > max_frame_bytes {
            return Err(invalid(
                "--max-payload-bytes",
                format!("{max_payload_bytes} exceeds --max-frame-bytes {max_frame_bytes}"),
            )
            .into());
        }
        Ok(Config {
            listen,
            node_id: node.node_id,
            auth,
            api_key: node.api_key,
            admin_key: node.admin_key,
            grpc_listen: switchboard_node::config::listen_addr(
                "--grpc-listen",
                self.grpc_listen.as_deref(),
            )?,
            dev,
            authz,
            authorize_hook,
            moderation,
            max_connections,
            max_frame_bytes,
            max_payload_bytes,
            send_queue_max_frames: positive(
                "--send-queue-max-frames",
                self.send_queue_max_frames,
                1024,
            )?,
            send_queue_max_bytes: positive(
                "--send-queue-max-bytes",
                self.send_queue_max_bytes,
                1 << 20,
            )?,
            fanout_queue_max_frames: positive(
                "--fanout-queue-max-frames",
                self.fanout_queue_max_frames,
                65_536,
            )?,
            heartbeat_interval: ms(
                "--heartbeat-interval-ms",
                self.heartbeat_interval_ms,
                25_000,
            )?,
            handshake_timeout: ms("--handshake-timeout-ms", self.handshake_timeout_ms, 10_000)?,
            max_subscriptions_per_connection: positive(
                "--max-subscriptions-per-connection",
                self.max_subscriptions_per_connection,
                512,
            )?,
            max_presence_watches_per_connection: positive(
                "--max-presence-watches-per-connection",
                self.max_presence_watches_per_connection,
                1000,
            )?,
            tls: match (self.tls_cert_file, self.tls_key_file) {
                (None, None) => None,
                (Some(cert), Some(key)) => {
                    let files = crate::TlsFiles { cert, key };
                    // Fail at startup, not at the first handshake.
                    crate::tls::server_config(&files)
                        .map_err(|message| invalid("--tls-cert-file/--tls-key-file", message))?;
                    Some(files)
                }
                _ => {
                    return Err(invalid(
                        "--tls-cert-file/--tls-key-file",
                        "WSS needs both a certificate and a key file",
                    )
                    .into());
                }
            },
            max_handshakes: positive("--max-handshakes", self.max_handshakes, 1000)?,
            accept_rate: Rate {
                per_sec: positive("--accept-rate-per-sec", self.accept_rate_per_sec, 2000)? as f32,
                burst: positive("--accept-rate-burst", self.accept_rate_burst, 2000)? as f32,
            },
            allowed_origins: self
                .allowed_origins
                .unwrap_or_default()
                .into_iter()
                .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|o| !o.is_empty())
                .collect(),
            rate_requests: Rate {
                per_sec: positive("--rate-requests-per-sec", self.rate_requests_per_sec, 50)?
                    as f32,
                burst: positive("--rate-requests-burst", self.rate_requests_burst, 600)? as f32,
            },
            rate_publish: Rate {
                per_sec: positive("--rate-publish-per-sec", self.rate_publish_per_sec, 20)? as f32,
                burst: positive("--rate-publish-burst", self.rate_publish_burst, 60)? as f32,
            },
            shutdown_grace: ms("--shutdown-grace-ms", self.shutdown_grace_ms, 30_000)?,
            drain_batch_size: positive("--drain-batch-size", self.drain_batch_size, 1000)?,
            reconnect_jitter_max: ms(
                "--reconnect-jitter-max-ms",
                self.reconnect_jitter_max_ms,
                10_000,
            )?,
            token_expiry_warning: ms(
                "--token-expiry-warning-ms",
                self.token_expiry_warning_ms,
                60_000,
            )?,
            deflate: self.deflate.unwrap_or(true),
            deflate_min_bytes: positive(
                "--deflate-min-bytes",
                self.deflate_min_bytes,
                switchboard_protocol::deflate::DEFAULT_MIN_BYTES,
            )?
            .min(u32::MAX as usize),
            history: HistoryLimits {
                max_streams: positive("--history-max-streams", self.history_max_streams, 100_000)?,
                ..node.history
            },
            cluster: match node.backends {
                None => None,
                Some(urls) => Some(ClusterConfig {
                    nats_url: urls.nats_url,
                    redis_url: urls.redis_url,
                    subscription_capacity: positive(
                        "--nats-subscription-capacity",
                        self.nats_subscription_capacity,
                        8192,
                    )?,
                }),
            },
            presence_ttl: node.presence_ttl,
            position_check_interval: ms(
                "--position-check-interval-ms",
                self.position_check_interval_ms,
                15_000,
            )?,
            log: node.log,
            log_format: node.log_format,
            traces: node.traces,
            event_tap: node.event_tap,
        })
    }
}

fn invalid(setting: &'static str, message: impl Into<String>) -> switchboard_node::ConfigError {
    switchboard_node::ConfigError::invalid(setting, message)
}

impl Config {
    /// A standalone config for tests and embedding: HS256 with `secret`,
    /// everything else at its default.
    pub fn for_secret(secret: &str) -> Config {
        Settings {
            jwt_secret: Some(secret.into()),
            max_connections: Some(10_000),
            ..Default::default()
        }
        .resolve()
        .expect("default settings with a secret are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_defaults_apply() {
        let cli = Settings {
            listen: Some("127.0.0.1:9000".into()),
            ..Default::default()
        };
        let merged = cli
            .over_toml("listen = \"0.0.0.0:1\"\njwt_secret = \"s\"\nmax_frame_bytes = 1000\nmax_payload_bytes = 500\nmax_connections = 7")
            .unwrap();
        let cfg = merged.resolve().unwrap();
        assert_eq!(cfg.listen.port(), 9000);
        assert_eq!(cfg.max_frame_bytes, 1000);
        assert_eq!(cfg.max_connections, 7);
        assert_eq!(cfg.heartbeat_interval, Duration::from_secs(25));
    }

    #[test]
    fn bad_values_name_the_setting() {
        let err = Settings {
            listen: Some("nope".into()),
            jwt_secret: Some("s".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("--listen"), "{err}");
        let err = Settings {
            send_queue_max_bytes: Some(0),
            jwt_secret: Some("s".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("--send-queue-max-bytes"), "{err}");
        assert!(
            Settings::default()
                .over_toml("no_such_setting = 1")
                .is_err()
        );
    }

    #[test]
    fn a_standalone_edge_refuses_the_event_tap() {
        let err = Settings {
            dev: Some(true),
            ..Default::default()
        }
        .over_toml("event_tap = true")
        .unwrap()
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("--event-tap"), "{err}");
    }

    #[test]
    fn needs_a_key_unless_dev() {
        assert!(Settings::default().resolve().is_err());
        assert!(
            Settings {
                dev: Some(true),
                ..Default::default()
            }
            .resolve()
            .is_ok()
        );
    }
}
