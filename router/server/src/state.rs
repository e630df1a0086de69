//! What the HTTP routes serve from, built by `app` and read by `routes`
//! (so neither imports the other's module).
use std::sync::Arc;

use futures_util::future::BoxFuture;
use metrics_exporter_prometheus::PrometheusHandle;
use switchboard_node::{
    Api, ApiError,
    admin::{Admin, ChatCount, ChatCounts, unavailable},
};
use switchboard_presence::MemberStore;
use switchboard_protocol::ChatId;
use switchboard_router::{Members, NatsBus};

use crate::Config;

/// What the HTTP routes serve from.
pub(crate) struct RouterState {
    pub(crate) members: Arc<Members>,
    /// The same member sets, for the membership API (ADR 0031).
    pub(crate) member_store: Arc<dyn MemberStore>,
    pub(crate) bus: Arc<NatsBus>,
    pub(crate) config: Config,
    pub(crate) prometheus: PrometheusHandle,
    /// The backend API, shared by its HTTP routes and its gRPC service.
    pub(crate) api: Arc<Api>,
    /// The admin API (ADR 0037).
    pub(crate) admin: Arc<Admin>,
}

/// A chat's member and online counts from its member buckets, for the
/// admin API: a router can count who is online (each bucket's members
/// against presence, a thousand at a time).
pub(crate) struct ChannelCounts(pub(crate) Arc<Members>);

impl ChatCounts for ChannelCounts {
    fn counts<'a>(&'a self, chat: &'a ChatId) -> BoxFuture<'a, Result<ChatCount, ApiError>> {
        Box::pin(async move {
            let members = self.0.count(chat).await.map_err(unavailable)?;
            let online = self.0.online_count(chat).await.map_err(unavailable)?;
            Ok(ChatCount {
                members,
                online: Some(online),
            })
        })
    }
}

impl RouterState {
    /// Why this router should get no new work (`/readyz` answers 503, gRPC
    /// health NOT_SERVING), or `None`.
    pub(crate) fn unready(&self) -> Option<&'static str> {
        let connected = matches!(
            self.bus.client().connection_state(),
            async_nats::connection::State::Connected
        );
        (!connected).then_some("bus (NATS) disconnected")
    }
}
