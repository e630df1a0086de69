//! One channel with N subscribers; one publisher posts M messages at a
//! rate. Reports the latency of every delivery and, per post, the time
//! from the post to its last delivery.
//!
//! With workers, the subscribers are split among them and worker 0 alone
//! publishes, once every worker's subscribers are in. The posts go over
//! a WebSocket here, as a client publishes; `http-publish` runs the same
//! scenario with a backend's posts through `POST /api/publish`.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use serde_json::{Map, Value, json};
use switchboard_protocol::client::full_jitter_delay;
use switchboard_protocol::v1::{
    ClientFrame, Publish, Subscribe, client_frame, publish, server_frame,
};
use tokio::{
    sync::{Semaphore, watch},
    time::Instant,
};

use crate::{
    accounting::{Seen, Tracker},
    conn,
    coord::Worker,
    recorder::{Counters, Recorder},
    report::{Report, now_us},
    sys::{Pids, Probe},
};

/// The only kind of traffic here.
pub(crate) const CHANNEL: usize = 0;

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    pub(crate) target: conn::Target,
    #[command(flatten)]
    pids: Pids,
    /// Where the publisher connects (default: the first --addr).
    #[arg(long)]
    pub(crate) publish_addr: Option<SocketAddr>,
    /// The chat (channel) to use.
    #[arg(long, default_value = "bench")]
    pub(crate) chat: String,
    /// Prefix of subscriber user names (`PREFIX-N`, N unique over workers).
    #[arg(long, default_value = "fan")]
    user_prefix: String,
    /// Only subscribe and count; another process publishes.
    #[arg(long)]
    no_publish: bool,
    /// Extra seconds to wait, once every worker's subscribers are ready,
    /// before publishing. The edges' CPU over this pause is reported apart
    /// (`edge_cpu_idle_seconds`): what the held sockets cost with no post.
    #[arg(long, default_value_t = 0)]
    publish_after_secs: u64,
    /// Subscribers of the chat (over all workers).
    #[arg(long, default_value_t = 10_000)]
    subscribers: u32,
    /// Messages to post.
    #[arg(long, default_value_t = 100)]
    pub(crate) messages: u32,
    /// Posts per second (http-publish: 0 sends them back to back over its
    /// connections).
    #[arg(long, default_value_t = 20)]
    pub(crate) rate: u32,
    /// Payload size, bytes (at least 16: it carries the send time).
    #[arg(long, default_value_t = 64)]
    pub(crate) payload_bytes: usize,
    /// What a post's payload holds after its 16-byte stamp: zeros, or a
    /// realistic JSON chat message (what compression is measured on).
    #[arg(long, value_enum, default_value_t = PayloadKind::Zeros)]
    pub(crate) payload: PayloadKind,
    /// Longest wait for the subscribers to be ready, and for deliveries
    /// after the last post.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// A delivery received later than this after its post is counted late
    /// (and still received), ms.
    #[arg(long, default_value_t = 10_000)]
    window_ms: u64,
}

/// The content of a post's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum PayloadKind {
    /// Zeros after the stamp.
    Zeros,
    /// A JSON chat message after the stamp (`conn::stamped_chat`).
    JsonChat,
}

impl PayloadKind {
    fn as_str(self) -> &'static str {
        match self {
            PayloadKind::Zeros => "zeros",
            PayloadKind::JsonChat => "json-chat",
        }
    }
}

impl Args {
    fn params(&self) -> Value {
        json!({
            "addr": self.target.addr.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "chat": self.chat,
            "subscribers": self.subscribers,
            "messages": self.messages,
            "rate": self.rate,
            "payload_bytes": self.payload_bytes.max(16),
            "payload": self.payload.as_str(),
            "deflate": self.target.deflate,
            "no_publish": self.no_publish,
            "window_ms": self.window_ms,
            "publish_after_secs": self.publish_after_secs,
        })
    }
}

/// How the posts go out.
pub(crate) enum Poster {
    /// Over one WebSocket, as a client publishes.
    Socket,
    /// Through the backend API of the edge.
    Http(crate::http_publish::Http),
}

pub(crate) async fn run(a: Args, w: &Worker) -> anyhow::Result<Report> {
    run_as("channel", a, Poster::Socket, w).await
}

/// The scenario, named `scenario` in its report, with posts sent by `poster`.
pub(crate) async fn run_as(
    scenario: &str,
    a: Args,
    poster: Poster,
    w: &Worker,
) -> anyhow::Result<Report> {
    let rec = Recorder::new(&["channel"], a.messages as usize);
    let mem_before = Probe::take_if(w.is_first(), &a.pids);
    w.barrier("start", 0).await?;
    let sources = Arc::new(
        a.target
            .sources(w.index, Duration::from_secs(a.timeout_secs)),
    );
    let gate = Arc::new(Semaphore::new(a.target.concurrency));
    let ready = Arc::new(AtomicU64::new(0));
    let gave_up = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop) = watch::channel(false);
    let mine = w.slice(a.subscribers as u64);
    let local = mine.end - mine.start;
    let timeout = Duration::from_secs(a.timeout_secs);
    let mut tasks = Vec::new();
    for i in mine {
        let permit = gate.clone().acquire_owned().await?;
        let sub = Subscriber {
            rec: rec.clone(),
            retries: a.target.retries,
            sources: sources.clone(),
            addr: a.target.addr_for(i as usize),
            token: conn::token(&a.target.secret, &format!("{}-{i}", a.user_prefix)),
            chat: a.chat.clone(),
            messages: a.messages as u64,
            late_after_us: a.window_ms * 1000,
            ready: ready.clone(),
            stop: stop.clone(),
        };
        let gave_up = gave_up.clone();
        tasks.push(tokio::spawn(async move {
            let r = sub.run(permit).await;
            if let Err(e) = &r {
                gave_up.fetch_add(1, Ordering::Relaxed);
                eprintln!("subscriber gave up: {e:#}");
            }
        }));
    }
    let deadline = Instant::now() + timeout;
    loop {
        let (r, g) = (
            ready.load(Ordering::Relaxed),
            gave_up.load(Ordering::Relaxed),
        );
        if r + g >= local {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {r} of {local} subscribers ready after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready_n = ready.load(Ordering::Relaxed);
    eprintln!("{ready_n} of {local} subscribers ready");
    rec.add_counter("subscribed", ready_n);
    w.barrier("subscribed", 0).await?;
    let mem_after = Probe::take_if(w.is_first(), &a.pids);
    tokio::time::sleep(Duration::from_secs(a.publish_after_secs)).await;
    // The per-delivery CPU figures count from here: the publisher's
    // connect is a connect, but small next to the subscribers'.
    let cpu_before = Probe::take_if(w.is_first(), &a.pids);
    let wire_before = conn::wire_bytes_read();
    // Kept open until every subscriber is done: closing a socket with
    // unread acks sends a RST, which would discard the last publishes.
    let mut kept_publisher = None;
    let mut posts = 0;
    if w.is_first() {
        if a.no_publish {
            posts = a.messages as u64;
        } else if let Poster::Http(http) = &poster {
            // Only acked posts are owed (a refused one was not stored).
            posts = http.post_all(&a, &rec).await?;
        } else {
            let (ws, sent, refused) = publish(&a, &sources, &rec).await?;
            kept_publisher = Some(ws);
            // A post refused for good owes nothing.
            posts = sent - refused;
        }
    }
    let posts = w.barrier("published", posts).await?;
    Counters::add(&rec.kind(CHANNEL).expected, posts * ready_n);
    let deadline = Instant::now() + timeout;
    while !rec.kind(CHANNEL).complete() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every worker has its last delivery (or gave up): the delivery
    // window ends here, before the sockets close.
    w.barrier("delivered", 0).await?;
    let cpu_after = Probe::take_if(w.is_first(), &a.pids);
    // What this worker's sockets read in the delivery window: the
    // deliveries, and the publisher's acks (a few bytes per post).
    rec.add_counter("wire_bytes_read", conn::wire_bytes_read() - wire_before);
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    w.barrier("drained", 0).await?;
    drop(kept_publisher);
    let server = Probe::server_apart(
        (mem_before, mem_after),
        (mem_before, mem_after),
        (cpu_before, cpu_after),
    );
    let server = if a.publish_after_secs > 0 {
        Probe::with_idle(server, (mem_after, cpu_before))
    } else {
        server
    };
    let mut params = a.params();
    if let (Poster::Http(http), Value::Object(m)) = (&poster, &mut params) {
        m.extend(http.params());
    }
    Ok(rec.report(scenario, params, server))
}

/// Posts `messages` stamped posts at `rate`; returns the socket (to be
/// kept open) and how many went out.
async fn publish(
    a: &Args,
    sources: &conn::Sources,
    rec: &Arc<Recorder>,
) -> anyhow::Result<(conn::Ws, u64, u64)> {
    let addr = a.publish_addr.unwrap_or(a.target.addr[0]);
    let name = format!("{}-publisher", a.user_prefix);
    let token = conn::token(&a.target.secret, &name);
    let mut ws = conn::open_counted(rec, addr, sources, token)
        .await
        .context("connecting the publisher")?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / a.rate.max(1) as f64));
    let (mut sent, mut acked, mut errors) = (0u64, 0u64, 0u64);
    // Posts refused for good; (when, post) of those to send again, with
    // the same client message id and stamp; retries per post.
    let mut refused = 0u64;
    let mut retry: Vec<(Instant, u64, u64)> = Vec::new();
    let mut retries: std::collections::HashMap<u64, u32> = Default::default();
    let total = a.messages as u64;
    let acks_until = tokio::time::sleep(Duration::MAX);
    tokio::pin!(acks_until);
    rec.earliest("first_post", now_us());
    let post = |n: u64, sent_us: u64| {
        let p = Publish {
            target: Some(publish::Target::Chat(a.chat.clone())),
            client_msg_id: format!("{}-{n}", conn::run_tag()),
            payload: match a.payload {
                PayloadKind::Zeros => conn::stamped(a.payload_bytes, sent_us, n),
                PayloadKind::JsonChat => conn::stamped_chat(a.payload_bytes, sent_us, n),
            },
        };
        ClientFrame {
            id: n as u32 + 10,
            kind: Some(client_frame::Kind::Publish(p)),
        }
    };
    let mut stamps: std::collections::HashMap<u64, u64> = Default::default();
    while acked + refused < total {
        let next_retry = retry.iter().map(|r| r.0).min();
        tokio::select! {
            _ = tokio::time::sleep_until(next_retry.unwrap_or_else(Instant::now)), if next_retry.is_some() => {
                let now = Instant::now();
                let due: Vec<(u64, u64)> = retry.iter().filter(|r| r.0 <= now).map(|r| (r.1, r.2)).collect();
                retry.retain(|r| r.0 > now);
                for (n, sent_us) in due {
                    rec.add_counter("publish_retries", 1);
                    conn::send(&mut ws, post(n, sent_us)).await?;
                }
            }
            _ = tick.tick(), if sent < total => {
                let sent_us = now_us();
                stamps.insert(sent, sent_us);
                conn::send(&mut ws, post(sent, sent_us)).await?;
                sent += 1;
                if sent == total {
                    acks_until.as_mut().reset(Instant::now() + Duration::from_secs(10));
                }
            }
            f = conn::recv(&mut ws) => { let f = f.context("publisher socket")?; match f.kind {
                Some(server_frame::Kind::PublishAck(ack)) => {
                    acked += 1;
                    if ack.duplicate {
                        eprintln!("post {} was taken for a duplicate", ack.seq);
                        rec.add_counter("publish_duplicates", 1);
                    }
                }
                Some(server_frame::Kind::Error(e)) => {
                    errors += 1;
                    let n = u64::from(f.id.saturating_sub(10));
                    let tries = retries.entry(n).or_default();
                    match stamps.get(&n) {
                        Some(&sent_us) if conn::retryable_code(e.code) && *tries < conn::PUBLISH_RETRIES => {
                            let wait = conn::publish_retry_wait(*tries);
                            *tries += 1;
                            retry.push((Instant::now() + wait, n, sent_us));
                        }
                        _ => {
                            refused += 1;
                            rec.add_counter(&format!("refused_{}", e.code), 1);
                            eprintln!("publish refused: {} {}", e.code, e.message);
                        }
                    }
                }
                _ => {}
            }},
            _ = &mut acks_until => {
                eprintln!("{} of {sent} posts unacknowledged after 10 s", sent - acked - errors);
                break;
            }
        }
    }
    Counters::add(&rec.kind(CHANNEL).sent, sent);
    rec.add_counter("posts_acked", acked);
    rec.add_counter("publish_errors", errors);
    Ok((ws, sent, refused))
}

/// First and largest backoff step between a subscriber's attempts.
const RETRY_BASE: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(8);

/// A retried failure is not an error of the run; only the first few are
/// printed, so a storm of them does not flood the log.
fn tracing_retry(e: &anyhow::Error) {
    static SHOWN: AtomicU64 = AtomicU64::new(0);
    if SHOWN.fetch_add(1, Ordering::Relaxed) < 5 {
        eprintln!("subscriber retrying after: {e:#}");
    }
}

/// One subscriber socket.
struct Subscriber {
    rec: Arc<Recorder>,
    retries: u32,
    sources: Arc<conn::Sources>,
    addr: SocketAddr,
    token: String,
    chat: String,
    messages: u64,
    /// Latency beyond which a delivery is counted late, µs.
    late_after_us: u64,
    ready: Arc<AtomicU64>,
    stop: watch::Receiver<bool>,
}

impl Subscriber {
    /// Connects and subscribes, retrying a transient failure after a
    /// full-jitter backoff (as apps do).
    async fn join(&self) -> anyhow::Result<conn::Ws> {
        let mut attempt = 0;
        loop {
            let joined = async {
                let mut ws =
                    conn::open_counted(&self.rec, self.addr, &self.sources, self.token.clone())
                        .await?;
                let sub = Subscribe {
                    chat: self.chat.clone(),
                    ..Default::default()
                };
                let frame = ClientFrame {
                    id: 2,
                    kind: Some(client_frame::Kind::Subscribe(sub)),
                };
                conn::request(&mut ws, frame).await?;
                anyhow::Ok(ws)
            }
            .await;
            match joined {
                Err(e) if attempt < self.retries => {
                    self.rec.add_counter("connect_retries", 1);
                    let wait = full_jitter_delay(&mut rand::rng(), RETRY_BASE, RETRY_MAX, attempt);
                    attempt += 1;
                    tracing_retry(&e);
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }

    async fn run(mut self, permit: tokio::sync::OwnedSemaphorePermit) -> anyhow::Result<()> {
        let mut ws = self.join().await?;
        drop(permit);
        self.ready.fetch_add(1, Ordering::Relaxed);
        let counters = self.rec.kind(CHANNEL);
        let mut tracker = Tracker::default();
        let mut samples = self.rec.samples();
        let mut got = 0u64;
        while got < self.messages {
            let frame = tokio::select! {
                f = conn::recv(&mut ws) => match f { Ok(f) => f, Err(_) => break },
                _ = crate::coord::stopped(&mut self.stop) => break,
            };
            let Some(server_frame::Kind::Delivery(d)) = frame.kind else {
                continue;
            };
            let now = now_us();
            match tracker.observe(d.seq) {
                Seen::Duplicate => {
                    Counters::add(&counters.duplicated, 1);
                    continue;
                }
                Seen::Late => Counters::add(&counters.out_of_order, 1),
                Seen::New => {}
            }
            got += 1;
            Counters::add(&counters.received, 1);
            if let Some((sent, post)) = conn::stamp(&d.payload) {
                samples.latency(CHANNEL, sent, now);
                self.rec.post_delivered(post, sent, now);
                if now.saturating_sub(sent) > self.late_after_us {
                    Counters::add(&counters.late, 1);
                }
            }
        }
        // Held open until every subscriber is done: a million sockets
        // closing while others still receive would be measured as fan-out.
        crate::coord::stopped(&mut self.stop).await;
        Ok(())
    }
}

/// Channel-specific figures of a (merged) report.
pub(crate) fn figures(r: &Report) -> Map<String, Value> {
    let d = r.kinds.get("channel").cloned().unwrap_or_default();
    let subscribed = r.counter("subscribed");
    let last_delivery = r.posts.values().map(|p| p.last_us).max().unwrap_or(0);
    let first_post = r.earliest_us.get("first_post").copied().unwrap_or(0);
    let span = Report::span_secs(first_post, last_delivery);
    let times = r.post_times();
    let cpu = r.server.edge_cpu_seconds.filter(|c| *c > 0.0);
    let mut m = Map::new();
    m.insert("subscribers".into(), json!(subscribed));
    m.insert("messages".into(), json!(d.sent));
    m.insert("posts_acked".into(), json!(r.counter("posts_acked")));
    m.insert("publish_errors".into(), json!(r.counter("publish_errors")));
    m.insert(
        "publish_retries".into(),
        json!(r.counter("publish_retries")),
    );
    m.insert(
        "refused".into(),
        crate::accounting::apart(r, &d)["refused"].clone(),
    );
    m.insert(
        "publish_duplicates".into(),
        json!(r.counter("publish_duplicates")),
    );
    m.insert("seconds_first_post_to_last_delivery".into(), json!(span));
    m.insert(
        "deliveries_per_second".into(),
        json!(span.filter(|s| *s > 0.0).map(|s| d.received as f64 / s)),
    );
    m.insert(
        "deliveries_per_edge_cpu_second".into(),
        json!(cpu.map(|c| d.received as f64 / c)),
    );
    m.insert(
        "wire_bytes_per_delivery".into(),
        json!((d.received > 0).then(|| r.counter("wire_bytes_read") as f64 / d.received as f64)),
    );
    m.insert(
        "posts_fully_delivered".into(),
        json!(times.iter().filter(|(_, _, n)| *n >= subscribed).count()),
    );
    m.insert(
        "time_to_last_delivery_ms_worst_post".into(),
        json!(times.iter().map(|(_, ms, _)| *ms).reduce(f64::max)),
    );
    m
}

#[cfg(test)]
mod tests {
    //! The generator's accounting against a small in-process server that
    //! misbehaves on purpose: duplicates, reordering, a lost message.
    use futures_util::{SinkExt, StreamExt};
    use switchboard_protocol::{
        Encoding,
        v1::{ConnectResult, Delivery, ServerFrame, SubscribeResult},
    };
    use tokio_tungstenite::tungstenite::{
        Message,
        handshake::server::{Request, Response},
        http::HeaderValue,
    };

    use super::*;

    /// Serves one socket: answers Connect and Subscribe, then sends
    /// deliveries with these seqs and keeps the socket open.
    // tungstenite's header callback returns its large error type by value.
    #[allow(clippy::result_large_err)]
    async fn misbehaving_server(seqs: Vec<u64>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let pick = |_: &Request, mut resp: Response| {
                resp.headers_mut().insert(
                    "Sec-WebSocket-Protocol",
                    HeaderValue::from_static(Encoding::PROTOBUF_SUBPROTOCOL),
                );
                Ok(resp)
            };
            let mut ws = tokio_tungstenite::accept_hdr_async(tcp, pick)
                .await
                .unwrap();
            let reply = |id, kind| {
                Message::binary(Encoding::Protobuf.encode_server(&ServerFrame {
                    id,
                    kind: Some(kind),
                }))
            };
            ws.next().await.unwrap().unwrap(); // connect
            ws.send(reply(
                1,
                server_frame::Kind::ConnectResult(ConnectResult::default()),
            ))
            .await
            .unwrap();
            ws.next().await.unwrap().unwrap(); // subscribe, id 2
            ws.send(reply(
                2,
                server_frame::Kind::SubscribeResult(SubscribeResult::default()),
            ))
            .await
            .unwrap();
            for seq in seqs {
                let d = Delivery {
                    chat: "bench".into(),
                    seq,
                    payload: conn::stamped(16, now_us(), seq - 1),
                    ..Default::default()
                };
                ws.send(reply(0, server_frame::Kind::Delivery(d)))
                    .await
                    .unwrap();
            }
            // Hold the socket until the client gives up.
            while ws.next().await.is_some() {}
        });
        addr
    }

    fn args(addr: SocketAddr, messages: u32) -> Args {
        Args {
            target: conn::Target {
                addr: vec![addr],
                secret: "s".into(),
                concurrency: 1,
                sources: 1,
                retries: 0,
                no_retry: false,
                deflate: false,
            },
            pids: Pids::default(),
            publish_addr: None,
            chat: "bench".into(),
            user_prefix: "t".into(),
            no_publish: true,
            publish_after_secs: 0,
            subscribers: 1,
            messages,
            rate: 1,
            payload_bytes: 16,
            payload: PayloadKind::Zeros,
            timeout_secs: 2,
            window_ms: 10_000,
        }
    }

    #[tokio::test]
    async fn counts_duplicates_and_late_arrivals() {
        let addr = misbehaving_server(vec![1, 2, 2, 4, 3, 5]).await;
        let r = run(args(addr, 5), &Worker::alone()).await.unwrap().render();
        assert_eq!(r["deliveries_received"], 5);
        assert_eq!(r["duplicated"], 1);
        assert_eq!(r["out_of_order"], 1);
        assert_eq!(r["lost"], 0);
    }

    /// Serves a publisher: refuses each post's first publish with
    /// `code`, acks the next; returns the client message ids it saw.
    #[allow(clippy::result_large_err)]
    async fn refusing_server(code: u32) -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let ids = seen.clone();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let pick = |_: &Request, mut resp: Response| {
                resp.headers_mut().insert(
                    "Sec-WebSocket-Protocol",
                    HeaderValue::from_static(Encoding::PROTOBUF_SUBPROTOCOL),
                );
                Ok(resp)
            };
            let mut ws = tokio_tungstenite::accept_hdr_async(tcp, pick)
                .await
                .unwrap();
            while let Some(Ok(Message::Binary(b))) = ws.next().await {
                let f = Encoding::Protobuf.decode_client(&b, false).unwrap();
                let kind = match f.kind {
                    Some(client_frame::Kind::Connect(_)) => {
                        server_frame::Kind::ConnectResult(ConnectResult::default())
                    }
                    Some(client_frame::Kind::Publish(p)) => {
                        let mut seen = ids.lock().unwrap();
                        let again = seen.contains(&p.client_msg_id);
                        seen.push(p.client_msg_id);
                        if again {
                            server_frame::Kind::PublishAck(Default::default())
                        } else {
                            server_frame::Kind::Error(switchboard_protocol::v1::Error {
                                code,
                                message: "busy".into(),
                            })
                        }
                    }
                    _ => continue,
                };
                let frame = ServerFrame {
                    id: f.id,
                    kind: Some(kind),
                };
                let bytes = Encoding::Protobuf.encode_server(&frame);
                ws.send(Message::binary(bytes)).await.unwrap();
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn a_post_refused_with_503_is_sent_again_with_its_id() {
        let (addr, seen) = refusing_server(503).await;
        let mut a = args(addr, 3);
        a.rate = 50;
        let rec = Recorder::new(&["channel"], 3);
        let (_ws, sent, refused) = publish(&a, &conn::Sources::new(1, 0), &rec).await.unwrap();
        assert_eq!((sent, refused), (3, 0));
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 6, "{seen:?}");
        for id in &seen {
            assert_eq!(seen.iter().filter(|x| *x == id).count(), 2, "{seen:?}");
        }
        let r = rec.report("channel", Value::Null, Default::default());
        assert_eq!(r.counter("publish_retries"), 3);
        assert_eq!(r.counter("posts_acked"), 3);
    }

    #[tokio::test]
    async fn a_post_refused_for_good_is_counted_by_code() {
        let (addr, seen) = refusing_server(403).await;
        let rec = Recorder::new(&["channel"], 2);
        let (_ws, sent, refused) = publish(&args(addr, 2), &conn::Sources::new(1, 0), &rec)
            .await
            .unwrap();
        assert_eq!((sent, refused), (2, 2));
        assert_eq!(seen.lock().unwrap().len(), 2);
        let r = rec.report("channel", Value::Null, Default::default());
        assert_eq!(r.counter("refused_403"), 2);
        assert_eq!(r.counter("publish_retries"), 0);
    }

    #[tokio::test]
    async fn counts_a_lost_message() {
        let addr = misbehaving_server(vec![1, 2, 4, 5]).await;
        let r = run(args(addr, 5), &Worker::alone()).await.unwrap().render();
        assert_eq!(r["deliveries_received"], 4);
        assert_eq!(r["lost"], 1);
        assert_eq!(
            (r["duplicated"].as_u64(), r["out_of_order"].as_u64()),
            (Some(0), Some(0))
        );
    }
}
