//! The event tap's settings (`--event-tap*`, declared in
//! [`ClusterSettings`]: the same on edges and routers), validated. Routers
//! append every sequenced message, edges their sockets' connects and
//! closes, both the presence transitions they see (ADR 0032).
use std::time::Duration;

use switchboard_router::{EVENT_STREAM, TapSettings};

use crate::{ClusterSettings, ConfigError, config::positive};

fn invalid(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::invalid(setting, message)
}

/// The validated `--event-tap*` settings of [`ClusterSettings`]; `None`
/// when the tap is off. Values are checked either way, so a bad one is
/// found before the tap is turned on.
pub(crate) fn resolve(s: &ClusterSettings) -> Result<Option<TapSettings>, ConfigError> {
    let defaults = TapSettings::default();
    let stream = s
        .event_tap_stream
        .clone()
        .unwrap_or_else(|| EVENT_STREAM.into());
    if stream.is_empty()
        || stream.len() > 64
        || !stream
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid(
            "--event-tap-stream",
            format!("{stream:?}: use 1-64 letters, digits, '-' or '_'"),
        ));
    }
    let max_age = match s.event_tap_max_age_secs {
        None => defaults.max_age,
        Some(0) => {
            return Err(invalid(
                "--event-tap-max-age-secs",
                "must be greater than 0",
            ));
        }
        Some(s) => Duration::from_secs(s),
    };
    let max_bytes = match s.event_tap_max_bytes {
        None => defaults.max_bytes,
        Some(0) => {
            return Err(invalid(
                "--event-tap-max-bytes",
                "must be greater than 0 (the stream must hold something)",
            ));
        }
        Some(b) => i64::try_from(b)
            .map_err(|_| invalid("--event-tap-max-bytes", format!("{b} is too large")))?,
    };
    let replicas = match s.event_tap_replicas.unwrap_or(1) {
        n @ 1..=5 => usize::from(n),
        n => {
            return Err(invalid(
                "--event-tap-replicas",
                format!("{n} is not in 1..=5"),
            ));
        }
    };
    let queue_max_events = positive(
        "--event-tap-queue-max-events",
        s.event_tap_queue_max_events,
        defaults.queue_max_events,
    )?;
    let queue_max_bytes = positive(
        "--event-tap-queue-max-bytes",
        s.event_tap_queue_max_bytes,
        defaults.queue_max_bytes,
    )?;
    Ok(s.event_tap.unwrap_or(false).then_some(TapSettings {
        stream,
        max_age,
        max_bytes,
        replicas,
        queue_max_events,
        queue_max_bytes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on() -> ClusterSettings {
        ClusterSettings {
            event_tap: Some(true),
            ..Default::default()
        }
    }

    #[test]
    fn off_by_default_and_defaults_when_on() {
        assert_eq!(resolve(&ClusterSettings::default()).unwrap(), None);
        assert_eq!(resolve(&on()).unwrap(), Some(TapSettings::default()));
    }

    #[test]
    fn bad_values_name_their_flag_even_when_off() {
        for (flags, flag) in [
            (
                ClusterSettings {
                    event_tap_max_bytes: Some(0),
                    ..on()
                },
                "--event-tap-max-bytes",
            ),
            (
                ClusterSettings {
                    event_tap_max_bytes: Some(0),
                    ..Default::default()
                },
                "--event-tap-max-bytes",
            ),
            (
                ClusterSettings {
                    event_tap_max_age_secs: Some(0),
                    ..on()
                },
                "--event-tap-max-age-secs",
            ),
            (
                ClusterSettings {
                    event_tap_replicas: Some(0),
                    ..on()
                },
                "--event-tap-replicas",
            ),
            (
                ClusterSettings {
                    event_tap_replicas: Some(6),
                    ..on()
                },
                "--event-tap-replicas",
            ),
            (
                ClusterSettings {
                    event_tap_stream: Some("SB.EVENTS".into()),
                    ..on()
                },
                "--event-tap-stream",
            ),
            (
                ClusterSettings {
                    event_tap_stream: Some(String::new()),
                    ..on()
                },
                "--event-tap-stream",
            ),
            (
                ClusterSettings {
                    event_tap_queue_max_events: Some(0),
                    ..on()
                },
                "--event-tap-queue-max-events",
            ),
            (
                ClusterSettings {
                    event_tap_queue_max_bytes: Some(0),
                    ..on()
                },
                "--event-tap-queue-max-bytes",
            ),
        ] {
            let err = resolve(&flags).unwrap_err().to_string();
            assert!(err.contains(flag), "{flag}: {err}");
        }
    }
}
