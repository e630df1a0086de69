//! One socket's life, by phase: the `/ws` checks (`upgrade`), the
//! upgrade, the Connect handshake under a deadline (`handshake`), then the
//! steady state in a task of its own: the reader (`reader`, handing
//! requests to the session of `requests`) and the writer (`writer`), which
//! live and die together; then the linger and the cleanup.
use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, upgrade::UpgradeFut};
use http_body_util::Empty;
use hyper::{Request, Response, body::Incoming};
use switchboard_protocol::{CloseReason, Encoding};
use tokio::{net::TcpStream, time::Instant};
use tracing::Instrument;

use crate::{
    admission::Permit,
    auth::Identity,
    drain,
    mailbox::{ConnHandle, Outbound},
    metrics,
    state::EdgeState,
    wire::BatchWriter,
};

mod handshake;
pub(crate) mod inbound;
mod reader;
mod requests;
pub(crate) mod socket;
mod upgrade;
mod writer;

use self::{
    handshake::{Accepted, handshake},
    inbound::Inbound,
    reader::ReaderExit,
    requests::Session,
    socket::{SocketRead, SocketWrite},
    writer::{Reset, Writer, WriterExit},
};
pub(crate) use upgrade::Refused;

/// The read side of a socket: one frame at a time, no idle buffer.
type Reader = Inbound<SocketRead>;
/// The write side: frames coalesced into one syscall per flush.
type Writing = BatchWriter<SocketWrite>;

/// Answers `GET /ws`: the request passes the checks of `upgrade`, and
/// once upgraded the socket is served in a task of its own.
pub(crate) fn upgrade(
    state: &Arc<EdgeState>,
    mut req: Request<Incoming>,
    accepted_at: Instant,
) -> Result<Response<Empty<Bytes>>, Refused> {
    let (response, fut, accepted) = upgrade::check(state, &mut req, accepted_at)?;
    state.tracker.spawn(serve(state.clone(), fut, accepted));
    Ok(response)
}

async fn serve(state: Arc<EdgeState>, fut: UpgradeFut, accepted: Accepted) {
    let conn_id = state.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let span = tracing::debug_span!("conn", id = conn_id, user = tracing::field::Empty, node = %state.config.node_id);
    async move {
        let ws = match tokio::time::timeout_at(accepted.deadline, fut).await {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
            Err(_) => {
                metrics::disconnect(CloseReason::ConnectTimeout.as_str());
                return;
            }
        };
        // Nothing was read yet, so fastwebsockets' buffer holds nothing.
        let (r, w) = socket::split(ws.into_inner());
        let mut rd = Inbound::new(r, state.config.max_frame_bytes, accepted.deflate);
        let mut wr = BatchWriter::new(w);
        // Boxed: runs once, and its state must not stay in every socket's task.
        let Some((identity, connect_id, connect)) =
            Box::pin(handshake(&state.context, &mut rd, &mut wr, &accepted)).await
        else {
            return;
        };
        let span = tracing::Span::current();
        span.record("user", identity.user.as_str());
        let opened = Opened {
            state: state.clone(),
            rd,
            wr,
            conn_id,
            identity,
            connect_id,
            connect,
            encoding: accepted.encoding,
            deflate: accepted.deflate,
            permit: accepted.permit,
            handshake: accepted.handshake,
        };
        // The steady state runs as a task of its own, so this one (the
        // upgrade, the handshake and their arguments) ends and frees its
        // memory instead of staying inside every socket's task. A span
        // that is off (debug logs off) would still take 40 bytes of it.
        let opened = Box::new(opened);
        if span.is_disabled() {
            state.tracker.spawn(run(opened));
        } else {
            state.tracker.spawn(run(opened).instrument(span));
        }
    }
    .instrument(span)
    .await
}

/// A socket whose Connect was accepted.
struct Opened {
    state: Arc<EdgeState>,
    rd: Reader,
    wr: Writing,
    conn_id: u64,
    identity: Identity,
    connect_id: u32,
    connect: Box<switchboard_protocol::v1::Connect>,
    encoding: Encoding,
    /// permessage-deflate was agreed.
    deflate: bool,
    permit: Permit,
    handshake: tokio::sync::OwnedSemaphorePermit,
}

/// The socket's steady state and cleanup. One boxed argument: an async
/// fn keeps its arguments for its whole life, beside the locals they are
/// moved into, and every byte here is paid by every idle socket.
async fn run(opened: Box<Opened>) {
    // Moved out in a block that frees the box: destructuring `*opened`
    // in place would keep its allocation until this task ends.
    let Opened {
        state,
        mut rd,
        wr,
        conn_id,
        identity,
        connect_id,
        connect,
        encoding,
        deflate,
        permit: _permit,
        handshake,
    } = {
        let boxed = opened;
        *boxed
    };
    let cfg = &state.config;
    let (conn, rx) = ConnHandle::new(
        conn_id,
        encoding,
        cfg.send_queue_max_frames,
        cfg.send_queue_max_bytes,
    );
    state.metrics.opened.increment(1);
    state.metrics.connections.increment(1.0);
    state.hub.add_conn(&conn);
    drain::close_if_draining(&state, &conn);
    let expires_at_ms = identity.expires_at_ms;
    let mut session = Session::new(state.context.clone(), conn.clone(), identity);
    // Outlives the steady state: the socket's write half goes back to the
    // read half once both are done.
    let mut writer;
    // The steady state, in its own scope so that what comes after it (the
    // linger, the cleanup) does not add to the size of every socket's task.
    let exit = {
        writer = Writer::new(
            wr,
            conn.clone(),
            rx,
            expires_at_ms,
            deflate.then_some(cfg.deflate_min_bytes),
            state.context.clone(),
        );
        let writer = writer.run();
        tokio::pin!(writer);

        let exit = tokio::select! {
            w = &mut writer => Some(w),
            // Boxed: runs once per socket, like the handshake.
            // The handshake permit ends with the handshake, inside the
            // boxed future, so idle sockets do not carry it.
            ready = Box::pin(async {
                let ready = session.start(connect_id, *connect).await;
                drop(handshake);
                ready
            }) => {
                if let Err(reason) = ready {
                    conn.close(reason);
                }
                None
            }
        };
        match exit {
            Some(w) => w,
            None => {
                let reader = reader::read_loop(&mut session, &mut rd, conn.last_seen());
                tokio::pin!(reader);
                tokio::select! {
                    w = &mut writer => w,
                    r = &mut reader => {
                        let closing = match r {
                            ReaderExit::Close(reason) => {
                                conn.close(reason);
                                Some(reason)
                            }
                            ReaderExit::PeerGone => {
                                conn.send(Outbound::Stop);
                                None
                            }
                        };
                        // Boxed: a timer is 100 bytes, and this runs once.
                        // The writer bounds its last writes itself; this
                        // is the backstop.
                        Box::pin(tokio::time::timeout(Duration::from_secs(3), &mut writer))
                            .await
                            .unwrap_or(WriterExit::Stalled(closing, Reset::CloseUnwritten))
                    }
                }
            }
        }
    };
    let (reason, reset) = match exit {
        WriterExit::Closed(reason) => (Some(reason), None),
        WriterExit::Gone => (None, None),
        WriterExit::Stalled(reason, reset) => (reason, Some(reset)),
    };
    if matches!(exit, WriterExit::Closed(_)) {
        Box::pin(linger(&mut rd)).await;
    }
    // The socket goes before the cleanup, which may wait on backends.
    release(
        rd,
        writer.into_out(),
        reset,
        state.config.heartbeat_interval,
    );
    let reason = reason.map_or("client_closed", CloseReason::as_str);
    metrics::disconnect(reason);
    tracing::debug!(reason, reset = reset.map(Reset::as_str), "socket closed");
    Box::pin(session.cleanup()).await;
    state.hub.remove_conn(conn_id);
    state.metrics.connections.decrement(1.0);
}

/// Drops the socket. A stalled one is reset (SO_LINGER 0): the kernel
/// frees its buffers at once, where an orderly close would leave an orphan
/// holding the unsent bytes and probing a zero window for minutes. Any
/// other is closed in order (its Disconnect may still be on its way to a
/// slow reader) with TCP_USER_TIMEOUT at the stall limit, so the kernel
/// gives up on its unsent bytes once none is taken for that long.
fn release(rd: Reader, wr: Option<Writing>, reset: Option<Reset>, stall_limit: Duration) {
    if let Some(reset) = reset {
        metrics::socket_reset(reset.as_str());
    }
    // The writer keeps its write side to the end; without it the socket
    // is simply dropped.
    let Some(wr) = wr else { return };
    let set = socket::before_close(rd.into_inner(), wr.into_inner(), |tcp| {
        before_close(tcp, reset, stall_limit)
    });
    if let Err(e) = set {
        tracing::debug!(error = %e, "socket options not set before close");
    }
}

fn before_close(
    tcp: &TcpStream,
    reset: Option<Reset>,
    stall_limit: Duration,
) -> std::io::Result<()> {
    if reset.is_some() {
        return tcp.set_zero_linger();
    }
    #[cfg(target_os = "linux")]
    socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(stall_limit))?;
    #[cfg(not(target_os = "linux"))]
    let _ = stall_limit;
    Ok(())
}

/// How long a socket we closed keeps reading for the peer's close frame.
const LINGER: Duration = Duration::from_secs(1);

/// After our close frame, reads and discards until the peer's close or
/// EOF. Dropping a socket that still has unread input makes the kernel send
/// a RST, and a RST makes the peer's kernel discard what it has not read
/// yet: our Disconnect and close frame, i.e. the reason for the close.
async fn linger(rd: &mut Reader) {
    let mut discard = |_: Frame<'static>| std::future::ready(Ok::<(), &'static str>(()));
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok((frame, _)) = rd.read_frame(&mut discard).await {
            if frame.opcode == OpCode::Close {
                break;
            }
        }
    })
    .await;
}
