//! What the HTTP routes serve from, built by `app` and read by `routes`
//! (so neither imports the other's module).
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use switchboard_presence::{MemberStore, PresenceStore};
use switchboard_router::{Members, NatsBus, Router};

use crate::Config;

/// What the HTTP routes serve from.
pub(crate) struct RouterState {
    pub(crate) router: Arc<Router>,
    pub(crate) members: Arc<Members>,
    /// The same member sets, for the membership API (ADR 0031).
    pub(crate) member_store: Arc<dyn MemberStore>,
    pub(crate) bus: Arc<NatsBus>,
    pub(crate) presence: Arc<dyn PresenceStore>,
    pub(crate) config: Config,
    pub(crate) prometheus: PrometheusHandle,
}
