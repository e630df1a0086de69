//! Presence events on the bus (and in the event tap, when it is on), and
//! the sweep every node runs: both edges and routers expire the sessions
//! of crashed nodes and announce the users that went offline.
use std::{sync::Arc, time::Duration};

use switchboard_presence::PresenceStore;
use switchboard_protocol::{
    SharedFrame, UserId, now_ms,
    subject::presence_subject,
    v1::{PresenceEvent, ServerFrame, server_frame},
};
use switchboard_router::{Bus, EventTap};
use tokio_util::sync::CancellationToken;

/// Publishes a presence event, and queues it for the event tap.
pub async fn announce(
    bus: &dyn Bus,
    tap: Option<&EventTap>,
    user: &UserId,
    online: bool,
    at_ms: i64,
    devices: u32,
) {
    if let Some(tap) = tap {
        tap.presence(user, online, at_ms, devices);
    }
    let frame = SharedFrame::new(ServerFrame {
        id: 0,
        kind: Some(server_frame::Kind::Presence(PresenceEvent {
            user: user.to_string(),
            online,
            last_seen_ms: at_ms,
            devices,
        })),
    });
    if let Err(e) = bus.publish(&presence_subject(user), frame).await {
        tracing::debug!(error = %e, "presence event not published");
    }
}

/// Expires sessions of crashed nodes every `every` and announces the users
/// that went offline. Every node runs one; the store reports each
/// transition to exactly one of them.
pub async fn sweep_presence(
    presence: Arc<dyn PresenceStore>,
    bus: Arc<dyn Bus>,
    tap: Option<Arc<EventTap>>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match presence.expire(now_ms()).await {
            Ok(gone) => {
                for (user, at) in gone {
                    metrics::counter!("switchboard_presence_expired_total").increment(1);
                    announce(bus.as_ref(), tap.as_deref(), &user, false, at, 0).await;
                }
            }
            Err(e) => tracing::debug!(error = %e, "presence sweep failed"),
        }
    }
}
