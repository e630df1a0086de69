//! This edge's side of presence: the node lease (taken afresh at start,
//! renewed by heartbeats, restored when the store lost it), the presence
//! session of each local socket (registered on connect, unregistered on
//! close, each online/offline transition announced), and the per-user
//! ordering that keeps a transition and its announcement together.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use dashmap::DashMap;
use switchboard_presence::{PresenceError, PresenceStore, Session, Transition};
use switchboard_protocol::{
    SharedFrame, UserId, now_ms,
    subject::presence_subject,
    v1::{PresenceEvent, ServerFrame, server_frame},
};
use switchboard_router::{Bus, BusHandler, EventTap, Publisher, retry::Backoff};
use tokio::sync::{Mutex, MutexGuard};
use tokio_util::sync::CancellationToken;

use crate::{config::Config, hub::Hub};

/// Stripes of `Sessions::order`: the lock is held across a Redis round
/// trip, so users sharing a stripe wait on each other; 4,096 keeps that
/// rare at thousands of connects per second (48 bytes each).
const STRIPES: usize = 4096;

/// Sessions whose registration one read checks (ADR 0044).
const CHECK_BATCH: usize = 256;

/// How long a presence write that must not be lost is tried again while
/// the store fails (a Redis master failing over takes a few seconds):
/// dropping what a previous run left, and a closed socket's unregister.
/// Without it, a failed one leaves a session behind that this node's
/// lease keeps alive: the user stays online for as long as the node runs.
const WRITE_RETRY: Backoff = Backoff {
    first: std::time::Duration::from_millis(100),
    max: std::time::Duration::from_secs(1),
    limit: std::time::Duration::from_secs(10),
};

/// Runs `op` until it succeeds or [`WRITE_RETRY`] passes, with backoff.
async fn retried<T, F, Fut>(what: &str, op: F) -> Result<T, PresenceError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, PresenceError>>,
{
    WRITE_RETRY
        .retry(op, |e| {
            metrics::counter!("switchboard_edge_presence_errors_total").increment(1);
            tracing::debug!(error = %e, what, "presence write failed; trying again");
        })
        .await
}

/// This node's presence lease and the presence sessions of its sockets.
pub(crate) struct Sessions {
    store: Arc<dyn PresenceStore>,
    bus: Arc<dyn Bus>,
    /// Announces a socket's transitions (as the router broadcasts).
    router: Arc<dyn Publisher>,
    hub: Arc<Hub>,
    /// Gets each socket's connect and close and each transition (cluster,
    /// `--event-tap`).
    tap: Option<Arc<EventTap>>,
    node: String,
    /// Where routers reach this node, renewed with the lease.
    addr: String,
    ttl: Duration,
    /// The users of this node's sockets, by connection id: their presence
    /// sessions (heartbeated together, registered again when the lease
    /// was lost) follow from these (`session_of`), so the strings of a
    /// session are not kept for every idle socket.
    live: DashMap<u64, UserId>,
    /// Serializes each user's presence transition with its announcement,
    /// so a socket's offline cannot overtake the online of the socket that
    /// replaced it (watchers would be left with the wrong state).
    order: Box<[Mutex<()>]>,
    /// The last lease renewal succeeded (readiness).
    renewed: AtomicBool,
    /// Unregisters waiting for the store now, and failed so far: what a
    /// drain that runs out of time (or finds the store down) names.
    unregistering: AtomicUsize,
    unregisters_failed: AtomicU64,
}

impl Sessions {
    pub(crate) fn new(
        config: &Config,
        store: Arc<dyn PresenceStore>,
        bus: Arc<dyn Bus>,
        router: Arc<dyn Publisher>,
        hub: Arc<Hub>,
        tap: Option<Arc<EventTap>>,
    ) -> Self {
        Sessions {
            store,
            bus,
            router,
            hub,
            tap,
            node: config.node_id.clone(),
            addr: config.listen.to_string(),
            ttl: config.presence_ttl,
            live: DashMap::new(),
            order: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            renewed: AtomicBool::new(true),
            unregistering: AtomicUsize::new(0),
            unregisters_failed: AtomicU64::new(0),
        }
    }

    /// Unregisters waiting for the store now.
    pub(crate) fn unregistering(&self) -> usize {
        self.unregistering.load(Ordering::Relaxed)
    }

    /// Unregisters the store refused so far.
    pub(crate) fn unregisters_failed(&self) -> u64 {
        self.unregisters_failed.load(Ordering::Relaxed)
    }

    /// Whether the last lease renewal succeeded (readiness).
    pub(crate) fn renewed(&self) -> bool {
        self.renewed.load(Ordering::Acquire)
    }

    /// A socket's presence session on this node.
    pub(crate) fn session_of(&self, user: &UserId, conn_id: u64) -> Session {
        Session {
            user: user.clone(),
            session_id: format!("{}-{conn_id}", self.node),
            node: self.node.clone(),
        }
    }

    /// Starts this node's presence lease afresh: sessions a previous run
    /// under the same node id left behind go offline (announced), then the
    /// lease exists before the first socket registers.
    pub(crate) async fn lease(&self) {
        let dropped = retried("drop previous sessions", || {
            self.store.drop_node(&self.node, now_ms())
        })
        .await;
        match dropped {
            Ok(gone) => {
                for (user, at) in gone {
                    let tap = self.tap.as_deref();
                    switchboard_node::announce(self.bus.as_ref(), tap, &user, false, at, 0).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "presence: previous sessions not dropped"),
        }
        let taken = self
            .store
            .node_heartbeat(&self.node, &self.addr, now_ms())
            .await;
        // Known before the first socket and the first scrape.
        self.note_renewal(taken.is_ok());
        if let Err(e) = taken {
            tracing::warn!(error = %e, "presence lease not taken");
        }
    }

    /// Readiness and `switchboard_edge_presence_available` follow the last
    /// attempt to take or renew the lease.
    fn note_renewal(&self, ok: bool) {
        self.renewed.store(ok, Ordering::Release);
        metrics::gauge!("switchboard_edge_presence_available").set(if ok { 1.0 } else { 0.0 });
    }

    /// Renews this node's presence lease (its sessions live as long as it).
    /// When the store had no live lease for us (Redis restarted empty, or a
    /// stall outlived the lease and another node swept our sessions), every
    /// local session is registered again and every stream is re-read from
    /// history: routers could not find this edge meanwhile.
    pub(crate) async fn heartbeats(self: Arc<Self>, stop: CancellationToken) {
        // One command per node per tick, so renewing often is cheap: a node
        // stalled (or starved of CPU) for up to 5 renewals keeps its lease.
        let mut tick = tokio::time::interval(self.ttl / 6);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let renewed = self
                .store
                .node_heartbeat(&self.node, &self.addr, now_ms())
                .await;
            self.note_renewal(renewed.is_ok());
            let fresh = match renewed {
                Ok(fresh) => fresh,
                Err(e) => {
                    metrics::counter!("switchboard_edge_presence_errors_total").increment(1);
                    tracing::warn!(error = %e, "presence lease not renewed");
                    continue;
                }
            };
            let sessions: Vec<Session> = self
                .live
                .iter()
                .map(|e| self.session_of(e.value(), *e.key()))
                .collect();
            if !fresh || sessions.is_empty() {
                continue;
            }
            tracing::warn!(
                sessions = sessions.len(),
                "presence lost this node's sessions; restoring them"
            );
            metrics::counter!("switchboard_edge_presence_restores_total").increment(1);
            match self.store.restore(&sessions, now_ms()).await {
                Ok(back) => {
                    for user in back {
                        let tap = self.tap.as_deref();
                        switchboard_node::announce(
                            self.bus.as_ref(),
                            tap,
                            &user,
                            true,
                            now_ms(),
                            1,
                        )
                        .await;
                    }
                    // Routers could not find us meanwhile: re-read every stream.
                    self.hub.on_possible_loss();
                }
                Err(e) => {
                    metrics::counter!("switchboard_edge_presence_errors_total").increment(1);
                    tracing::warn!(error = %e, "presence restore failed");
                }
            }
        }
    }

    /// Checks once per `interval` that the store still holds every local
    /// session, a batch of `CHECK_BATCH` per read spread over most of the
    /// interval (ADR 0044): a registration a Redis master acknowledged and
    /// died with before its replica had it is gone after the failover,
    /// routers find no edge for the user, and the lease (one key, in
    /// another slot) says nothing. A missing session is registered again
    /// (announced online if that brings the user back), then every stream
    /// is checked against history for what the routers could not send.
    pub(crate) async fn check_sessions(
        self: Arc<Self>,
        interval: Duration,
        stop: CancellationToken,
    ) {
        let start = tokio::time::Instant::now() + interval;
        let mut round = tokio::time::interval_at(start, interval);
        round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = round.tick() => {}
            }
            let live: Vec<(u64, UserId)> = self
                .live
                .iter()
                .map(|e| (*e.key(), e.value().clone()))
                .collect();
            let batches = live.len().div_ceil(CHECK_BATCH).max(1) as u32;
            let pace = interval * 3 / 4 / batches;
            let mut restored = 0;
            for (i, batch) in live.chunks(CHECK_BATCH).enumerate() {
                if i > 0 {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(pace) => {}
                    }
                }
                let sessions: Vec<Session> = batch
                    .iter()
                    .map(|(id, user)| self.session_of(user, *id))
                    .collect();
                let held = match self.store.registered(&sessions).await {
                    Ok(held) => held,
                    Err(e) => {
                        metrics::counter!("switchboard_edge_presence_errors_total").increment(1);
                        tracing::debug!(error = %e, "presence check failed");
                        continue;
                    }
                };
                for ((id, _), s) in batch
                    .iter()
                    .zip(&sessions)
                    .zip(held)
                    .filter(|x| !x.1)
                    .map(|x| x.0)
                {
                    if self.register_again(*id, s).await {
                        restored += 1;
                    }
                }
            }
            if restored > 0 {
                tracing::warn!(
                    sessions = restored,
                    "presence lost sessions of this node; registered them again"
                );
                metrics::counter!("switchboard_edge_presence_reregistered_total")
                    .increment(restored);
                self.hub.on_possible_loss();
            }
        }
    }

    /// Registers a session the store lost, unless its socket closed
    /// meanwhile (its unregister, under the same lock, has the last word)
    /// or it is there now (a register that was still on its way).
    async fn register_again(&self, conn_id: u64, s: &Session) -> bool {
        let _order = self.ordered(&s.user).await;
        if !self.live.contains_key(&conn_id) {
            return false;
        }
        if let Ok(held) = self.store.registered(std::slice::from_ref(s)).await
            && held.first() == Some(&true)
        {
            return false;
        }
        match self.store.register(s, now_ms()).await {
            Ok(transition) => {
                if transition == Transition::BecameOnline {
                    self.announce(&s.user, true, now_ms(), 1).await;
                }
                true
            }
            Err(e) => {
                metrics::counter!("switchboard_edge_presence_errors_total").increment(1);
                tracing::debug!(error = %e, "presence register again failed");
                false
            }
        }
    }

    /// Held across one user's presence transition and its announcement.
    async fn ordered(&self, user: &UserId) -> MutexGuard<'_, ()> {
        self.order[crate::hub::stripe(user.as_str(), STRIPES)]
            .lock()
            .await
    }

    /// Registers a socket's session (kept for lease restores even if the
    /// store fails) and announces the user online if it was not.
    pub(crate) async fn register(
        &self,
        conn_id: u64,
        session: &Session,
    ) -> Result<(), PresenceError> {
        self.live.insert(conn_id, session.user.clone());
        let _order = self.ordered(&session.user).await;
        // Under the user's order, so the tap has the connect before the
        // online it causes (and every register has its unregister).
        if let Some(tap) = &self.tap {
            tap.connection(&session.user, &session.session_id, true);
        }
        let transition = self
            .store
            .register(session, now_ms())
            .await
            .inspect_err(|_| {
                metrics::counter!("switchboard_edge_presence_errors_total").increment(1);
            })?;
        if transition == Transition::BecameOnline {
            self.announce(&session.user, true, now_ms(), 1).await;
        }
        Ok(())
    }

    /// Gone from what a lease restore registers again.
    pub(crate) fn forget(&self, conn_id: u64) {
        self.live.remove(&conn_id);
    }

    /// Unregisters a socket's session and announces the user offline if
    /// this was its last one.
    pub(crate) async fn unregister(&self, session: &Session) {
        let _order;
        let unregistered = {
            // Counted down however this ends (a drain past its deadline
            // drops it); the lock waits on other users' round trips.
            let _waiting = Waiting::new(&self.unregistering);
            _order = self.ordered(&session.user).await;
            if let Some(tap) = &self.tap {
                tap.connection(&session.user, &session.session_id, false);
            }
            // Only this session of this node is removed, so trying again
            // is safe (session ids are never reused by one run).
            retried("unregister", || self.store.unregister(session, now_ms())).await
        };
        match unregistered {
            Ok(Transition::BecameOffline { last_seen_ms }) => {
                self.announce(&session.user, false, last_seen_ms, 0).await
            }
            Ok(_) => {}
            Err(e) => {
                self.unregisters_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "presence unregister failed")
            }
        }
    }

    async fn announce(&self, user: &UserId, online: bool, at_ms: i64, devices: u32) {
        if let Some(tap) = &self.tap {
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
        self.router.broadcast(&presence_subject(user), frame).await;
    }
}

/// Counts one unregister up while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
