//! Settings both processes take, declared once ([`ClusterSettings`]), and
//! the layering both use: flags and `SWITCHBOARD_*` environment variables
//! over an optional TOML file (`--config`), then defaults, then
//! validation that names the flag at fault ([`ConfigError`]), all before a
//! port is bound.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use switchboard_router::HistoryLimits;

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML file could not be read.
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML file is not valid.
    #[error("invalid config file {path}: {message}")]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A value is out of range or malformed.
    #[error("invalid value for {setting}: {message}")]
    Invalid {
        /// The setting (flag name).
        setting: &'static str,
        /// Why.
        message: String,
    },
}

impl ConfigError {
    /// `setting` (its flag, e.g. `--listen`) cannot be used, because `message`.
    pub fn invalid(setting: &'static str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            setting,
            message: message.into(),
        }
    }
}

/// `ours` (flags and environment) over the settings of the TOML file at
/// `path`, if any. Settings serialize without their unset fields, so only
/// what flags and environment set overrides the file.
pub fn read_over<S>(ours: S, path: Option<&Path>) -> Result<S, ConfigError>
where
    S: Serialize + DeserializeOwned,
{
    let Some(path) = path else { return Ok(ours) };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    over_toml(ours, &text).map_err(|message| ConfigError::ParseFile {
        path: path.to_owned(),
        message,
    })
}

/// `ours` over the settings of a TOML document.
pub fn over_toml<S>(ours: S, toml_text: &str) -> Result<S, String>
where
    S: Serialize + DeserializeOwned,
{
    let file: S = toml::from_str(toml_text).map_err(|e| e.to_string())?;
    let mut merged = serde_json::to_value(file).map_err(|e| e.to_string())?;
    let ours = serde_json::to_value(ours).map_err(|e| e.to_string())?;
    if let (Some(base), serde_json::Value::Object(top)) = (merged.as_object_mut(), ours) {
        base.extend(top);
    }
    serde_json::from_value(merged).map_err(|e| e.to_string())
}

/// `value`, or `default`; refused if 0.
pub fn positive(
    setting: &'static str,
    value: Option<usize>,
    default: usize,
) -> Result<usize, ConfigError> {
    match value.unwrap_or(default) {
        0 => Err(ConfigError::invalid(setting, "must be greater than 0")),
        n => Ok(n),
    }
}

/// An optional listener address (`host:port`); unset or empty: none.
pub fn listen_addr(
    setting: &'static str,
    value: Option<&str>,
) -> Result<Option<SocketAddr>, ConfigError> {
    match value.filter(|v| !v.is_empty()) {
        Some(text) => text
            .parse()
            .map(Some)
            .map_err(|e| ConfigError::invalid(setting, format!("{text:?}: {e}"))),
        None => Ok(None),
    }
}

/// `value` ms, or `default` ms; refused if 0.
pub fn millis(
    setting: &'static str,
    value: Option<u64>,
    default: u64,
) -> Result<Duration, ConfigError> {
    match value.unwrap_or(default) {
        0 => Err(ConfigError::invalid(setting, "must be greater than 0")),
        n => Ok(Duration::from_millis(n)),
    }
}

/// How log lines are written.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The settings edges and routers share: backends, identity, API key,
/// limits every node of a cluster must agree on, and logging. Flattened
/// into each process's settings, so the flag, the environment variable
/// and the TOML key are the same on both.
#[derive(Debug, Default, Clone, clap::Args, Serialize, Deserialize)]
pub struct ClusterSettings {
    /// NATS server URL(s), comma-separated. With --redis: cluster mode
    /// (a router needs both; an edge without either runs standalone).
    #[arg(long = "nats", env = "SWITCHBOARD_NATS_URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats: Option<String>,

    /// Redis URL. With --nats: cluster mode.
    #[arg(long = "redis", env = "SWITCHBOARD_REDIS_URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<String>,

    /// Name of this node in logs, presence, ConnectResult and its NATS
    /// connection. Default: an edge's host name (else "edge-<random>"), a
    /// router's "router".
    #[arg(long, env = "SWITCHBOARD_NODE_ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,

    /// API key for `POST /api/publish`, `/api/kick` (and a router's
    /// `/api/channels`), from backends. Unset: the API is off.
    #[arg(long, env = "SWITCHBOARD_API_KEY", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,

    /// Key of the admin API (`/admin/*`, what `switchboard-ctl` calls:
    /// the node registry, presence, stream positions, kicks, drains),
    /// for operators; a different secret from --api-key (ADR 0037).
    /// Unset: the admin API is off.
    #[arg(long, env = "SWITCHBOARD_ADMIN_KEY", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_key: Option<String>,

    /// Largest publish payload, bytes. Default 32768.
    #[arg(long, env = "SWITCHBOARD_MAX_PAYLOAD_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_payload_bytes: Option<usize>,

    /// Messages kept per stream for recovery. Default 1000.
    #[arg(long, env = "SWITCHBOARD_HISTORY_MAX_MESSAGES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history_max_messages: Option<usize>,

    /// Age after which history messages are dropped, ms. Default 600000.
    #[arg(long, env = "SWITCHBOARD_HISTORY_MAX_AGE_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history_max_age_ms: Option<u64>,

    /// Presence lease, ms, the same on every node: an edge renews its
    /// users' lease every sixth of it, so a crashed edge's users go
    /// offline within it. Default 30000.
    #[arg(long, env = "SWITCHBOARD_PRESENCE_TTL_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_ttl_ms: Option<u64>,

    /// Log filter (tracing EnvFilter syntax). Default "info".
    #[arg(long, env = "SWITCHBOARD_LOG")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,

    /// Log lines as `text` (for people) or `json` (one JSON object per
    /// line, for log pipelines; docs/operations.md lists the fields).
    /// Default text.
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT", value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,

    /// OTLP/gRPC endpoint to export traces to, `http://host:port` (an
    /// OpenTelemetry Collector's 4317, Jaeger, Tempo); unset: no traces.
    /// Needs the `otel` cargo feature, on by default (ADR 0038). Default
    /// unset.
    #[arg(long, env = "SWITCHBOARD_OTLP_ENDPOINT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,

    /// Share of publishes that start a trace here, 0.0 to 1.0. Parent-based:
    /// a publish that arrives with a trace context (a backend's
    /// `traceparent`, an edge's NATS header) follows that trace's decision
    /// instead. Default 0.01.
    #[arg(long, env = "SWITCHBOARD_TRACE_SAMPLE_RATIO")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_sample_ratio: Option<f64>,

    /// Append every sequenced message, every socket's connect and close
    /// and every online/offline change to a JetStream stream for backends
    /// to consume (docs/operations.md, "Event tap"). Cluster mode only.
    /// Default false.
    #[arg(long = "event-tap", env = "SWITCHBOARD_EVENT_TAP", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_tap: Option<bool>,

    /// Name of the event tap's JetStream stream (letters, digits, `-`,
    /// `_`; at most 64). Default SB_EVENTS.
    #[arg(long, env = "SWITCHBOARD_EVENT_TAP_STREAM")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_tap_stream: Option<String>,

    /// Age after which the tap's stream drops an event, seconds: how long
    /// a consumer may stay away and still catch up. Default 86400.
    #[arg(long, env = "SWITCHBOARD_EVENT_TAP_MAX_AGE_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_tap_max_age_secs: Option<u64>,

    /// Bytes the tap's stream holds at most; beyond, it drops its oldest
    /// events. Default 1073741824 (1 GiB).
    #[arg(long, env = "SWITCHBOARD_EVENT_TAP_MAX_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_tap_max_bytes: Option<u64>,

    /// Replicas of the tap's stream (1-5; 3 on a NATS cluster). Routers
    /// create it or update it to this at startup. Default 1.
    #[arg(long, env = "SWITCHBOARD_EVENT_TAP_REPLICAS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_tap_replicas: Option<u8>,

    /// Tap events waiting in this process for JetStream; beyond, new ones
    /// are dropped and counted (delivery never waits for the tap).
    /// Default 65536.
    #[arg(long, env = "SWITCHBOARD_EVENT_TAP_QUEUE_MAX_EVENTS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_tap_queue_max_events: Option<usize>,

    /// Bytes of the tap events waiting in this process (payloads mostly);
    /// beyond, new ones are dropped and counted. Default 67108864 (64 MiB).
    #[arg(long, env = "SWITCHBOARD_EVENT_TAP_QUEUE_MAX_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_tap_queue_max_bytes: Option<usize>,
}

/// The validated [`ClusterSettings`].
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's name (a valid id: it goes into NATS subjects).
    pub node_id: String,
    /// Key of the backend API; `None` turns it off.
    pub api_key: Option<String>,
    /// Largest publish payload, bytes.
    pub max_payload_bytes: usize,
    /// History window (messages and age; the rest at defaults).
    pub history: HistoryLimits,
    /// Presence lease.
    pub presence_ttl: Duration,
    /// NATS and Redis; `None`: neither given.
    pub backends: Option<BackendUrls>,
    /// Log filter.
    pub log: String,
    /// Log line format.
    pub log_format: LogFormat,
    /// Key of the admin API; `None` turns it off.
    pub admin_key: Option<String>,
    /// The event tap; `None`: off.
    pub event_tap: Option<switchboard_router::TapSettings>,
    /// Trace export; `None`: off.
    pub traces: Option<TraceSettings>,
}

/// Where and how much to trace (ADR 0038).
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    /// OTLP/gRPC endpoint, `http://host:port`.
    pub otlp_endpoint: String,
    /// Share of root publishes sampled, 0.0 to 1.0 (parent-based).
    pub sample_ratio: f64,
    /// This node's id (`service.instance.id`).
    pub node_id: String,
}

impl TraceSettings {
    fn resolve(
        endpoint: Option<String>,
        ratio: Option<f64>,
        node_id: &str,
    ) -> Result<Option<TraceSettings>, ConfigError> {
        let sample_ratio = ratio.unwrap_or(0.01);
        if !(0.0..=1.0).contains(&sample_ratio) {
            return Err(ConfigError::invalid(
                "--trace-sample-ratio",
                format!("{sample_ratio} is not between 0.0 and 1.0"),
            ));
        }
        let Some(otlp_endpoint) = endpoint.filter(|e| !e.is_empty()) else {
            return Ok(None);
        };
        if !otlp_endpoint.starts_with("http://") {
            return Err(ConfigError::invalid(
                "--otlp-endpoint",
                format!(
                    "{otlp_endpoint}: give http://host:port (OTLP over gRPC without TLS; a collector next to the node forwards over TLS)"
                ),
            ));
        }
        if !cfg!(feature = "otel") {
            return Err(ConfigError::invalid(
                "--otlp-endpoint",
                "this binary was built without trace export (cargo feature `otel`)",
            ));
        }
        Ok(Some(TraceSettings {
            otlp_endpoint,
            sample_ratio,
            node_id: node_id.to_owned(),
        }))
    }
}

/// Where a cluster's NATS and Redis are.
#[derive(Debug, Clone)]
pub struct BackendUrls {
    /// NATS URL(s), comma-separated.
    pub nats_url: String,
    /// Redis URL.
    pub redis_url: String,
}

impl ClusterSettings {
    /// Applies defaults and validates; `default_node_id` names a node
    /// without `--node-id`.
    pub fn resolve(
        self,
        default_node_id: impl FnOnce() -> String,
    ) -> Result<NodeConfig, ConfigError> {
        let event_tap = crate::tap::resolve(&self)?;
        let node_id = self.node_id.unwrap_or_else(default_node_id);
        switchboard_protocol::UserId::parse(&node_id)
            .map_err(|e| ConfigError::invalid("--node-id", e.to_string()))?;
        let backends = match (self.nats, self.redis) {
            (None, None) => None,
            (Some(nats_url), Some(redis_url)) => Some(BackendUrls {
                nats_url,
                redis_url,
            }),
            _ => {
                return Err(ConfigError::invalid(
                    "--nats/--redis",
                    "cluster mode needs both --nats and --redis",
                ));
            }
        };
        if event_tap.is_some() && backends.is_none() {
            return Err(ConfigError::invalid(
                "--event-tap",
                "the event tap needs cluster mode (--nats and --redis): it appends to a JetStream stream, and a standalone edge has no NATS",
            ));
        }
        let traces = TraceSettings::resolve(self.otlp_endpoint, self.trace_sample_ratio, &node_id)?;
        Ok(NodeConfig {
            node_id,
            api_key: self.api_key.filter(|k| !k.is_empty()),
            max_payload_bytes: positive("--max-payload-bytes", self.max_payload_bytes, 32 * 1024)?,
            history: HistoryLimits {
                max_messages: positive("--history-max-messages", self.history_max_messages, 1000)?,
                max_age_ms: millis("--history-max-age-ms", self.history_max_age_ms, 600_000)?
                    .as_millis() as i64,
                ..HistoryLimits::default()
            },
            presence_ttl: millis("--presence-ttl-ms", self.presence_ttl_ms, 30_000)?,
            backends,
            traces,
            log: self.log.unwrap_or_else(|| "info".into()),
            log_format: self.log_format.unwrap_or_default(),
            admin_key: self.admin_key.filter(|k| !k.is_empty()),
            event_tap,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        #[serde(skip_serializing_if = "Option::is_none")]
        listen: Option<String>,
        #[serde(flatten)]
        shared: ClusterSettings,
    }

    #[test]
    fn shared_settings_layer_like_their_own() {
        let ours = Outer {
            shared: ClusterSettings {
                node_id: Some("flag".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let merged =
            over_toml(ours, "listen = \"x\"\nnode_id = \"file\"\nlog = \"debug\"").unwrap();
        assert_eq!(merged.listen.as_deref(), Some("x"));
        assert_eq!(merged.shared.node_id.as_deref(), Some("flag"));
        assert_eq!(merged.shared.log.as_deref(), Some("debug"));
        assert!(over_toml(Outer::default(), "no_such_setting = 1").is_err());
        let file = "event_tap = true\nevent_tap_max_bytes = 4096\nnats = \"n\"\nredis = \"r\"";
        let tap = over_toml(Outer::default(), file)
            .unwrap()
            .shared
            .resolve(|| "n".into())
            .unwrap()
            .event_tap
            .expect("the tap is on");
        assert_eq!(tap.max_bytes, 4096);
    }

    #[test]
    fn the_tap_needs_a_cluster() {
        let err = ClusterSettings {
            event_tap: Some(true),
            ..Default::default()
        }
        .resolve(|| "n".into())
        .unwrap_err();
        assert!(
            err.to_string().contains("--event-tap") && err.to_string().contains("standalone"),
            "{err}"
        );
        let cluster = ClusterSettings {
            nats: Some("nats://h".into()),
            redis: Some("redis://h".into()),
            event_tap: Some(true),
            ..Default::default()
        };
        assert!(cluster.resolve(|| "n".into()).unwrap().event_tap.is_some());
    }

    #[test]
    fn bad_values_name_the_flag() {
        let err = ClusterSettings {
            presence_ttl_ms: Some(0),
            ..Default::default()
        }
        .resolve(|| "n".into())
        .unwrap_err();
        assert!(err.to_string().contains("--presence-ttl-ms"), "{err}");
        let err = ClusterSettings {
            nats: Some("nats://h".into()),
            ..Default::default()
        }
        .resolve(|| "n".into())
        .unwrap_err();
        assert!(err.to_string().contains("--nats/--redis"), "{err}");
        let err = ClusterSettings::default()
            .resolve(|| "a.b".into())
            .unwrap_err();
        assert!(err.to_string().contains("--node-id"), "{err}");
        let err = listen_addr("--grpc-listen", Some("nope")).unwrap_err();
        assert!(err.to_string().contains("--grpc-listen"), "{err}");
        assert_eq!(listen_addr("--grpc-listen", Some("")).unwrap(), None);
        let addr = listen_addr("--grpc-listen", Some("127.0.0.1:7")).unwrap();
        assert_eq!(addr.map(|a| a.port()), Some(7));
    }

    #[test]
    fn traces_are_off_without_an_endpoint_and_checked_with_one() {
        let with = |endpoint: Option<&str>, ratio: Option<f64>| {
            ClusterSettings {
                otlp_endpoint: endpoint.map(Into::into),
                trace_sample_ratio: ratio,
                ..Default::default()
            }
            .resolve(|| "n1".into())
        };
        assert_eq!(with(None, None).unwrap().traces, None);
        assert_eq!(with(Some(""), Some(1.0)).unwrap().traces, None);
        for (endpoint, ratio, flag) in [
            (Some("http://c:4317"), Some(1.5), "--trace-sample-ratio"),
            (None, Some(-0.1), "--trace-sample-ratio"),
            (Some("c:4317"), None, "--otlp-endpoint"),
            (Some("https://c:4317"), None, "--otlp-endpoint"),
        ] {
            let err = with(endpoint, ratio).unwrap_err().to_string();
            assert!(err.contains(flag), "{err}");
        }
        let on = with(Some("http://c:4317"), None);
        if cfg!(feature = "otel") {
            let traces = on.unwrap().traces.expect("on");
            assert_eq!(traces.sample_ratio, 0.01);
            assert_eq!(traces.node_id, "n1");
        } else {
            let err = on.unwrap_err().to_string();
            assert!(err.contains("without trace export"), "{err}");
        }
    }
}
