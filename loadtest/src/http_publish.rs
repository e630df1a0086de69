//! The `channel` scenario with a backend's posts: N sockets subscribe to
//! one channel, and the posts go through the edge's `POST /api/publish`
//! over keep-alive connections, each one request at a time, back to back
//! (`--rate 0`) or at a fixed offered rate. Reports acked publishes per
//! second and the ack latency apart from the fan-out that follows: a
//! publish is acked once stored, whatever the audience (ADR 0027), so
//! the acks may run far ahead of the deliveries. Refused, unanswered,
//! late, lost, duplicated and out-of-order are counted apart.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use base64::Engine;
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use crate::{
    channel, conn,
    coord::Worker,
    recorder::{Counters, Recorder},
    report::{Report, now_us},
    sequence::Api,
};

/// Longest one publish request may take before its connection is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The distribution of ack latencies, from each post's scheduled send.
const ACK: &str = "ack";

#[derive(clap::Args)]
// Its own group id: the flattened channel::Args has the default one.
#[group(id = "http_publish_args")]
pub(crate) struct Args {
    #[command(flatten)]
    channel: channel::Args,
    #[command(flatten)]
    http: Http,
}

/// How the posts reach the edge's backend API.
#[derive(clap::Args, Clone)]
pub(crate) struct Http {
    /// The edge's API key (`SWITCHBOARD_API_KEY`).
    #[arg(long, default_value = "dev-key")]
    api_key: String,
    /// Keep-alive HTTP connections the posts are spread over, one request
    /// at a time on each.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    http_connections: u32,
}

pub(crate) async fn run(a: Args, w: &Worker) -> anyhow::Result<Report> {
    channel::run_as("http-publish", a.channel, channel::Poster::Http(a.http), w).await
}

impl Http {
    pub(crate) fn params(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("via".into(), json!("http"));
        m.insert("http_connections".into(), json!(self.http_connections));
        m
    }

    /// Posts every message of `a` (stamped with its scheduled send time
    /// and number) and returns how many were acked. The posts go out from
    /// a thread of their own, as from a backend process of their own: on
    /// the generator's runtime they would wait behind its subscribers'
    /// tasks, and their acks would be measured late.
    pub(crate) async fn post_all(
        &self,
        a: &channel::Args,
        rec: &Arc<Recorder>,
    ) -> anyhow::Result<u64> {
        let addr = a.publish_addr.unwrap_or(a.target.addr[0]);
        let total = a.messages as u64;
        let senders: Vec<Sender> = {
            let next = Arc::new(AtomicU64::new(0));
            let start = Instant::now();
            let start_us = now_us();
            rec.earliest("first_post", start_us);
            (0..self.http_connections.min(a.messages.max(1)))
                .map(|_| Sender {
                    rec: rec.clone(),
                    addr,
                    head: format!(
                        "POST /api/publish HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
                         Content-Type: application/json\r\n",
                        self.api_key
                    ),
                    chat: a.chat.clone(),
                    payload_bytes: a.payload_bytes,
                    payload: a.payload,
                    rate: a.rate,
                    total,
                    next: next.clone(),
                    start,
                    start_us,
                })
                .collect()
        };
        let (done, acked) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("http-posts".into())
            .spawn(move || {
                let posted = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map(|rt| {
                        rt.block_on(async {
                            let tasks: Vec<_> =
                                senders.into_iter().map(|s| tokio::spawn(s.run())).collect();
                            let mut acked = 0;
                            for t in tasks {
                                acked += t.await.unwrap_or(0);
                            }
                            acked
                        })
                    });
                let _ = done.send(posted);
            })
            .context("starting the posting thread")?;
        let acked = acked
            .await
            .context("the posting thread ended")?
            .context("the posting thread's runtime")?;
        Counters::add(&rec.kind(channel::CHANNEL).sent, total);
        rec.add_counter("posts_acked", acked);
        Ok(acked)
    }
}

/// One keep-alive connection taking post numbers in turn.
struct Sender {
    rec: Arc<Recorder>,
    addr: SocketAddr,
    head: String,
    chat: String,
    payload_bytes: usize,
    payload: channel::PayloadKind,
    /// Posts per second over all connections; 0: back to back.
    rate: u32,
    total: u64,
    next: Arc<AtomicU64>,
    start: Instant,
    start_us: u64,
}

impl Sender {
    /// Posts until every number is taken; returns how many it got acked.
    async fn run(self) -> u64 {
        let mut api = None;
        let mut acked = 0;
        loop {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            if n >= self.total {
                return acked;
            }
            // At a fixed rate each post has its slot; its latency counts
            // from the slot, so a slow answer delays no one's clock.
            let due_us = if self.rate > 0 {
                let offset = Duration::from_secs_f64(n as f64 / self.rate as f64);
                tokio::time::sleep_until(self.start + offset).await;
                self.start_us + offset.as_micros() as u64
            } else {
                now_us()
            };
            if api.is_none() {
                match Api::connect(self.addr).await {
                    Ok(c) => api = Some(c),
                    Err(_) => {
                        // This post is not sent: counted unanswered.
                        self.rec.add_counter("connect_errors", 1);
                        self.rec.add_counter("unanswered", 1);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
            let Some(conn) = api.as_mut() else { continue };
            let payload = match self.payload {
                channel::PayloadKind::Zeros => conn::stamped(self.payload_bytes, due_us, n),
                channel::PayloadKind::JsonChat => conn::stamped_chat(self.payload_bytes, due_us, n),
            };
            let body = json!({
                "chat": self.chat,
                "client_msg_id": format!("{}-{n}", conn::run_tag()),
                "payload": base64::engine::general_purpose::STANDARD.encode(&payload),
            })
            .to_string();
            // (status, duplicate) of the answer; None: no answer.
            let answer =
                match tokio::time::timeout(REQUEST_TIMEOUT, conn.post(&self.head, &body)).await {
                    Ok(Ok((status, body))) => {
                        let body: Value = serde_json::from_slice(body).unwrap_or_default();
                        Some((status, body["duplicate"].as_bool() == Some(true)))
                    }
                    Ok(Err(_)) | Err(_) => None,
                };
            match answer {
                Some((200, duplicate)) => {
                    let now = now_us();
                    acked += 1;
                    self.rec.sample(ACK, now.saturating_sub(due_us));
                    self.rec.latest("last_ack", now);
                    if duplicate {
                        self.rec.add_counter("publish_duplicates", 1);
                    }
                }
                Some((status, _)) => self.rec.add_counter(&format!("refused_{status}"), 1),
                None => {
                    self.rec.add_counter("unanswered", 1);
                    api = None;
                }
            }
        }
    }
}

/// The channel's figures, and the posts' acks apart from their fan-out.
pub(crate) fn figures(r: &Report) -> Map<String, Value> {
    let mut m = channel::figures(r);
    let d = r.kinds.get("channel").cloned().unwrap_or_default();
    let acked = r.counter("posts_acked");
    let window = Report::span_secs(
        r.earliest_us.get("first_post").copied().unwrap_or(0),
        r.latest_us.get("last_ack").copied().unwrap_or(0),
    );
    m.insert(
        "offered_publishes_per_second".into(),
        r.params.get("rate").cloned().unwrap_or_default(),
    );
    m.insert("publish_window_seconds".into(), json!(window));
    m.insert(
        "acked_publishes_per_second".into(),
        json!(window.filter(|s| *s > 0.0).map(|s| acked as f64 / s)),
    );
    m.insert(
        "ack_latency_ms".into(),
        r.hists.get(ACK).cloned().unwrap_or_default().summary(),
    );
    m.insert("unanswered".into(), json!(r.counter("unanswered")));
    m.extend(crate::accounting::apart(r, &d));
    m
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    /// Answers the requests of one keep-alive connection with `answers`,
    /// in turn; returns the bodies it got.
    async fn fake_api(answers: Vec<(u16, &'static str)>) -> (SocketAddr, Arc<Mutex<Vec<Value>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
        let bodies = seen.clone();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            for (status, body) in answers {
                let (head, len) = loop {
                    let mut headers = [httparse::EMPTY_HEADER; 16];
                    let mut req = httparse::Request::new(&mut headers);
                    if let httparse::Status::Complete(at) = req.parse(&buf).unwrap() {
                        let len: usize = req
                            .headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                            .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
                            .unwrap();
                        break (at, len);
                    }
                    let mut chunk = [0u8; 4096];
                    let n = s.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                };
                while buf.len() < head + len {
                    let mut chunk = [0u8; 4096];
                    let n = s.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                }
                bodies
                    .lock()
                    .unwrap()
                    .push(serde_json::from_slice(&buf[head..head + len]).unwrap());
                buf.drain(..head + len);
                let resp = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(resp.as_bytes()).await.unwrap();
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn acks_refusals_and_duplicates_are_counted_apart() {
        let (addr, seen) = fake_api(vec![
            (200, r#"{"seq":1,"duplicate":false}"#),
            (503, r#"{"error":{"code":503,"message":"busy"}}"#),
            (200, r#"{"seq":2,"duplicate":true}"#),
            (200, r#"{"seq":3,"duplicate":false}"#),
        ])
        .await;
        let rec = Recorder::new(&["channel"], 4);
        let sender = Sender {
            rec: rec.clone(),
            addr,
            head: format!("POST /api/publish HTTP/1.1\r\nHost: {addr}\r\n"),
            chat: "bench".into(),
            payload_bytes: 16,
            payload: channel::PayloadKind::Zeros,
            rate: 0,
            total: 4,
            next: Arc::new(AtomicU64::new(0)),
            start: Instant::now(),
            start_us: now_us(),
        };
        assert_eq!(sender.run().await, 3);
        rec.add_counter("posts_acked", 3);
        rec.earliest("first_post", now_us() - 1000);
        let r = rec.report("http-publish", json!({"rate": 0}), Default::default());
        assert_eq!(r.counter("publish_duplicates"), 1);
        assert_eq!(r.counter("unanswered"), 0);
        let f = figures(&r);
        assert_eq!(f["refused"], json!({"503": 1}));
        assert_eq!(f["ack_latency_ms"]["samples"], 3);
        assert!(f["acked_publishes_per_second"].as_f64().unwrap() > 0.0);
        // Each post is stamped with its number and send time.
        let seen = seen.lock().unwrap();
        let posts: Vec<u64> = seen
            .iter()
            .map(|b| {
                let p = base64::engine::general_purpose::STANDARD
                    .decode(b["payload"].as_str().unwrap())
                    .unwrap();
                conn::stamp(&p).unwrap().1
            })
            .collect();
        assert_eq!(posts, [0, 1, 2, 3]);
        assert_eq!(seen[0]["chat"], "bench");
    }
}
