//! Reading an open socket: fragments reassembled within `max_frame_bytes`,
//! compressed messages (permessage-deflate) inflated within the same
//! limit, control frames answered, every frame charged to the socket's rate
//! buckets (a flood closes it), each message decoded once and handed to
//! the session. Also the map from a read error to a close reason.
use std::sync::atomic::{AtomicI64, Ordering};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, WebSocketError};
use switchboard_protocol::{
    CloseReason,
    deflate::{self, InflateError},
    now_ms,
    v1::{ClientFrame, ErrorCode, client_frame},
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
        let read = rd.read_frame(&mut obligated).await;
        // Worked out without an await: whatever is borrowed across the
        // await below (the frame, the decoded request) stays in every
        // socket's task for its whole life.
        let request = match take_request(session, &mut fragments, &mut rates, last_seen, read) {
            Ok(Some(request)) => request,
            Ok(None) => continue,
            Err(exit) => return exit,
        };
        // Boxed: a request's await state (bus, history, presence) must
        // not stay in every idle socket's task.
        if let Err(reason) = Box::pin(session.handle(request)).await {
            return ReaderExit::Close(reason);
        }
    }
}

/// What one read frame asks for: a request for the session (`Some`),
/// nothing yet (`None`: a fragment, a pong, an answered ping, a refused
/// request), or the end of the socket.
fn take_request(
    session: &Session,
    fragments: &mut Fragments,
    rates: &mut Rates,
    last_seen: &AtomicI64,
    read: Result<(Frame<'static>, bool), WebSocketError>,
) -> Result<Option<ClientFrame>, ReaderExit> {
    let (frame, compressed) = match read {
        Ok(f) => f,
        Err(e) => {
            let max = session.context().settings.max_frame_bytes;
            return Err(match read_failure(&e, max) {
                None => ReaderExit::PeerGone,
                Some(v) => fatal(session, 0, v),
            });
        }
    };
    last_seen.store(now_ms(), Ordering::Relaxed);
    metrics::frame_in(&session.context().metrics, frame.payload.len());
    let (opcode, payload) = match fragments.push(&frame, compressed) {
        Step::Message(opcode, payload) => {
            if fragments.take_inflated() {
                session.context().metrics.deflate.inflated.increment(1);
            }
            (opcode, payload)
        }
        Step::More => return Ok(None),
        Step::Closed => return Err(ReaderExit::PeerGone),
        Step::Ping => {
            match rates.admit(None, &session.context().settings, ratelimit::clock_ms()) {
                // A WebSocket ping has no request id.
                Admit::Flood => return Err(fatal(session, 0, flood())),
                Admit::Refused => return Ok(None), // over the limit: no pong
                Admit::Yes => {}
            }
            // Auto-pong is off (see `inbound`): answer here.
            let pong = Box::new((OpCode::Pong, frame.payload.to_vec()));
            if !session.conn().send(Outbound::Control(pong)) {
                return Err(ReaderExit::PeerGone);
            }
            return Ok(None);
        }
        Step::Refuse(v) => return Err(fatal(session, 0, v)),
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
            return Err(fatal(session, 0, v));
        }
    };
    match rates.admit(
        request.kind.as_ref(),
        &session.context().settings,
        ratelimit::clock_ms(),
    ) {
        // The refusal that makes the flood answers its request too.
        Admit::Flood => Err(fatal(session, request.id, flood())),
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
            Ok(None)
        }
        Admit::Yes => Ok(Some(request)),
    }
}

/// Sends the violation's error (with the id of the request that caused
/// it, if any) and asks for the close.
fn fatal(session: &Session, id: u32, v: Violation) -> ReaderExit {
    session.refuse(id, Refusal(v.code, v.message));
    ReaderExit::Close(v.reason)
}

fn flood() -> Violation {
    Violation::new(
        ErrorCode::LimitExceeded,
        "flood: requests kept coming over the rate limit",
        CloseReason::RateLimited,
    )
}

/// The close a compressed message that cannot be inflated asks for: too
/// large (a decompression bomb) like any message over the limit, or
/// malformed.
pub(super) fn inflate_failure(e: InflateError) -> Violation {
    match e {
        InflateError::TooLarge(max) => Violation::new(
            ErrorCode::TooLarge,
            format!("message over {max} bytes once inflated"),
            CloseReason::MessageTooLarge,
        ),
        InflateError::Malformed => Violation::new(
            ErrorCode::BadRequest,
            "invalid compressed data",
            CloseReason::BadRequest,
        ),
    }
}

/// The one map from a read error, in the handshake or after it, to the
/// close it asks for; `None` when the peer is just gone (or its mailbox
/// refused a control frame we owed it).
pub(super) fn read_failure(e: &WebSocketError, max_frame_bytes: usize) -> Option<Violation> {
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

/// A message split over frames, bounded by the same size limit as a frame;
/// a compressed one is bounded once more when inflated.
struct Fragments {
    /// The message's opcode, whether it is compressed, what came so far.
    partial: Option<(OpCode, bool, Vec<u8>)>,
    max_bytes: usize,
    /// The last message was inflated (for the metric).
    inflated: bool,
}

impl Fragments {
    fn new(max_bytes: usize) -> Self {
        Fragments {
            partial: None,
            max_bytes,
            inflated: false,
        }
    }

    /// Whether the message just returned was compressed.
    fn take_inflated(&mut self) -> bool {
        std::mem::take(&mut self.inflated)
    }

    /// `compressed`: the frame starts a compressed message (RSV1).
    fn push(&mut self, frame: &Frame<'_>, compressed: bool) -> Step {
        match (frame.opcode, frame.fin) {
            (OpCode::Close, _) => Step::Closed,
            (OpCode::Ping, _) => Step::Ping,
            (OpCode::Pong, _) => Step::More,
            (OpCode::Text | OpCode::Binary, true) if self.partial.is_none() => {
                if compressed {
                    return self.inflate(frame.opcode, &frame.payload);
                }
                Step::Message(frame.opcode, Bytes::from(frame.payload.to_vec()))
            }
            (OpCode::Text | OpCode::Binary, false) if self.partial.is_none() => {
                self.partial = Some((frame.opcode, compressed, frame.payload.to_vec()));
                Step::More
            }
            (OpCode::Continuation, fin) => {
                let Some((_, _, buf)) = self.partial.as_mut() else {
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
                let Some((op, compressed, buf)) = self.partial.take() else {
                    return invalid_fragmentation();
                };
                if compressed {
                    return self.inflate(op, &buf);
                }
                if op == OpCode::Text && std::str::from_utf8(&buf).is_err() {
                    return invalid_utf8();
                }
                Step::Message(op, Bytes::from(buf))
            }
            _ => invalid_fragmentation(),
        }
    }

    /// A whole compressed message: inflated within the size limit, a text
    /// one checked for UTF-8 (fastwebsockets saw only compressed bytes).
    fn inflate(&mut self, op: OpCode, payload: &[u8]) -> Step {
        let plain = match deflate::inflate(payload, self.max_bytes) {
            Ok(p) => p,
            Err(e) => return Step::Refuse(inflate_failure(e)),
        };
        if op == OpCode::Text && std::str::from_utf8(&plain).is_err() {
            return invalid_utf8();
        }
        self.inflated = true;
        Step::Message(op, Bytes::from(plain))
    }
}

fn invalid_utf8() -> Step {
    Step::Refuse(Violation::new(
        ErrorCode::BadRequest,
        "invalid UTF-8 in text message",
        CloseReason::BadRequest,
    ))
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

    /// Charges one frame to the buckets (`None`: a WebSocket ping) at
    /// `now` on [`ratelimit::clock_ms`].
    fn admit(
        &mut self,
        kind: Option<&client_frame::Kind>,
        settings: &SessionSettings,
        now: u32,
    ) -> Admit {
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

#[cfg(test)]
mod tests {
    use fastwebsockets::{Payload, Role, WebSocket};
    use switchboard_protocol::v1::{Publish, Subscribe};

    use crate::ratelimit::Rate;

    use super::*;

    /// Frames as a client sends them (masked, `fin` as given), read back
    /// by the socket's reader over an in-memory stream and pushed into
    /// `Fragments` bounded at `max`.
    async fn steps(frames: Vec<(bool, OpCode, &[u8])>, max: usize) -> Vec<Step> {
        let (client, server) = tokio::io::duplex(1 << 16);
        let count = frames.len();
        let owned: Vec<(bool, OpCode, Vec<u8>)> = frames
            .into_iter()
            .map(|(fin, op, p)| (fin, op, p.to_vec()))
            .collect();
        let writer = tokio::spawn(async move {
            let mut ws = WebSocket::after_handshake(client, Role::Client);
            for (fin, op, payload) in owned {
                ws.write_frame(Frame::new(fin, op, None, Payload::Owned(payload)))
                    .await
                    .unwrap();
            }
            ws
        });
        let mut rd = Inbound::new(server, 1 << 20, false);
        let mut fragments = Fragments::new(max);
        let mut ignore = |_: Frame<'static>| std::future::ready(Ok::<(), &'static str>(()));
        let mut out = Vec::new();
        for _ in 0..count {
            let (frame, compressed) = rd.read_frame(&mut ignore).await.unwrap();
            let step = fragments.push(&frame, compressed);
            let stop = matches!(step, Step::Refuse(_) | Step::Closed);
            out.push(step);
            if stop {
                break;
            }
        }
        drop(writer.await.unwrap());
        out
    }

    fn message(op: OpCode, payload: &[u8]) -> Step {
        Step::Message(op, Bytes::copy_from_slice(payload))
    }

    fn refused(code: ErrorCode, message: &str, reason: CloseReason) -> Step {
        Step::Refuse(Violation::new(code, message, reason))
    }

    #[tokio::test]
    async fn fragments_are_reassembled_around_control_frames() {
        let got = steps(
            vec![
                (false, OpCode::Text, b"he"),
                (true, OpCode::Ping, b"p"),
                (false, OpCode::Continuation, b"ll"),
                (true, OpCode::Pong, b""),
                (true, OpCode::Continuation, b"o"),
                (true, OpCode::Binary, b"\x00\x01"),
                (true, OpCode::Close, b""),
            ],
            1024,
        )
        .await;
        assert_eq!(
            got,
            vec![
                Step::More,
                Step::Ping,
                Step::More,
                Step::More,
                message(OpCode::Text, b"hello"),
                message(OpCode::Binary, b"\x00\x01"),
                Step::Closed,
            ]
        );
    }

    #[tokio::test]
    async fn a_fragmented_message_is_bounded_like_a_frame() {
        // Exactly the limit passes.
        let got = steps(
            vec![
                (false, OpCode::Binary, b"1234"),
                (true, OpCode::Continuation, b"5678"),
            ],
            8,
        )
        .await;
        assert_eq!(got[1], message(OpCode::Binary, b"12345678"));
        // One byte over is refused before the message ends.
        let got = steps(
            vec![
                (false, OpCode::Binary, b"1234"),
                (false, OpCode::Continuation, b"56789"),
                (true, OpCode::Continuation, b""),
            ],
            8,
        )
        .await;
        assert_eq!(
            got,
            vec![
                Step::More,
                refused(
                    ErrorCode::TooLarge,
                    "message too large",
                    CloseReason::MessageTooLarge
                ),
            ]
        );
    }

    #[tokio::test]
    async fn text_is_checked_as_a_whole_message() {
        // "é" split between two fragments is valid UTF-8 once whole.
        let got = steps(
            vec![
                (false, OpCode::Text, b"caf\xc3"),
                (true, OpCode::Continuation, b"\xa9"),
            ],
            64,
        )
        .await;
        assert_eq!(got[1], message(OpCode::Text, "café".as_bytes()));
        let got = steps(
            vec![
                (false, OpCode::Text, b"caf\xc3"),
                (true, OpCode::Continuation, b"!"),
            ],
            64,
        )
        .await;
        assert_eq!(
            got[1],
            refused(
                ErrorCode::BadRequest,
                "invalid UTF-8 in text message",
                CloseReason::BadRequest
            )
        );
    }

    #[tokio::test]
    async fn continuations_must_follow_a_started_message() {
        let invalid = refused(
            ErrorCode::BadRequest,
            "invalid fragmentation",
            CloseReason::BadRequest,
        );
        let got = steps(vec![(true, OpCode::Continuation, b"x")], 64).await;
        assert_eq!(got, vec![invalid]);
        let invalid = refused(
            ErrorCode::BadRequest,
            "invalid fragmentation",
            CloseReason::BadRequest,
        );
        let got = steps(
            vec![(false, OpCode::Text, b"a"), (true, OpCode::Text, b"b")],
            64,
        )
        .await;
        assert_eq!(got, vec![Step::More, invalid]);
    }

    /// A frame as `Inbound` returns it (unmasked, opcode restored).
    fn frame(fin: bool, op: OpCode, payload: &[u8]) -> Frame<'static> {
        Frame::new(fin, op, None, Payload::Owned(payload.to_vec()))
    }

    #[test]
    fn compressed_messages_are_inflated_whole_or_in_fragments() {
        let text = "héllo, a message that repeats itself, repeats itself, repeats itself";
        let packed = deflate::compress(text.as_bytes());
        let mut f = Fragments::new(1024);
        assert_eq!(
            f.push(&frame(true, OpCode::Text, &packed), true),
            message(OpCode::Text, text.as_bytes())
        );
        assert!(f.take_inflated() && !f.take_inflated());
        // RSV1 on the first frame only; continuations carry the rest.
        let (a, b) = packed.split_at(packed.len() / 2);
        assert_eq!(f.push(&frame(false, OpCode::Binary, a), true), Step::More);
        assert_eq!(
            f.push(&frame(false, OpCode::Continuation, b), false),
            Step::More
        );
        assert_eq!(
            f.push(&frame(true, OpCode::Continuation, b""), false),
            message(OpCode::Binary, text.as_bytes())
        );
        assert!(f.take_inflated());
        // A plain message between compressed ones stays plain.
        assert_eq!(
            f.push(&frame(true, OpCode::Binary, &packed), false),
            message(OpCode::Binary, &packed)
        );
        assert!(!f.take_inflated());
    }

    #[test]
    fn bombs_and_garbage_are_refused_with_their_codes() {
        let mut f = Fragments::new(64 << 10);
        // 1 MiB of zeros is a few kilobytes compressed.
        let bomb = deflate::compress(&vec![0u8; 1 << 20]);
        assert!(bomb.len() < 8192, "{} bytes", bomb.len());
        assert_eq!(
            f.push(&frame(true, OpCode::Binary, &bomb), true),
            refused(
                ErrorCode::TooLarge,
                "message over 65536 bytes once inflated",
                CloseReason::MessageTooLarge
            )
        );
        let mut f = Fragments::new(64 << 10);
        assert_eq!(
            f.push(&frame(true, OpCode::Text, &[0xff, 0xff, 0xff]), true),
            refused(
                ErrorCode::BadRequest,
                "invalid compressed data",
                CloseReason::BadRequest
            )
        );
        let mut f = Fragments::new(64 << 10);
        let not_utf8 = deflate::compress(b"caf\xc3!");
        assert_eq!(
            f.push(&frame(true, OpCode::Text, &not_utf8), true),
            refused(
                ErrorCode::BadRequest,
                "invalid UTF-8 in text message",
                CloseReason::BadRequest
            )
        );
    }

    #[test]
    fn one_map_from_read_errors_to_close_reasons() {
        let gone = [
            WebSocketError::IoError(std::io::ErrorKind::ConnectionReset.into()),
            WebSocketError::UnexpectedEOF,
            WebSocketError::ConnectionClosed,
            WebSocketError::SendError("mailbox full".into()),
        ];
        for e in gone {
            assert_eq!(read_failure(&e, 1024), None, "{e:?}");
        }
        assert_eq!(
            read_failure(&WebSocketError::FrameTooLarge, 1024),
            Some(Violation::new(
                ErrorCode::TooLarge,
                "message over 1024 bytes",
                CloseReason::MessageTooLarge
            ))
        );
        for e in [
            WebSocketError::InvalidUTF8,
            WebSocketError::ReservedBitsNotZero,
            WebSocketError::ControlFrameFragmented,
            WebSocketError::InvalidCloseCode,
            WebSocketError::InvalidFragment,
        ] {
            let v = read_failure(&e, 1024).expect("a protocol violation closes");
            assert_eq!(v.code, ErrorCode::BadRequest, "{e:?}");
            assert_eq!(v.reason, CloseReason::BadRequest, "{e:?}");
            assert_eq!(v.message, e.to_string());
        }
    }

    fn settings(requests: Rate, publish: Rate) -> SessionSettings {
        SessionSettings {
            node_id: "edge-1".into(),
            heartbeat_interval: std::time::Duration::from_secs(25),
            max_frame_bytes: 1024,
            max_subscriptions: 10,
            max_presence_watches: 10,
            rate_requests: requests,
            rate_publish: publish,
            token_expiry_warning: std::time::Duration::from_secs(60),
            reconnect_jitter_max: std::time::Duration::from_secs(10),
        }
    }

    #[test]
    fn publishes_charge_both_buckets() {
        let s = settings(
            Rate {
                per_sec: 0.0,
                burst: 3.0,
            },
            Rate {
                per_sec: 0.0,
                burst: 1.0,
            },
        );
        let publish = client_frame::Kind::Publish(Publish::default());
        let subscribe = client_frame::Kind::Subscribe(Subscribe::default());
        let mut rates = Rates::new(&s);
        assert_eq!(rates.admit(Some(&publish), &s, 0), Admit::Yes);
        assert_eq!(rates.admit(Some(&publish), &s, 0), Admit::Refused);
        // The request bucket still has a token; pings charge it too.
        assert_eq!(rates.admit(Some(&subscribe), &s, 0), Admit::Yes);
        assert_eq!(rates.admit(None, &s, 0), Admit::Refused);
    }

    #[test]
    fn refusals_in_a_row_make_a_flood() {
        let s = settings(
            Rate {
                per_sec: 1.0,
                burst: 1.0,
            },
            Rate {
                per_sec: 1.0,
                burst: 1.0,
            },
        );
        let mut rates = Rates::new(&s);
        let now = ratelimit::clock_ms();
        assert_eq!(rates.admit(None, &s, now), Admit::Yes);
        for _ in 1..ratelimit::FLOOD_REFUSALS {
            assert_eq!(rates.admit(None, &s, now), Admit::Refused);
        }
        // One admitted frame (a second later) starts the count again.
        assert_eq!(rates.admit(None, &s, now + 1000), Admit::Yes);
        for _ in 1..ratelimit::FLOOD_REFUSALS {
            assert_eq!(rates.admit(None, &s, now + 1000), Admit::Refused);
        }
        assert_eq!(rates.admit(None, &s, now + 1000), Admit::Flood);
    }
}
