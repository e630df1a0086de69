//! The per-hop latency breakdown of a message's path, one histogram
//! family (`switchboard_hop_seconds{hop}`) recorded on the process where
//! each hop happens, so a slower delivery shows which hop grew.
//!
//! Each hop is recorded once per message (or per fan-out), never per
//! socket: a series touched per delivery costs a contended atomic each.
use metrics::{Histogram, histogram};

/// The family's name; its buckets are set in `switchboard_node::telemetry`.
pub const HOP_SECONDS: &str = "switchboard_hop_seconds";

/// One hop of a message's path, in path order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// On the publisher's edge (or the node serving `POST /api/publish`):
    /// publish request received → acked, i.e. sequenced and stored. In a
    /// cluster this includes the NATS round trip to a router.
    Ack,
    /// Where the router runs (the edge standalone, a router in a cluster):
    /// the message's timestamp is taken → sequenced and stored in history.
    Sequence,
    /// On each receiving edge: the message's timestamp → the frame reaches
    /// this edge's hub from the bus. Wall clocks of two hosts in a cluster,
    /// at millisecond resolution; it includes `sequence`.
    Bus,
    /// On each receiving edge: reached the hub → taken from its stream's
    /// lane by the fan-out.
    Queue,
    /// On each receiving edge: taken by the fan-out → pushed to every local
    /// socket's mailbox (once per fan-out, whatever its sockets).
    Fanout,
}

impl Hop {
    /// Every hop, in path order.
    pub const ALL: [Hop; 5] = [Hop::Ack, Hop::Sequence, Hop::Bus, Hop::Queue, Hop::Fanout];

    /// The `hop` label's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Hop::Ack => "ack",
            Hop::Sequence => "sequence",
            Hop::Bus => "bus",
            Hop::Queue => "queue",
            Hop::Fanout => "fanout",
        }
    }

    /// This hop's histogram: register it once and keep the handle (a
    /// handle taken before the recorder is installed records nothing).
    pub fn histogram(self) -> Histogram {
        histogram!(HOP_SECONDS, "hop" => self.as_str())
    }
}
