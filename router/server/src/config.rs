//! Router configuration, layered like the edge's: flags and
//! `SWITCHBOARD_*` environment variables over an optional TOML file, then
//! defaults and validation before anything connects.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use serde::{Deserialize, Serialize};
use switchboard_node::{
    ClusterSettings, ConfigError,
    config::{millis, positive, read_over},
};
use switchboard_router::{HistoryLimits, SHARD_ACK_WAIT_MAX};

/// `switchboard-router`: sequences, stores and delivers messages for a
/// Switchboard cluster. Any number of replicas share the work.
#[derive(Debug, Default, Clone, Parser, Serialize, Deserialize)]
#[command(name = "switchboard-router", version, about, long_about = None)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// TOML file with any of the settings below (snake_case keys, e.g.
    /// `listen = "0.0.0.0:8090"`). Flags and environment override it.
    #[arg(long, env = "SWITCHBOARD_ROUTER_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// host:port of the HTTP API (health, metrics, publish, kick,
    /// members). Default 127.0.0.1:8090.
    #[arg(long, env = "SWITCHBOARD_ROUTER_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,

    /// host:port of the gRPC listener: the backend API as gRPC
    /// (`switchboard.api.v1.Switchboard`, behind the same --api-key) and
    /// the standard health service. Unset: no gRPC.
    #[arg(long, env = "SWITCHBOARD_ROUTER_GRPC_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_listen: Option<String>,

    /// Settings shared with the edges.
    #[command(flatten)]
    #[serde(flatten)]
    pub cluster: ClusterSettings,

    /// Member buckets per channel (shard jobs per post). Never change it on
    /// existing data. Default 64.
    #[arg(long, env = "SWITCHBOARD_CHANNEL_BUCKETS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel_buckets: Option<u32>,

    /// Replicas of the JetStream streams of member work, SB_PUSH (push
    /// jobs) and SB_SHARD (shard jobs) (1-5; 3 on a NATS cluster, so losing
    /// one server loses no queued job). SB_PUSH takes it when created (an
    /// existing one keeps its own); SB_SHARD is updated to it at every
    /// startup. Default 1.
    #[arg(long, env = "SWITCHBOARD_PUSH_STREAM_REPLICAS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push_stream_replicas: Option<u8>,

    /// Milliseconds a router may hold a shard job without acknowledging it
    /// before JetStream delivers it to another router (a router killed
    /// mid-job delays that bucket's unread counters and push jobs by this
    /// much). Routers working longer say so every third of it. Set on the
    /// shared consumer at startup: give every router the same value.
    /// 1000-15000 (at most 5 deliveries must fit the 120 s
    /// de-duplication window of push jobs). Default 10000.
    #[arg(long, env = "SWITCHBOARD_SHARD_ACK_WAIT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard_ack_wait_ms: Option<u64>,
    /// The whole stop after SIGTERM/SIGINT, ms: finishing the publish
    /// requests and shard jobs in hand, then the last NATS flush. The
    /// router exits within it whatever NATS and Redis do (exit 75 when it
    /// gave up on something). Default 10000.
    #[arg(long, env = "SWITCHBOARD_SHUTDOWN_GRACE_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_grace_ms: Option<u64>,

    /// Most history appends sent to Redis in one round trip (1-4096).
    /// Concurrent publishes share a round trip; a lone one never waits.
    /// 1 turns batching off (one round trip per publish). Default 256.
    #[arg(long, env = "SWITCHBOARD_REDIS_APPEND_BATCH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_append_batch: Option<u16>,
}

/// The validated configuration of one router.
#[derive(Debug, Clone)]
pub struct Config {
    /// HTTP listener address (the binary binds it; tests pass their own).
    pub listen: SocketAddr,
    /// This node's name.
    pub node_id: String,
    /// Key of the backend API; `None` turns it off.
    pub api_key: Option<String>,
    /// Key of the admin API (ADR 0037); `None` turns it off.
    pub admin_key: Option<String>,
    /// The gRPC listener's address (ADR 0033); `None`: no gRPC. The
    /// process binds it when it starts.
    pub grpc_listen: Option<SocketAddr>,
    /// Largest publish payload, bytes.
    pub max_payload_bytes: usize,
    /// History window.
    pub history: HistoryLimits,
    /// Presence lease (the edges' value).
    pub presence_ttl: Duration,
    /// NATS URL(s).
    pub nats_url: String,
    /// Redis URL.
    pub redis_url: String,
    /// Member buckets per channel.
    pub channel_buckets: u32,
    /// Replicas of the push-job and shard-job streams.
    pub push_stream_replicas: u8,
    /// Ack wait of the shard-job consumer.
    pub shard_ack_wait: Duration,
    /// Most appends per Redis round trip.
    pub redis_append_batch: usize,
    /// From the shutdown signal to the exit, at most.
    pub shutdown_grace: Duration,
    /// Log filter.
    pub log: String,
    /// Log line format (`--log-format`).
    pub log_format: switchboard_node::LogFormat,
    /// Trace export (`--otlp-endpoint`, ADR 0038); `None`: off.
    pub traces: Option<switchboard_node::TraceSettings>,
    /// The event tap (`--event-tap*`); `None`: off.
    pub event_tap: Option<switchboard_router::TapSettings>,
}

impl Settings {
    /// Fills settings missing here from the TOML file named by `--config`.
    pub fn with_file(self) -> Result<Settings, ConfigError> {
        let path = self.config.clone();
        let mut out = read_over(self, path.as_deref())?;
        out.config = path;
        Ok(out)
    }

    /// Applies defaults and validates.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let listen_text = self.listen.unwrap_or_else(|| "127.0.0.1:8090".into());
        let listen = listen_text
            .parse()
            .map_err(|e| ConfigError::invalid("--listen", format!("{listen_text:?}: {e}")))?;
        let node = self.cluster.resolve(|| "router".into())?;
        let Some(backends) = node.backends else {
            return Err(ConfigError::invalid(
                "--nats/--redis",
                "a router needs both --nats and --redis",
            ));
        };
        let channel_buckets = positive(
            "--channel-buckets",
            self.channel_buckets.map(|b| b as usize),
            64,
        )? as u32;
        let push_stream_replicas = match self.push_stream_replicas.unwrap_or(1) {
            n @ 1..=5 => n,
            n => {
                return Err(ConfigError::invalid(
                    "--push-stream-replicas",
                    format!("{n} is not in 1..=5"),
                ));
            }
        };
        let max_ms = SHARD_ACK_WAIT_MAX.as_millis() as u64;
        let shard_ack_wait = match self.shard_ack_wait_ms.unwrap_or(10_000) {
            ms if (1000..=max_ms).contains(&ms) => Duration::from_millis(ms),
            ms => {
                return Err(ConfigError::invalid(
                    "--shard-ack-wait-ms",
                    format!("{ms} is not in 1000..={max_ms}"),
                ));
            }
        };
        let redis_append_batch = match self.redis_append_batch.unwrap_or(256) {
            n @ 1..=4096 => usize::from(n),
            n => {
                return Err(ConfigError::invalid(
                    "--redis-append-batch",
                    format!("{n} is not in 1..=4096"),
                ));
            }
        };
        Ok(Config {
            listen,
            node_id: node.node_id,
            api_key: node.api_key,
            admin_key: node.admin_key,
            grpc_listen: switchboard_node::config::listen_addr(
                "--grpc-listen",
                self.grpc_listen.as_deref(),
            )?,
            max_payload_bytes: node.max_payload_bytes,
            history: node.history,
            presence_ttl: node.presence_ttl,
            nats_url: backends.nats_url,
            redis_url: backends.redis_url,
            channel_buckets,
            push_stream_replicas,
            shard_ack_wait,
            redis_append_batch,
            shutdown_grace: millis("--shutdown-grace-ms", self.shutdown_grace_ms, 10_000)?,
            log: node.log,
            log_format: node.log_format,
            traces: node.traces,
            event_tap: node.event_tap,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> Settings {
        Settings {
            cluster: ClusterSettings {
                nats: Some("nats://127.0.0.1:4222".into()),
                redis: Some("redis://127.0.0.1:6379".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn flags_override_file_and_defaults_apply() {
        let mut cli = cluster();
        cli.listen = Some("127.0.0.1:9000".into());
        let merged = switchboard_node::config::over_toml(
            cli,
            "listen = \"0.0.0.0:1\"\nchannel_buckets = 16\nnode_id = \"r1\"",
        )
        .unwrap();
        let cfg = merged.resolve().unwrap();
        assert_eq!(cfg.listen.port(), 9000);
        assert_eq!(cfg.channel_buckets, 16);
        assert_eq!(cfg.node_id, "r1");
        assert_eq!(cfg.push_stream_replicas, 1);
        assert_eq!(cfg.shard_ack_wait, Duration::from_secs(10));
        assert_eq!(cfg.redis_append_batch, 256);
        assert_eq!(cfg.presence_ttl, Duration::from_secs(30));
        assert_eq!(cfg.shutdown_grace, Duration::from_secs(10));
        assert_eq!(cfg.event_tap, None);
    }

    #[test]
    fn bad_values_name_the_setting() {
        for (settings, flag) in [
            (
                Settings {
                    listen: Some("nope".into()),
                    ..cluster()
                },
                "--listen",
            ),
            (Settings::default(), "--nats/--redis"),
            (
                Settings {
                    push_stream_replicas: Some(6),
                    ..cluster()
                },
                "--push-stream-replicas",
            ),
            (
                Settings {
                    shard_ack_wait_ms: Some(999),
                    ..cluster()
                },
                "--shard-ack-wait-ms",
            ),
            (
                Settings {
                    shard_ack_wait_ms: Some(15_001),
                    ..cluster()
                },
                "--shard-ack-wait-ms",
            ),
            (
                Settings {
                    redis_append_batch: Some(0),
                    ..cluster()
                },
                "--redis-append-batch",
            ),
            (
                Settings {
                    shutdown_grace_ms: Some(0),
                    ..cluster()
                },
                "--shutdown-grace-ms",
            ),
            (
                Settings {
                    channel_buckets: Some(0),
                    ..cluster()
                },
                "--channel-buckets",
            ),
            (
                Settings::parse_from([
                    "switchboard-router",
                    "--nats",
                    "nats://h",
                    "--redis",
                    "redis://h",
                    "--event-tap",
                    "--event-tap-max-bytes",
                    "0",
                ]),
                "--event-tap-max-bytes",
            ),
        ] {
            let err = settings.resolve().unwrap_err();
            assert!(err.to_string().contains(flag), "{flag}: {err}");
        }
        assert!(
            switchboard_node::config::over_toml(Settings::default(), "no_such_setting = 1")
                .is_err()
        );
    }

    #[test]
    fn the_file_is_read_under_flags() {
        let dir = std::env::temp_dir().join(format!("sb-router-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("router.toml");
        std::fs::write(&file, "push_stream_replicas = 3\nnode_id = \"from-file\"\n").unwrap();
        let mut cli = cluster();
        cli.config = Some(file.clone());
        cli.cluster.node_id = Some("from-flag".into());
        let cfg = cli.with_file().unwrap().resolve().unwrap();
        assert_eq!(cfg.push_stream_replicas, 3);
        assert_eq!(cfg.node_id, "from-flag");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
