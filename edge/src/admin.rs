//! This edge as the admin API sees it (ADR 0037): its status (sockets,
//! drain, the delivery counters of its `/metrics`) and the drain an
//! operator asks for, answered for the admin API of this process and,
//! in a cluster, for any node's over NATS (`sb.edge.<edge>.admin`).
use std::sync::{Weak, atomic::Ordering};

use switchboard_node::admin::{EdgeStatus, LocalEdge};

use crate::state::EdgeState;

/// The edge behind the admin API; weak, as the state owns the API.
pub(crate) struct AdminEdge {
    pub(crate) node: String,
    pub(crate) state: Weak<EdgeState>,
    /// The sockets' runtime, where an asked-for drain runs.
    pub(crate) runtime: tokio::runtime::Handle,
}

impl AdminEdge {
    fn status_of(&self, state: Option<&EdgeState>) -> EdgeStatus {
        let mut status = EdgeStatus {
            node: self.node.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            sockets: 0,
            draining: true,
            deliveries_total: 0,
            sent_frames_total: 0,
        };
        // Gone: the edge is stopping.
        let Some(state) = state else { return status };
        status.sockets = state.hub.conn_count() as u64;
        status.draining = state.draining.load(Ordering::Acquire);
        let text = state.prometheus.render();
        status.deliveries_total = counter(&text, "switchboard_edge_deliveries_total");
        status.sent_frames_total = counter(&text, "switchboard_edge_sent_frames_total");
        status
    }
}

impl LocalEdge for AdminEdge {
    fn node(&self) -> &str {
        &self.node
    }

    fn status(&self) -> EdgeStatus {
        self.status_of(self.state.upgrade().as_deref())
    }

    fn drain(&self) -> EdgeStatus {
        let state = self.state.upgrade();
        if let Some(state) = &state {
            crate::drain::begin(state.clone(), &self.runtime);
        }
        self.status_of(state.as_deref())
    }
}

/// The value of an unlabelled series in Prometheus text (0 if absent).
fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name))
        .filter_map(|rest| rest.strip_prefix(' '))
        .find_map(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_from_prometheus_text() {
        let text = "# TYPE switchboard_edge_deliveries_total counter\nswitchboard_edge_deliveries_total 42\nswitchboard_edge_deliveries_total_x 7\n";
        assert_eq!(counter(text, "switchboard_edge_deliveries_total"), 42);
        assert_eq!(counter(text, "switchboard_edge_sent_frames_total"), 0);
    }
}
