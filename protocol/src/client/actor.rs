//! The connection actor: one task owns the socket, the pending requests and
//! the stream cursors, and `select!`s over the commands from [`Client`]
//! handles, the socket, and the app taking events.
//!
//! Its link goes `Dialing -> Open(Connecting -> Resuming -> Live)`; when
//! the socket is lost it waits (`Idle`) and dials again, or waits for a new
//! token (`Parked`), or stops. It never blocks on the app: events queue in
//! a small outbox, and while the outbox is not empty it stops reading the
//! socket (backpressure reaches the server, which may close the socket as a
//! slow consumer; the client then resumes).
//!
//! Phases live beside this file: `handshake` (dial, Connect, resume) and
//! `lost` (what happens when the socket goes, and when to come back).
//!
//! [`Client`]: super::Client
mod handshake;
mod lost;

use self::lost::Lost;

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    pin::Pin,
    time::Duration,
};

use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, frame::coding::CloseCode};

use super::{
    ClientConfig, ClientError, Event,
    cursor::{Cursors, Verdict},
    event::{Cursor, Positions, ResubscribeFailure, StreamId},
    link::{self, Inbound, Ws},
};
use crate::{
    Encoding,
    v1::{ClientFrame, ConnectResult, ServerFrame, StreamPosition, client_frame, server_frame},
};

/// What a request gets back: the reply's kind, or why there is none.
pub(super) type Reply = Result<server_frame::Kind, ClientError>;

/// What a [`Client`](super::Client) asks of the actor.
pub(super) enum Command {
    /// Send a request and answer `reply` with the server's reply.
    Request {
        kind: client_frame::Kind,
        reply: oneshot::Sender<Reply>,
    },
    /// Report the stream cursors.
    Positions(oneshot::Sender<Positions>),
    /// Close the socket with 1000 and stop; answered once stopped.
    Close(oneshot::Sender<()>),
}

/// What the actor must remember about a request until its reply.
enum Meta {
    /// The app's subscribe: follow the chat once the result arrives.
    Subscribe {
        chat: String,
        since: Option<u64>,
        /// The subscription token, kept for re-subscribing.
        token: String,
    },
    /// The actor's own subscribe after a reconnect.
    Resubscribe {
        chat: String,
        since: Option<u64>,
    },
    /// Stop following the chat once the server agrees.
    Unsubscribe {
        chat: String,
    },
    /// Use the token for reconnects once the server accepts it.
    Refresh {
        token: String,
    },
    Other,
}

impl Meta {
    fn of(kind: &client_frame::Kind) -> Meta {
        match kind {
            client_frame::Kind::Subscribe(s) => Meta::Subscribe {
                chat: s.chat.clone(),
                since: s.since,
                token: s.token.clone(),
            },
            client_frame::Kind::Unsubscribe(u) => Meta::Unsubscribe {
                chat: u.chat.clone(),
            },
            client_frame::Kind::Refresh(r) => Meta::Refresh {
                token: r.token.clone(),
            },
            _ => Meta::Other,
        }
    }
}

struct Pending {
    meta: Meta,
    /// `None` for the actor's own requests.
    reply: Option<oneshot::Sender<Reply>>,
}

impl Pending {
    /// Nobody waits for the reply and it changes no state: safe to forget.
    fn abandoned(&self) -> bool {
        matches!(self.meta, Meta::Other) && self.reply.as_ref().is_none_or(|r| r.is_closed())
    }
}

type DialFuture = Pin<Box<dyn Future<Output = Result<Ws, ClientError>> + Send>>;

enum Link {
    /// Waiting to dial again.
    Idle {
        until: Instant,
    },
    /// Waiting for a new token (see [`Event::TokenRejected`]).
    Parked,
    Dialing {
        future: DialFuture,
        deadline: Instant,
    },
    Open {
        /// Boxed: a socket is much larger than the other states.
        ws: Box<Ws>,
        phase: Phase,
        /// When the server was last heard from (any frame, or a ping).
        heard: Instant,
        /// Silence after which the server counts as gone (from the
        /// heartbeat interval it announced; `None`: not announced).
        silence: Option<Duration>,
    },
    Stopped,
}

enum Phase {
    /// Connect sent; waiting for its reply.
    Connecting {
        id: u32,
        since: Option<u64>,
        deadline: Instant,
    },
    /// Reconnected; waiting for the re-subscribe replies.
    Resuming(Resume),
    Live,
}

impl Phase {
    fn deadline(&self) -> Option<Instant> {
        match self {
            Phase::Connecting { deadline, .. } => Some(*deadline),
            Phase::Resuming(r) => Some(r.deadline),
            Phase::Live => None,
        }
    }
}

struct Resume {
    outstanding: usize,
    deadline: Instant,
    user_stream: StreamPosition,
    resubscribed: Vec<(String, StreamPosition)>,
    failed: Vec<ResubscribeFailure>,
}

/// What moved the link forward.
enum Step {
    Dial,
    Dialed(Result<Ws, ClientError>),
    Inbound(Inbound),
    Deadline,
}

impl Link {
    /// Waits for the link's next step. Cancel-safe: the dial future lives
    /// in the link, and reading the socket loses nothing when dropped.
    async fn step(&mut self, encoding: Encoding) -> Step {
        match self {
            Link::Idle { until } => {
                tokio::time::sleep_until(*until).await;
                Step::Dial
            }
            Link::Parked | Link::Stopped => std::future::pending().await,
            Link::Dialing { future, deadline } => {
                match tokio::time::timeout_at(*deadline, future.as_mut()).await {
                    Ok(result) => Step::Dialed(result),
                    Err(_) => Step::Dialed(Err(ClientError::Timeout)),
                }
            }
            Link::Open {
                ws,
                phase,
                heard,
                silence,
            } => {
                let quiet_until = silence.map(|s| *heard + s);
                let deadline = match (phase.deadline(), quiet_until) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                tokio::select! {
                    // Frames already received win over a deadline: after the
                    // app was slow, buffered pings still count.
                    biased;
                    inbound = link::recv(ws, encoding) => Step::Inbound(inbound),
                    () = sleep_until(deadline) => Step::Deadline,
                }
            }
        }
    }
}

/// Hands the oldest queued event to the app once it has room; false when
/// the app dropped its receiver. Cancel-safe: the event leaves the outbox
/// only together with the send.
async fn forward(events: &mpsc::Sender<Event>, outbox: &mut VecDeque<Event>) -> bool {
    let Ok(permit) = events.reserve().await else {
        return false;
    };
    if let Some(event) = outbox.pop_front() {
        permit.send(event);
    }
    true
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

pub(super) struct Actor {
    config: ClientConfig,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    /// Events not yet taken by the app; the socket is read only while
    /// this is empty, so it stays small (the events of one frame).
    outbox: VecDeque<Event>,
    /// The app dropped its event receiver.
    events_gone: bool,
    session: watch::Sender<ConnectResult>,
    /// Answers `Client::connect`; `Some` until the first session starts.
    ready: Option<oneshot::Sender<Result<(), ClientError>>>,
    link: Link,
    cursors: Cursors,
    /// Subscription tokens of the chats subscribed with one, for
    /// re-subscribing after a reconnect.
    sub_tokens: HashMap<String, String>,
    pending: HashMap<u32, Pending>,
    /// Requests made while not connected, sent once the session is back.
    stash: VecDeque<(client_frame::Kind, oneshot::Sender<Reply>)>,
    next_id: u32,
    /// Failed attempts (and sessions that ended early) in a row.
    attempt: u32,
    /// Dials so far: which of the URLs the next one takes.
    dials: usize,
    /// When the current session started; `None` when there is none, so
    /// `Some` also means a `Disconnected` event is due when it ends.
    live_since: Option<Instant>,
    /// `Client::close` callers, answered once stopped.
    closers: Vec<oneshot::Sender<()>>,
}

impl Actor {
    pub(super) fn new(
        config: ClientConfig,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<Event>,
        session: watch::Sender<ConnectResult>,
        ready: oneshot::Sender<Result<(), ClientError>>,
    ) -> Actor {
        let cursors = Cursors::new(Cursor {
            seq: config.user_since.unwrap_or(0),
            epoch: config.user_epoch.clone(),
        });
        Actor {
            config,
            commands,
            events,
            outbox: VecDeque::new(),
            events_gone: false,
            session,
            ready: Some(ready),
            link: Link::Stopped,
            cursors,
            sub_tokens: HashMap::new(),
            pending: HashMap::new(),
            stash: VecDeque::new(),
            next_id: 1,
            attempt: 0,
            dials: 0,
            live_since: None,
            closers: Vec::new(),
        }
    }

    pub(super) async fn run(mut self) {
        self.dial();
        let encoding = self.config.encoding;
        while !matches!(self.link, Link::Stopped) {
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command).await,
                    // Every Client handle is gone.
                    None => self.stop(None).await,
                },
                alive = forward(&self.events, &mut self.outbox), if !self.outbox.is_empty() => {
                    if !alive {
                        self.events_gone = true;
                        self.outbox.clear();
                    }
                }
                step = self.link.step(encoding), if self.outbox.is_empty() => self.on_step(step).await,
            }
        }
        self.finish().await;
    }

    fn emit(&mut self, event: Event) {
        if !self.events_gone {
            self.outbox.push_back(event);
        }
    }

    fn next_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if !self.pending.contains_key(&id) {
                return id;
            }
        }
    }

    /// Whether requests can be sent now (they are stashed otherwise).
    fn usable(&self) -> bool {
        matches!(
            self.link,
            Link::Open {
                phase: Phase::Resuming(_) | Phase::Live,
                ..
            }
        )
    }

    async fn on_step(&mut self, step: Step) {
        if let (Step::Inbound(_), Link::Open { heard, .. }) = (&step, &mut self.link) {
            *heard = Instant::now();
        }
        match step {
            Step::Dial => self.dial(),
            Step::Dialed(Ok(ws)) => self.on_dialed(ws).await,
            Step::Dialed(Err(e)) => self.on_lost(Lost::dial(e)).await,
            Step::Inbound(Inbound::Frame(frame)) => self.on_frame(frame).await,
            Step::Inbound(Inbound::Undecodable(e)) => {
                tracing::warn!(error = %e, "undecodable server frame skipped");
                if self.usable() {
                    self.emit(Event::Malformed {
                        error: e.to_string(),
                    });
                } else {
                    self.on_lost(Lost::failed(e.into())).await;
                }
            }
            Step::Inbound(Inbound::Closed { code, reason }) => {
                self.on_lost(Lost::closed(code, reason)).await
            }
            Step::Inbound(Inbound::Heartbeat) => {}
            Step::Inbound(Inbound::Failed(e)) => self.on_lost(Lost::failed(e)).await,
            Step::Deadline => {
                let mut lost = Lost::failed(ClientError::Timeout);
                if let Link::Open {
                    phase: Phase::Live, ..
                } = self.link
                {
                    lost.reason = "server silent past its heartbeat interval".into();
                }
                self.on_lost(lost).await;
            }
        }
    }

    async fn on_frame(&mut self, frame: ServerFrame) {
        // A kind this build does not know (a newer server): nothing to do.
        let Some(kind) = frame.kind else {
            tracing::debug!(id = frame.id, "server frame of an unknown kind skipped");
            return;
        };
        if frame.id == 0 {
            return self.on_push(kind).await;
        }
        if let Link::Open {
            phase: Phase::Connecting { id, since, .. },
            ..
        } = &self.link
            && *id == frame.id
        {
            let since = *since;
            return self.on_connect_reply(since, kind).await;
        }
        match self.pending.remove(&frame.id) {
            Some(pending) => self.on_reply(pending, kind).await,
            None => tracing::debug!(id = frame.id, "reply to no pending request skipped"),
        }
    }

    async fn on_push(&mut self, kind: server_frame::Kind) {
        let event = match kind {
            server_frame::Kind::Delivery(d) => match self.cursors.on_delivery(&d) {
                Verdict::Duplicate => {
                    tracing::trace!(chat = %d.chat, seq = d.seq, "duplicate delivery dropped");
                    return;
                }
                Verdict::New { hole } => {
                    if let Some(last_seen) = hole {
                        let stream = if d.chat.is_empty() {
                            StreamId::Personal
                        } else {
                            StreamId::Chat(d.chat.clone())
                        };
                        self.emit(Event::ResyncRequired { stream, last_seen });
                    }
                    Event::Delivery(d)
                }
            },
            server_frame::Kind::Receipt(r) => Event::Receipt(r),
            server_frame::Kind::Presence(p) => Event::Presence(p),
            server_frame::Kind::Typing(t) => Event::Typing(t),
            server_frame::Kind::Unsubscribed(u) => {
                // The server ended it: not followed, not re-subscribed.
                self.cursors.forget(&u.chat);
                self.sub_tokens.remove(&u.chat);
                Event::Unsubscribed {
                    chat: u.chat,
                    reason: u.reason,
                }
            }
            server_frame::Kind::TokenExpiring(t) => Event::TokenExpiring {
                expires_at_ms: t.token_expires_at_ms,
            },
            server_frame::Kind::Disconnect(d) => return self.on_lost(Lost::disconnect(d)).await,
            other => {
                tracing::debug!(frame = ?other, "reply frame without a request id skipped");
                return;
            }
        };
        self.emit(event);
    }

    async fn on_reply(&mut self, pending: Pending, kind: server_frame::Kind) {
        let Pending { meta, reply } = pending;
        let result = match (meta, kind) {
            (Meta::Resubscribe { chat, since }, kind) => {
                return self.on_resubscribed(chat, since, kind).await;
            }
            (Meta::Subscribe { chat, since, token }, server_frame::Kind::SubscribeResult(r)) => {
                if token.is_empty() {
                    self.sub_tokens.remove(&chat);
                } else {
                    self.sub_tokens.insert(chat.clone(), token);
                }
                let position = r.position.clone().unwrap_or_default();
                if let Some(event) =
                    self.cursors
                        .on_position(&StreamId::Chat(chat), since, &position)
                {
                    self.emit(event);
                }
                Ok(server_frame::Kind::SubscribeResult(r))
            }
            (Meta::Unsubscribe { chat }, server_frame::Kind::Ok(ok)) => {
                self.cursors.forget(&chat);
                self.sub_tokens.remove(&chat);
                Ok(server_frame::Kind::Ok(ok))
            }
            (Meta::Refresh { token }, server_frame::Kind::RefreshResult(r)) => {
                self.config.token = token;
                Ok(server_frame::Kind::RefreshResult(r))
            }
            (meta, server_frame::Kind::Error(e)) => {
                if let Meta::Unsubscribe { chat } = meta
                    && e.code == 404
                {
                    // Not subscribed on the server: stop following it too.
                    self.cursors.forget(&chat);
                }
                Err(ClientError::Server {
                    code: e.code,
                    message: e.message,
                })
            }
            (_, other) => Ok(other),
        };
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    }

    async fn on_command(&mut self, command: Command) {
        match command {
            Command::Request { kind, reply } => self.on_request(kind, reply).await,
            Command::Positions(reply) => {
                let _ = reply.send(self.cursors.snapshot());
            }
            Command::Close(ack) => self.stop(Some(ack)).await,
        }
    }

    async fn on_request(&mut self, kind: client_frame::Kind, reply: oneshot::Sender<Reply>) {
        if reply.is_closed() {
            return; // the caller timed out while the command was queued
        }
        if self.pending.len() + self.stash.len() >= self.config.max_in_flight {
            self.pending.retain(|_, p| !p.abandoned());
            self.stash.retain(|(_, r)| !r.is_closed());
            if self.pending.len() + self.stash.len() >= self.config.max_in_flight {
                let _ = reply.send(Err(ClientError::TooManyInFlight));
                return;
            }
        }
        if self.usable() {
            let meta = Meta::of(&kind);
            self.write(
                kind,
                Pending {
                    meta,
                    reply: Some(reply),
                },
            )
            .await;
            return;
        }
        if let client_frame::Kind::Refresh(r) = &kind {
            // The next Connect carries the new token; the refresh itself is
            // sent once connected and its result answers the caller.
            self.config.token.clone_from(&r.token);
            if matches!(self.link, Link::Parked) {
                tracing::debug!("new token; reconnecting");
                self.dial();
            }
        }
        self.stash.push_back((kind, reply));
    }

    /// Sends the requests that waited for a connection.
    async fn flush_stash(&mut self) {
        while self.usable() {
            let Some((kind, reply)) = self.stash.pop_front() else {
                return;
            };
            if reply.is_closed() {
                continue;
            }
            let meta = Meta::of(&kind);
            self.write(
                kind,
                Pending {
                    meta,
                    reply: Some(reply),
                },
            )
            .await;
        }
    }

    /// Sends a request; false when the link was lost (and handled).
    async fn write(&mut self, kind: client_frame::Kind, pending: Pending) -> bool {
        let id = self.next_id();
        let Link::Open { ws, .. } = &mut self.link else {
            if let Some(reply) = pending.reply {
                let _ = reply.send(Err(ClientError::Disconnected));
            }
            return false;
        };
        self.pending.insert(id, pending);
        let frame = ClientFrame {
            id,
            kind: Some(kind),
        };
        match link::send(ws, self.config.encoding, &frame).await {
            Ok(()) => true,
            Err(e) => {
                self.on_lost(Lost::failed(e)).await;
                false
            }
        }
    }

    /// `Client::close`, or every handle dropped: close with 1000 and stop.
    async fn stop(&mut self, closer: Option<oneshot::Sender<()>>) {
        self.closers.extend(closer);
        if let Link::Open { ws, .. } = std::mem::replace(&mut self.link, Link::Stopped) {
            let frame = CloseFrame {
                code: CloseCode::Normal,
                reason: "closed by client".into(),
            };
            link::shut(*ws, Some(frame)).await;
        }
        self.fail_in_flight(|| ClientError::ClientClosed);
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(Err(ClientError::ClientClosed));
        }
        self.emit(Event::Disconnected {
            code: Some(1000),
            reason: "closed by client".into(),
            reconnect: false,
        });
    }

    /// After the link stopped: answer everyone still waiting, hand the last
    /// events to the app, and end the event stream by dropping its sender.
    async fn finish(mut self) {
        self.commands.close();
        for (_, reply) in self.stash.drain(..) {
            let _ = reply.send(Err(ClientError::ClientClosed));
        }
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Request { reply, .. } => {
                    let _ = reply.send(Err(ClientError::ClientClosed));
                }
                Command::Positions(reply) => {
                    let _ = reply.send(self.cursors.snapshot());
                }
                Command::Close(ack) => self.closers.push(ack),
            }
        }
        for closer in self.closers.drain(..) {
            let _ = closer.send(());
        }
        if !self.events_gone {
            for event in self.outbox.drain(..) {
                if self.events.send(event).await.is_err() {
                    break;
                }
            }
        }
    }
}
