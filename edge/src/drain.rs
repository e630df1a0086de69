//! The drain on shutdown: readiness fails and accepts stop, sockets are
//! closed in batches with jittered reconnect advice (spread over
//! `--reconnect-jitter-max-ms`, see `CloseReason::reconnect_delay_range_ms`),
//! and their tasks are awaited until the stop's work deadline. A handshake
//! that finishes during the drain gets the same advice at once. The same
//! batches run without a stop when an operator drains the edge ([`begin`]).
use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use switchboard_node::Stop;
use switchboard_protocol::CloseReason;
use tokio_util::sync::CancellationToken;

use crate::{mailbox::ConnHandle, state::EdgeState};

/// The longest pause between two batches.
const MAX_BATCH_PAUSE: Duration = Duration::from_millis(500);

/// A handshake that finishes while the edge drains missed the drain's
/// list of sockets: it gets the same advice at once, or the edge would
/// wait out its whole grace for it.
pub(crate) fn close_if_draining(state: &EdgeState, conn: &ConnHandle) {
    if state.draining.load(Ordering::SeqCst) {
        conn.close(CloseReason::Shutdown);
    }
}

/// How many batches `sockets` make and the pause between two of them:
/// the batches are spread over the first half of the grace period.
fn batches(sockets: usize, batch: usize, grace: Duration) -> (usize, Duration) {
    let batches = sockets.div_ceil(batch).max(1);
    let pause = (grace / 2 / batches as u32).min(MAX_BATCH_PAUSE);
    (batches, pause)
}

/// Closes every open socket with reconnect advice, in batches spread over
/// the first half of `grace`. The caller has set `draining`, so sockets
/// that finish their handshake meanwhile get the same advice at once.
async fn close_in_batches(state: &EdgeState, grace: Duration) {
    let conns = state.hub.conns();
    let batch = state.config.drain_batch_size;
    let (batches, pause) = batches(conns.len(), batch, grace);
    tracing::info!(sockets = conns.len(), batches, "draining");
    for (i, chunk) in conns.chunks(batch).enumerate() {
        for conn in chunk {
            conn.close(CloseReason::Shutdown);
        }
        if i + 1 < batches {
            tokio::time::sleep(pause).await;
        }
    }
}

/// The drain an operator asks for (`switchboard-ctl drain`, ADR 0037):
/// readiness fails, new sockets are refused with 503, and the open ones
/// are closed in batches as on SIGTERM, but the process keeps running:
/// its listener still answers probes, metrics and the APIs, and its
/// presence lease stays. Returns false if a drain had already begun.
pub(crate) fn begin(state: Arc<EdgeState>, runtime: &tokio::runtime::Handle) -> bool {
    if state.draining.swap(true, Ordering::SeqCst) {
        return false;
    }
    tracing::info!("drain requested through the admin API");
    runtime.spawn(async move {
        let grace = state.config.shutdown_grace;
        close_in_batches(&state, grace).await;
    });
    true
}

/// Stops accepting, closes every socket in batches and waits for their
/// tasks (each unregisters its presence session) until the stop's work
/// deadline; what is left then is given up on, by name.
pub(crate) async fn drain(state: &EdgeState, stop_accepting: CancellationToken, stop: &Stop) {
    let started = tokio::time::Instant::now();
    let grace = stop.grace();
    let unregisters_failed = state.sessions.unregisters_failed();
    state.draining.store(true, Ordering::SeqCst);
    stop_accepting.cancel();
    close_in_batches(state, grace).await;
    state.tracker.close();
    if tokio::time::timeout_at(stop.work_deadline(), state.tracker.wait())
        .await
        .is_err()
    {
        // Their clients lose the socket without advice and reconnect with
        // backoff; their presence sessions expire with this node's lease.
        let unregistering = state.sessions.unregistering();
        if unregistering > 0 {
            stop.gave_up(
                "presence unregister",
                &format_args!("{unregistering} sockets still waiting for the presence store"),
            );
        }
        let open = state.hub.conn_count().saturating_sub(unregistering);
        if open > 0 || unregistering == 0 {
            let tasks = state.tracker.len();
            stop.gave_up(
                "sockets",
                &format_args!("{open} still open ({tasks} connection tasks)"),
            );
        }
    }
    let failed = state.sessions.unregisters_failed() - unregisters_failed;
    if failed > 0 {
        stop.gave_up(
            "presence unregister",
            &format_args!("{failed} sessions refused by the presence store; they expire with this node's lease"),
        );
    }
    tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "drained");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_fill_half_the_grace_with_short_pauses() {
        let grace = Duration::from_secs(20);
        // No socket: one (empty) batch, so the pause is still defined.
        assert_eq!(batches(0, 100, grace), (1, MAX_BATCH_PAUSE));
        // Few batches: the pause is capped.
        assert_eq!(batches(250, 100, grace), (3, MAX_BATCH_PAUSE));
        // Many batches: spread over the first half of the grace.
        let (n, pause) = batches(100_000, 100, grace);
        assert_eq!(n, 1000);
        assert_eq!(pause, Duration::from_millis(10));
        assert!(pause * n as u32 <= grace / 2);
    }
}
