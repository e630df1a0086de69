//! Getting a session: dial, Connect, and after a reconnect re-subscribe
//! every followed chat before the session counts as live again.
use std::time::Duration;

use tokio::time::Instant;

use super::{Actor, Link, Meta, Pending, Phase, Resume, lost::Lost};
use crate::{
    client::{
        ClientError, Event,
        error::retryable_code,
        event::{Cursor, ResubscribeFailure, StreamId},
        link::{self, Ws},
    },
    v1::{self, ClientFrame, StreamPosition, client_frame, server_frame},
};

/// The server pings every `interval_ms` and closes a socket silent for two
/// intervals; the client gives it the same two, plus half of one for the
/// network.
fn silence_limit(interval_ms: u32) -> Option<Duration> {
    (interval_ms > 0).then(|| Duration::from_millis(u64::from(interval_ms)) * 5 / 2)
}

impl Actor {
    pub(super) fn dial(&mut self) {
        let fallbacks = &self.config.fallback_urls;
        let url = match self.dials % (1 + fallbacks.len()) {
            0 => self.config.url.clone(),
            i => fallbacks[i - 1].clone(),
        };
        self.dials = self.dials.wrapping_add(1);
        let future = link::dial(
            url,
            self.config.encoding,
            self.config.deflate,
            self.config.tls.clone(),
        );
        self.link = Link::Dialing {
            future: Box::pin(future),
            deadline: Instant::now() + self.config.request_timeout,
        };
    }

    /// Sends Connect, resuming the personal stream from its cursor (on the
    /// first connect: from the config).
    pub(super) async fn on_dialed(&mut self, mut ws: Ws) {
        let (since, epoch) = if self.ready.is_some() {
            (self.config.user_since, self.config.user_epoch.clone())
        } else {
            let c = self.cursors.personal();
            (Some(c.seq), c.epoch.clone())
        };
        let id = self.next_id();
        let frame = ClientFrame {
            id,
            kind: Some(client_frame::Kind::Connect(v1::Connect {
                token: self.config.token.clone(),
                client_name: self.config.client_name.clone(),
                client_version: self.config.client_version.clone(),
                user_since: since,
                user_epoch: epoch,
            })),
        };
        let sent = link::send(&mut ws, self.config.encoding, &frame).await;
        self.link = Link::Open {
            ws: Box::new(ws),
            phase: Phase::Connecting {
                id,
                since,
                deadline: Instant::now() + self.config.request_timeout,
            },
            heard: Instant::now(),
            silence: None,
        };
        if let Err(e) = sent {
            self.on_lost(Lost::failed(e)).await;
        }
    }

    pub(super) async fn on_connect_reply(&mut self, since: Option<u64>, kind: server_frame::Kind) {
        let result = match kind {
            server_frame::Kind::ConnectResult(r) => r,
            server_frame::Kind::Error(e) => return self.on_lost(Lost::refused(e)).await,
            other => {
                let error =
                    ClientError::Protocol(format!("unexpected reply to Connect: {other:?}"));
                return self.on_lost(Lost::failed(error)).await;
            }
        };
        tracing::Span::current().record("session", result.session_id.as_str());
        if let Link::Open { silence, .. } = &mut self.link {
            *silence = silence_limit(result.heartbeat_interval_ms);
        }
        let user_stream = result.user_stream.clone().unwrap_or_default();
        if let Some(event) = self
            .cursors
            .on_position(&StreamId::Personal, since, &user_stream)
        {
            self.emit(event);
        }
        self.session.send_replace(result);
        if let Some(ready) = self.ready.take() {
            // The first session: nothing to re-subscribe yet.
            let _ = ready.send(Ok(()));
            self.go_live();
            self.flush_stash().await;
            return;
        }
        let chats: Vec<(String, Cursor)> = self
            .cursors
            .chats()
            .map(|(chat, cursor)| (chat.clone(), cursor.clone()))
            .collect();
        tracing::debug!(chats = chats.len(), "reconnected; re-subscribing");
        if let Link::Open { phase, .. } = &mut self.link {
            *phase = Phase::Resuming(Resume {
                outstanding: chats.len(),
                deadline: Instant::now() + self.config.request_timeout,
                user_stream,
                resubscribed: Vec::with_capacity(chats.len()),
                failed: Vec::new(),
            });
        }
        // Pipelined: every Subscribe goes out before the first reply.
        for (chat, cursor) in chats {
            let kind = client_frame::Kind::Subscribe(v1::Subscribe {
                token: self.sub_tokens.get(&chat).cloned().unwrap_or_default(),
                chat: chat.clone(),
                since: Some(cursor.seq),
                epoch: cursor.epoch,
            });
            let meta = Meta::Resubscribe {
                chat,
                since: Some(cursor.seq),
            };
            if !self.write(kind, Pending { meta, reply: None }).await {
                return;
            }
        }
        self.resumed_one(None).await;
        self.flush_stash().await;
    }

    pub(super) fn go_live(&mut self) {
        if let Link::Open { phase, .. } = &mut self.link {
            *phase = Phase::Live;
        }
        self.live_since = Some(Instant::now());
    }

    /// Counts a re-subscribe reply (`None`: only checks whether any are
    /// outstanding); after the last one the session is live again.
    pub(super) async fn resumed_one(
        &mut self,
        outcome: Option<Result<(String, StreamPosition), ResubscribeFailure>>,
    ) {
        let Link::Open {
            phase: Phase::Resuming(resume),
            ..
        } = &mut self.link
        else {
            return;
        };
        if let Some(outcome) = outcome {
            resume.outstanding = resume.outstanding.saturating_sub(1);
            match outcome {
                Ok(done) => resume.resubscribed.push(done),
                Err(failure) => resume.failed.push(failure),
            }
        }
        if resume.outstanding > 0 {
            return;
        }
        let Resume {
            user_stream,
            resubscribed,
            failed,
            ..
        } = std::mem::replace(
            resume,
            Resume {
                outstanding: 0,
                deadline: Instant::now(),
                user_stream: StreamPosition::default(),
                resubscribed: Vec::new(),
                failed: Vec::new(),
            },
        );
        tracing::debug!(
            resubscribed = resubscribed.len(),
            failed = failed.len(),
            "session resumed"
        );
        self.go_live();
        self.emit(Event::Reconnected {
            user_stream,
            resubscribed,
            failed,
        });
    }

    pub(super) async fn on_resubscribed(
        &mut self,
        chat: String,
        since: Option<u64>,
        kind: server_frame::Kind,
    ) {
        let outcome = match kind {
            server_frame::Kind::SubscribeResult(r) => {
                let position = r.position.unwrap_or_default();
                let stream = StreamId::Chat(chat.clone());
                if let Some(event) = self.cursors.on_position(&stream, since, &position) {
                    self.emit(event);
                }
                Ok((chat, position))
            }
            server_frame::Kind::Error(e) if retryable_code(e.code) => {
                // Try the whole resume again rather than lose the chat.
                let error = ClientError::Server {
                    code: e.code,
                    message: e.message,
                };
                return self.on_lost(Lost::failed(error)).await;
            }
            server_frame::Kind::Error(e) => {
                tracing::debug!(%chat, code = e.code, "chat refused on re-subscribe");
                self.cursors.forget(&chat);
                Err(ResubscribeFailure {
                    chat,
                    code: e.code,
                    message: e.message,
                })
            }
            other => {
                let error =
                    ClientError::Protocol(format!("unexpected reply to Subscribe: {other:?}"));
                return self.on_lost(Lost::failed(error)).await;
            }
        };
        self.resumed_one(Some(outcome)).await;
    }
}
