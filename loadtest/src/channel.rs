//! One chat with N subscribers; one publisher posts M messages at a rate.
use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::Serialize;
use switchboard_protocol::v1::{
    ClientFrame, Publish, Subscribe, client_frame, publish, server_frame,
};
use tokio::sync::Semaphore;

use crate::{
    accounting::{Seen, Tracker},
    conn, sys,
};

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    target: conn::Target,
    /// Where the publisher connects (default: the first --addr).
    #[arg(long)]
    publish_addr: Option<SocketAddr>,
    /// The chat (channel) to use.
    #[arg(long, default_value = "bench")]
    chat: String,
    /// Prefix of subscriber user names (unique per worker process).
    #[arg(long, default_value = "fan")]
    user_prefix: String,
    /// Only subscribe and count; another process publishes.
    #[arg(long)]
    no_publish: bool,
    /// Seconds to wait after all local subscribers are ready before
    /// publishing (lets other worker processes finish connecting).
    #[arg(long, default_value_t = 0)]
    publish_after_secs: u64,
    /// Subscribers of the chat.
    #[arg(long, default_value_t = 10_000)]
    subscribers: u32,
    /// Messages to post.
    #[arg(long, default_value_t = 100)]
    messages: u32,
    /// Posts per second.
    #[arg(long, default_value_t = 20)]
    rate: u32,
    /// Payload size, bytes (at least 16: it carries the send time).
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
    /// Give up waiting for deliveries after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// Edge process id, to read its CPU time.
    #[arg(long)]
    edge_pid: Option<u32>,
}

#[derive(Serialize)]
struct Report {
    scenario: &'static str,
    subscribers: u64,
    messages: u32,
    deliveries_expected: u64,
    deliveries_received: u64,
    lost: u64,
    duplicated: u64,
    out_of_order: u64,
    seconds_first_post_to_last_delivery: f64,
    deliveries_per_second: f64,
    edge_cpu_seconds: Option<f64>,
    deliveries_per_edge_cpu_second: Option<f64>,
    latency_ms: Percentiles,
}

#[derive(Serialize)]
struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

pub(crate) async fn run(a: Args) -> anyhow::Result<serde_json::Value> {
    let sources = Arc::new(conn::Sources::new(a.target.sources));
    let gate = Arc::new(Semaphore::new(a.target.concurrency));
    let received = Arc::new(AtomicU64::new(0));
    let duplicated = Arc::new(AtomicU64::new(0));
    let out_of_order = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(AtomicU64::new(0));
    let last_delivery_us = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(a.timeout_secs);
    let mut tasks = Vec::new();
    for i in 0..a.subscribers {
        let permit = gate.clone().acquire_owned().await?;
        let sources = sources.clone();
        let token = conn::token(&a.target.secret, &format!("{}-{i}", a.user_prefix));
        let (received, duplicated, out_of_order, ready, last_us, hist) = (
            received.clone(),
            duplicated.clone(),
            out_of_order.clone(),
            ready.clone(),
            last_delivery_us.clone(),
            hist.clone(),
        );
        let (addr, messages) = (a.target.addr_for(i as usize), a.messages as u64);
        let chat = a.chat.clone();
        tasks.push(tokio::spawn(async move {
            let mut ws = conn::open(addr, &sources, token).await?;
            let sub = Subscribe {
                chat,
                ..Default::default()
            };
            conn::send(
                &mut ws,
                ClientFrame {
                    id: 2,
                    kind: Some(client_frame::Kind::Subscribe(sub)),
                },
            )
            .await?;
            drop(permit);
            let mut tracker = Tracker::default();
            // Samples, not a histogram per socket: an HDR histogram is ~150 KiB.
            let mut local: Vec<u64> = Vec::new();
            let mut got = 0u64;
            while got < messages {
                let frame = match tokio::time::timeout_at(deadline, conn::recv(&mut ws)).await {
                    Ok(Ok(f)) => f,
                    _ => break,
                };
                match frame.kind {
                    Some(server_frame::Kind::SubscribeResult(_)) => {
                        ready.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(server_frame::Kind::Delivery(d)) => {
                        let now = micros_now();
                        match tracker.observe(d.seq) {
                            Seen::Duplicate => {
                                duplicated.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            Seen::Late => {
                                out_of_order.fetch_add(1, Ordering::Relaxed);
                            }
                            Seen::New => {}
                        }
                        got += 1;
                        if d.payload.len() >= 8 {
                            let sent =
                                u64::from_le_bytes(d.payload[..8].try_into().expect("8 bytes"));
                            local.push(now.saturating_sub(sent).max(1));
                        }
                        last_us.fetch_max(now, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
            received.fetch_add(got, Ordering::Relaxed);
            {
                let mut h = hist.lock().expect("histogram lock");
                for v in local {
                    let _ = h.record(v);
                }
            }
            anyhow::Ok(())
        }));
    }
    while ready.load(Ordering::Relaxed) < a.subscribers as u64 {
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "only {} of {} subscribers ready",
                ready.load(Ordering::Relaxed),
                a.subscribers
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    eprintln!("{} subscribers ready", a.subscribers);
    tokio::time::sleep(Duration::from_secs(a.publish_after_secs)).await;
    let cpu_before = a.edge_pid.and_then(sys::cpu_seconds);
    let started_us = micros_now();
    // Kept open until every subscriber is done: closing a socket with
    // unread acks sends a RST, which would discard the last publishes.
    let mut kept_publisher = None;
    if !a.no_publish {
        let publish_addr = a.publish_addr.unwrap_or(a.target.addr[0]);
        let name = format!("{}-publisher", a.user_prefix);
        let publisher = kept_publisher.insert(
            conn::open(publish_addr, &sources, conn::token(&a.target.secret, &name)).await?,
        );
        let interval = Duration::from_secs_f64(1.0 / a.rate.max(1) as f64);
        let mut tick = tokio::time::interval(interval);
        for m in 0..a.messages {
            tick.tick().await;
            let mut payload = vec![0u8; a.payload_bytes.max(16)];
            payload[..8].copy_from_slice(&micros_now().to_le_bytes());
            let p = Publish {
                target: Some(publish::Target::Chat(a.chat.clone())),
                client_msg_id: format!("{name}-{m}"),
                payload: Bytes::from(payload),
            };
            let frame = ClientFrame {
                id: m + 10,
                kind: Some(client_frame::Kind::Publish(p)),
            };
            conn::send(publisher, frame).await?;
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let cpu_after = a.edge_pid.and_then(sys::cpu_seconds);
    let n = received.load(Ordering::Relaxed);
    let expected = a.subscribers as u64 * a.messages as u64;
    let span = (last_delivery_us
        .load(Ordering::Relaxed)
        .saturating_sub(started_us)) as f64
        / 1e6;
    let edge_cpu = match (cpu_before, cpu_after) {
        (Some(b), Some(a)) => Some(a - b),
        _ => None,
    };
    let h = hist.lock().expect("histogram lock");
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok(serde_json::to_value(Report {
        scenario: "channel",
        subscribers: a.subscribers as u64,
        messages: a.messages,
        deliveries_expected: expected,
        deliveries_received: n,
        lost: expected.saturating_sub(n),
        duplicated: duplicated.load(Ordering::Relaxed),
        out_of_order: out_of_order.load(Ordering::Relaxed),
        seconds_first_post_to_last_delivery: span,
        deliveries_per_second: if span > 0.0 { n as f64 / span } else { 0.0 },
        edge_cpu_seconds: edge_cpu,
        deliveries_per_edge_cpu_second: edge_cpu.filter(|c| *c > 0.0).map(|c| n as f64 / c),
        latency_ms: Percentiles {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
        },
    })?)
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
            let reply = |kind| {
                Message::binary(Encoding::Protobuf.encode_server(&ServerFrame {
                    id: 1,
                    kind: Some(kind),
                }))
            };
            ws.next().await.unwrap().unwrap(); // connect
            ws.send(reply(server_frame::Kind::ConnectResult(
                ConnectResult::default(),
            )))
            .await
            .unwrap();
            ws.next().await.unwrap().unwrap(); // subscribe
            ws.send(reply(server_frame::Kind::SubscribeResult(
                SubscribeResult::default(),
            )))
            .await
            .unwrap();
            for seq in seqs {
                let mut payload = micros_now().to_le_bytes().to_vec();
                payload.resize(16, 0);
                let d = Delivery {
                    chat: "bench".into(),
                    seq,
                    payload: Bytes::from(payload),
                    ..Default::default()
                };
                ws.send(reply(server_frame::Kind::Delivery(d)))
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
            },
            publish_addr: None,
            chat: "bench".into(),
            user_prefix: "t".into(),
            no_publish: true,
            publish_after_secs: 0,
            subscribers: 1,
            messages,
            rate: 1,
            payload_bytes: 16,
            timeout_secs: 2,
            edge_pid: None,
        }
    }

    #[tokio::test]
    async fn counts_duplicates_and_late_arrivals() {
        let addr = misbehaving_server(vec![1, 2, 2, 4, 3, 5]).await;
        let r = run(args(addr, 5)).await.unwrap();
        assert_eq!(r["deliveries_received"], 5);
        assert_eq!(r["duplicated"], 1);
        assert_eq!(r["out_of_order"], 1);
        assert_eq!(r["lost"], 0);
    }

    #[tokio::test]
    async fn counts_a_lost_message() {
        let addr = misbehaving_server(vec![1, 2, 4, 5]).await;
        let r = run(args(addr, 5)).await.unwrap();
        assert_eq!(r["deliveries_received"], 4);
        assert_eq!(r["lost"], 1);
        assert_eq!(
            (r["duplicated"].as_u64(), r["out_of_order"].as_u64()),
            (Some(0), Some(0))
        );
    }
}
