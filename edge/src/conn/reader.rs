//! Reading an open socket: fragments reassembled within `max_frame_bytes`,
//! control frames answered, every frame charged to the socket's rate
//! buckets (a flood closes it), each message decoded once and handed to
//! the session. Also the map from a read error to a close reason.
use std::sync::atomic::{AtomicI64, Ordering};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, WebSocketError};
use switchboard_protocol::{
    CloseReason, now_ms,
    v1::{ErrorCode, client_frame},
};
use tokio::io::AsyncRead;

use crate::{
    conn::{
        inbound::Inbound,
        requests::{Refusal, Session},
    },
    mailbox::Outbound,
    metrics,
    ratelimit::{self, Bucket},
    state::SessionSettings,
};

/// Why the reader stopped.
pub(crate) enum ReaderExit {
    /// Close the socket with this reason.
    Close(CloseReason),
    /// The peer closed or the transport failed.
    PeerGone,
}

/// A frame or read error that closes the socket: the error reply sent
/// first, then the close.
#[derive(Debug, PartialEq)]
pub(super) struct Violation {
    pub(super) code: ErrorCode,
    pub(super) message: String,
    pub(super) reason: CloseReason,
}

impl Violation {
    fn new(code: ErrorCode, message: impl Into<String>, reason: CloseReason) -> Self {
        Violation {
            code,
            message: message.into(),
            reason,
        }
    }
}

/// Reads frames until the peer leaves or a frame forces a close.
pub(super) async fn read_loop<R: AsyncRead + Unpin>(
    session: &mut Session,
    rd: &mut Inbound<R>,
    last_seen: &AtomicI64,
) -> ReaderExit {
    let conn = session.conn().clone();
    let mut obligated = move |f: Frame<'static>| {
        let ok = conn.send(Outbound::Control(Box::new((f.opcode, f.payload.to_vec()))));
        async move { if ok { Ok(()) } else { Err("mailbox full") } }
    };
    let settings = &session.context().settings;
    let mut fragments = Fragments::new(settings.max_frame_bytes);
    let mut rates = Rates::new(settings);
    loop {
        let frame = match rd.read_frame(&mut obligated).await {
            Ok(f) => f,
            Err(e) => {
                let max = session.context().settings.max_frame_bytes;
                return match read_failure(e, max) {
                    None => ReaderExit::PeerGone,
                    Some(v) => fatal(session, v),
                };
            }
        };
        last_seen.store(now_ms(), Ordering::Relaxed);
        metrics::frame_in(&session.context().metrics, frame.payload.len());
        let (opcode, payload) = match fragments.push(&frame) {
            Step::Message(opcode, payload) => (opcode, payload),
            Step::More => continue,
            Step::Closed => return ReaderExit::PeerGone,
            Step::Ping => {
                match rates.admit(None, &session.context().settings) {
                    Admit::Flood => return fatal(session, flood()),
                    Admit::Refused => continue, // over the limit: no pong
                    Admit::Yes => {}
                }
                // Auto-pong is off (see `inbound`): answer here.
                let pong = Box::new((OpCode::Pong, frame.payload.to_vec()));
                if !session.conn().send(Outbound::Control(pong)) {
                    return ReaderExit::PeerGone;
                }
                continue;
            }
            Step::Refuse(v) => return fatal(session, v),
        };
        let decoded = session
            .conn()
            .encoding()
            .decode_client(&payload, opcode == OpCode::Text);
        let request = match decoded {
            Ok(r) => r,
            Err(e) => {
                let v = Violation::new(
                    ErrorCode::BadRequest,
                    e.to_string(),
                    CloseReason::BadRequest,
                );
                return fatal(session, v);
            }
        };
        match rates.admit(request.kind.as_ref(), &session.context().settings) {
            Admit::Flood => return fatal(session, flood()),
            Admit::Refused => {
                let what = if is_publish(request.kind.as_ref()) {
                    "publish"
                } else {
                    "request"
                };
                session.refuse(
                    request.id,
                    Refusal(
                        ErrorCode::LimitExceeded,
                        format!("{what} rate limit exceeded"),
                    ),
                );
                continue;
            }
            Admit::Yes => {}
        }
        // Boxed: a request's await state (bus, history, presence) must
        // not stay in every idle socket's task.
        if let Err(reason) = Box::pin(session.handle(request)).await {
            return ReaderExit::Close(reason);
        }
    }
}

/// Sends the violation's error and asks for the close.
fn fatal(session: &Session, v: Violation) -> ReaderExit {
    session.refuse(0, Refusal(v.code, v.message));
    ReaderExit::Close(v.reason)
}

fn flood() -> Violation {
    Violation::new(
        ErrorCode::LimitExceeded,
        "flood: requests kept coming over the rate limit",
        CloseReason::RateLimited,
    )
}

/// Maps a read error of the steady state to the close it asks for;
/// `None` when the peer is just gone (or its mailbox refused a control
/// frame we owed it).
fn read_failure(e: WebSocketError, max_frame_bytes: usize) -> Option<Violation> {
    match e {
        WebSocketError::IoError(_)
        | WebSocketError::UnexpectedEOF
        | WebSocketError::ConnectionClosed => None,
        WebSocketError::FrameTooLarge => Some(Violation::new(
            ErrorCode::TooLarge,
            format!("message over {max_frame_bytes} bytes"),
            CloseReason::MessageTooLarge,
        )),
        WebSocketError::SendError(_) => None,
        other => Some(Violation::new(
            ErrorCode::BadRequest,
            other.to_string(),
            CloseReason::BadRequest,
        )),
    }
}

/// What one frame makes of the message being read.
#[derive(Debug, PartialEq)]
enum Step {
    /// A whole text or binary message.
    Message(OpCode, Bytes),
    /// Nothing to do yet: a pong, or a fragment of a longer message.
    More,
    /// A ping, to answer if the rate allows.
    Ping,
    /// The peer's close (its echo is already on its way).
    Closed,
    /// A protocol violation.
    Refuse(Violation),
}

/// A message split over frames, bounded by the same size limit as a frame.
struct Fragments {
    partial: Option<(OpCode, Vec<u8>)>,
    max_bytes: usize,
}

impl Fragments {
    fn new(max_bytes: usize) -> Self {
        Fragments {
            partial: None,
            max_bytes,
        }
    }

    fn push(&mut self, frame: &Frame<'_>) -> Step {
        match (frame.opcode, frame.fin) {
            (OpCode::Close, _) => Step::Closed,
            (OpCode::Ping, _) => Step::Ping,
            (OpCode::Pong, _) => Step::More,
            (OpCode::Text | OpCode::Binary, true) if self.partial.is_none() => {
                Step::Message(frame.opcode, Bytes::from(frame.payload.to_vec()))
            }
            (OpCode::Text | OpCode::Binary, false) if self.partial.is_none() => {
                self.partial = Some((frame.opcode, frame.payload.to_vec()));
                Step::More
            }
            (OpCode::Continuation, fin) => {
                let Some((op, buf)) = self.partial.as_mut() else {
                    return invalid_fragmentation();
                };
                if buf.len() + frame.payload.len() > self.max_bytes {
                    return Step::Refuse(Violation::new(
                        ErrorCode::TooLarge,
                        "message too large",
                        CloseReason::MessageTooLarge,
                    ));
                }
                buf.extend_from_slice(&frame.payload);
                if !fin {
                    return Step::More;
                }
                let op = *op;
                let Some((_, buf)) = self.partial.take() else {
                    return invalid_fragmentation();
                };
                if op == OpCode::Text && std::str::from_utf8(&buf).is_err() {
                    return Step::Refuse(Violation::new(
                        ErrorCode::BadRequest,
                        "invalid UTF-8 in text message",
                        CloseReason::BadRequest,
                    ));
                }
                Step::Message(op, Bytes::from(buf))
            }
            _ => invalid_fragmentation(),
        }
    }
}

fn invalid_fragmentation() -> Step {
    Step::Refuse(Violation::new(
        ErrorCode::BadRequest,
        "invalid fragmentation",
        CloseReason::BadRequest,
    ))
}

/// Requests that count against the publish rate as well.
fn is_publish(kind: Option<&client_frame::Kind>) -> bool {
    matches!(
        kind,
        Some(
            client_frame::Kind::Publish(_)
                | client_frame::Kind::Receipt(_)
                | client_frame::Kind::Typing(_)
        )
    )
}

/// Whether a frame is within the socket's rates.
#[derive(Debug, PartialEq)]
enum Admit {
    Yes,
    /// Over a limit: refuse this one.
    Refused,
    /// Refused too often in a row: close the socket.
    Flood,
}

/// The socket's token buckets (8 bytes each, see `ratelimit`).
struct Rates {
    requests: Bucket,
    publishes: Bucket,
    /// Requests refused by a limit in a row (a flood at FLOOD_REFUSALS).
    refused_in_row: u16,
}

impl Rates {
    fn new(settings: &SessionSettings) -> Self {
        Rates {
            requests: Bucket::full(settings.rate_requests),
            publishes: Bucket::full(settings.rate_publish),
            refused_in_row: 0,
        }
    }

    /// Charges one frame to the buckets (`None`: a WebSocket ping).
    fn admit(&mut self, kind: Option<&client_frame::Kind>, settings: &SessionSettings) -> Admit {
        let now = ratelimit::clock_ms();
        let ok = self.requests.take(settings.rate_requests, now)
            && (!is_publish(kind) || self.publishes.take(settings.rate_publish, now));
        if ok {
            self.refused_in_row = 0;
            return Admit::Yes;
        }
        let label = match kind {
            None => "ping",
            k if is_publish(k) => "publish",
            _ => "request",
        };
        ::metrics::counter!("switchboard_edge_rate_limited_total", "kind" => label).increment(1);
        self.refused_in_row = self.refused_in_row.saturating_add(1);
        if self.refused_in_row >= ratelimit::FLOOD_REFUSALS {
            return Admit::Flood;
        }
        Admit::Refused
    }
}
