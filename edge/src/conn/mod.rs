//! One socket's life: Connect handshake under a deadline, then the reader
//! loop and the writer, which live and die together, then cleanup.
use std::{
    sync::{Arc, atomic::AtomicI64, atomic::Ordering},
    time::Duration,
};

use fastwebsockets::{Frame, OpCode, WebSocketError, upgrade::UpgradeFut};
use switchboard_protocol::{
    CloseReason, Encoding, now_ms,
    v1::{ClientFrame, Error as ErrorFrame, ErrorCode, ServerFrame, client_frame, server_frame},
};
use tokio::{
    io::{ReadHalf, WriteHalf},
    time::Instant,
};
use tracing::Instrument;

mod batch_writer;
pub(crate) mod inbound;
mod requests;
mod writer;

use crate::{
    admission::Permit,
    auth::{AuthError, Identity},
    conn::{
        batch_writer::BatchWriter,
        inbound::Inbound,
        requests::Session,
        writer::{Writer, WriterExit, WriterSettings},
    },
    drain,
    mailbox::{ConnHandle, Outbound},
    metrics,
    state::EdgeState,
};

/// Everything known about a socket before its Connect frame.
pub(crate) struct Accepted {
    pub(crate) encoding: Encoding,
    /// Identity from an `Authorization: Bearer` header, if one was sent.
    pub(crate) header_identity: Option<Identity>,
    pub(crate) deadline: Instant,
    pub(crate) permit: Permit,
    /// Held until connectResult (`--max-handshakes`).
    pub(crate) handshake: tokio::sync::OwnedSemaphorePermit,
}

type Upgraded = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;
/// The read side of a socket: one frame at a time, no idle buffer.
pub(crate) type Reader = Inbound<ReadHalf<Upgraded>>;
/// The write side: frames coalesced into one syscall per flush.
pub(crate) type Writing = BatchWriter<WriteHalf<Upgraded>>;

/// Why the reader stopped.
pub(crate) enum ReaderExit {
    /// Close the socket with this reason.
    Close(CloseReason),
    /// The peer closed or the transport failed.
    PeerGone,
}

pub(crate) async fn serve(state: Arc<EdgeState>, fut: UpgradeFut, accepted: Accepted) {
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
        let (r, w) = tokio::io::split(ws.into_inner());
        let mut rd = Inbound::new(r, state.config.max_frame_bytes);
        let mut wr = BatchWriter::new(w);
        // Boxed: runs once, and its state must not stay in every socket's task.
        let Some((identity, connect_id, connect)) =
            Box::pin(handshake(&state, &mut rd, &mut wr, &accepted)).await
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
            permit: accepted.permit,
            handshake: accepted.handshake,
        };
        // The steady state runs as a task of its own, so this one (the
        // upgrade, the handshake and their arguments) ends and frees its
        // memory instead of staying inside every socket's task.
        state.tracker.spawn(run(Box::new(opened)).instrument(span));
    }
    .instrument(span)
    .await
}

/// Waits for Connect and verifies its token. On failure, answers with an
/// Error, a Disconnect and a close, and returns None.
async fn handshake(
    state: &EdgeState,
    rd: &mut Reader,
    ws: &mut Writing,
    accepted: &Accepted,
) -> Option<(Identity, u32, Box<switchboard_protocol::v1::Connect>)> {
    let enc = accepted.encoding;
    let frame = match tokio::time::timeout_at(accepted.deadline, first_frame(rd, ws)).await {
        Err(_) => {
            close_early(ws, enc, 0, None, CloseReason::ConnectTimeout).await;
            return None;
        }
        Ok(Err(e)) => {
            let reason = reader_error_reason(&e)?;
            close_early(
                ws,
                enc,
                0,
                Some((ErrorCode::BadRequest, e.to_string())),
                reason,
            )
            .await;
            return None;
        }
        Ok(Ok(f)) => f,
    };
    metrics::frame_in(&state.metrics, frame.payload.len());
    if !matches!(frame.opcode, OpCode::Text | OpCode::Binary) || !frame.fin {
        close_early(
            ws,
            enc,
            0,
            Some((ErrorCode::BadRequest, "expected a Connect frame".into())),
            CloseReason::BadRequest,
        )
        .await;
        return None;
    }
    let parsed = enc.decode_client(&frame.payload, frame.opcode == OpCode::Text);
    let (id, connect) = match parsed {
        Ok(ClientFrame {
            id,
            kind: Some(client_frame::Kind::Connect(c)),
        }) => (id, c),
        Ok(ClientFrame { id, .. }) => {
            let err = (
                ErrorCode::BadRequest,
                "the first frame must be connect".to_string(),
            );
            close_early(ws, enc, id, Some(err), CloseReason::BadRequest).await;
            return None;
        }
        Err(e) => {
            close_early(
                ws,
                enc,
                0,
                Some((ErrorCode::BadRequest, e.to_string())),
                CloseReason::BadRequest,
            )
            .await;
            return None;
        }
    };
    let verified = if connect.token.is_empty() {
        accepted.header_identity.clone().ok_or(AuthError::Missing)
    } else {
        state.config.auth.verify(&connect.token)
    };
    match verified {
        Ok(identity) => Some((identity, id, Box::new(connect))),
        Err(e) => {
            metrics::auth_failure(e.label());
            tracing::debug!(error = %e, "token refused");
            close_early(
                ws,
                enc,
                id,
                Some((e.code(), e.to_string())),
                CloseReason::Unauthorized,
            )
            .await;
            None
        }
    }
}

/// The first data frame, answering pings before it and echoing a close.
async fn first_frame(rd: &mut Reader, ws: &mut Writing) -> Result<Frame<'static>, WebSocketError> {
    let mut echo = None;
    loop {
        let mut keep = |f: Frame<'static>| {
            echo = Some(f.payload.to_vec());
            std::future::ready(Ok::<(), &'static str>(()))
        };
        let frame = rd.read_frame(&mut keep).await?;
        match frame.opcode {
            OpCode::Ping => {
                ws.push(OpCode::Pong, &frame.payload);
                ws.flush().await?;
            }
            OpCode::Pong => {}
            OpCode::Close => {
                let payload = echo.take().unwrap_or_default();
                ws.push(OpCode::Close, &payload);
                ws.flush().await?;
                return Err(WebSocketError::ConnectionClosed);
            }
            _ => return Ok(frame),
        }
    }
}

/// Maps a read error to a close reason; `None` when the peer is just gone.
fn reader_error_reason(e: &WebSocketError) -> Option<CloseReason> {
    match e {
        WebSocketError::IoError(_)
        | WebSocketError::UnexpectedEOF
        | WebSocketError::ConnectionClosed => None,
        WebSocketError::FrameTooLarge => Some(CloseReason::MessageTooLarge),
        _ => Some(CloseReason::BadRequest),
    }
}

async fn close_early(
    ws: &mut Writing,
    enc: Encoding,
    id: u32,
    error: Option<(ErrorCode, String)>,
    reason: CloseReason,
) {
    metrics::disconnect(reason.as_str());
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        if let Some((code, message)) = error {
            let frame = ServerFrame {
                id,
                kind: Some(server_frame::Kind::Error(ErrorFrame {
                    code: code as u32,
                    message,
                })),
            };
            write_encoded(ws, enc, &frame);
        }
        write_encoded(ws, enc, &reason.disconnect_frame(0));
        ws.push_close(reason.code(), reason.as_str().as_bytes());
        ws.flush().await
    })
    .await;
}

fn write_encoded(ws: &mut Writing, enc: Encoding, frame: &ServerFrame) {
    let bytes = enc.encode_server(frame);
    let opcode = if enc.is_text() {
        OpCode::Text
    } else {
        OpCode::Binary
    };
    ws.push(opcode, &bytes);
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
    permit: Permit,
    handshake: tokio::sync::OwnedSemaphorePermit,
}

/// The socket's steady state and cleanup. One boxed argument: an async
/// fn keeps its arguments for its whole life, beside the locals they are
/// moved into, and every byte here is paid by every idle socket.
async fn run(opened: Box<Opened>) {
    let Opened {
        state,
        mut rd,
        wr,
        conn_id,
        identity,
        connect_id,
        connect,
        encoding,
        permit: _permit,
        handshake,
    } = *opened;
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
    let mut session = Session::new(state.clone(), conn.clone(), identity);
    // The steady state, in its own scope so that what comes after it (the
    // linger, the cleanup) does not add to the size of every socket's task.
    let exit = {
        let last_seen = Arc::new(AtomicI64::new(now_ms()));
        let mut writer = Writer::new(
            wr,
            conn.clone(),
            rx,
            last_seen.clone(),
            expires_at_ms,
            WriterSettings {
                heartbeat_interval: cfg.heartbeat_interval,
                token_expiry_warning: cfg.token_expiry_warning,
            },
            state.metrics.clone(),
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
                    conn.close(reason, 0);
                }
                None
            }
        };
        match exit {
            Some(w) => w,
            None => {
                let reader = session.read_loop(&mut rd, &last_seen);
                tokio::pin!(reader);
                tokio::select! {
                    w = &mut writer => w,
                    r = &mut reader => {
                        match r {
                            ReaderExit::Close(reason) => conn.close(reason, 0),
                            ReaderExit::PeerGone => { conn.send(Outbound::Stop); }
                        }
                        // Boxed: a timer is 100 bytes, and this runs once.
                    Box::pin(tokio::time::timeout(Duration::from_secs(3), &mut writer)).await.unwrap_or(WriterExit::Gone)
                    }
                }
            }
        }
    };
    if matches!(exit, WriterExit::Closed(_)) {
        Box::pin(linger(&mut rd)).await;
    }
    let reason = match exit {
        WriterExit::Closed(r) => r.as_str(),
        WriterExit::Gone => "client_closed",
    };
    metrics::disconnect(reason);
    tracing::debug!(reason, "socket closed");
    Box::pin(session.cleanup()).await;
    state.hub.remove_conn(conn_id);
    state.metrics.connections.decrement(1.0);
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
        while let Ok(frame) = rd.read_frame(&mut discard).await {
            if frame.opcode == OpCode::Close {
                break;
            }
        }
    })
    .await;
}
