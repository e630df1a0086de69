//! A router replica's NATS side: publish requests from the routers' queue
//! group, and shard jobs pulled from the JetStream consumer all routers
//! share (acknowledged only once done, so a killed router loses none).
use std::{sync::Arc, time::Duration};

use async_nats::jetstream::AckKind;
use futures_util::StreamExt;
use prost::Message;
use switchboard_node::Stop;
use switchboard_protocol::{
    ChatId, StreamKey, UserId,
    internal::v1::{RouterPublish, RouterReply, ShardJob, router_publish, router_reply},
    subject::{ROUTER_PUBLISH, ROUTER_QUEUE},
    v1::{self, ErrorCode, PublishAck},
};
use switchboard_router::{Members, PublishRequest, Router, SHARD_MAX_DELIVER};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

/// Publish requests handled at once by one replica.
const PUBLISH_CONCURRENCY: usize = 4096;
/// Shard jobs handled at once by one replica (and pulled at once: a
/// router asks JetStream for no more than it has free slots).
const SHARD_CONCURRENCY: usize = 16;

fn error_reply(code: ErrorCode, message: String) -> RouterReply {
    RouterReply {
        result: Some(router_reply::Result::Error(v1::Error {
            code: code as u32,
            message,
        })),
    }
}

fn request_of(p: RouterPublish) -> Result<PublishRequest, RouterReply> {
    let invalid =
        |e: switchboard_protocol::IdError| error_reply(ErrorCode::InvalidId, e.to_string());
    let sender = UserId::parse(&p.sender).map_err(invalid)?;
    let target = match p.target {
        Some(router_publish::Target::Chat(c)) => {
            StreamKey::Chat(ChatId::parse(&c).map_err(invalid)?)
        }
        Some(router_publish::Target::User(u)) => {
            StreamKey::User(UserId::parse(&u).map_err(invalid)?)
        }
        None => return Err(error_reply(ErrorCode::BadRequest, "no target".into())),
    };
    Ok(PublishRequest {
        sender,
        target,
        client_msg_id: p.client_msg_id,
        payload: p.payload,
    })
}

/// Answers one publish request.
/// A `traceparent` header continues the publisher's trace (ADR 0038).
async fn handle_publish(
    router: &Router,
    payload: bytes::Bytes,
    traceparent: Option<&str>,
) -> RouterReply {
    let req = match RouterPublish::decode(payload)
        .map_err(|e| error_reply(ErrorCode::BadRequest, e.to_string()))
    {
        Ok(p) => match request_of(p) {
            Ok(r) => r,
            Err(reply) => return reply,
        },
        Err(reply) => return reply,
    };
    let (chat, user) = match &req.target {
        StreamKey::Chat(c) => (c.to_string(), String::new()),
        StreamKey::User(u) => (String::new(), u.to_string()),
    };
    match router.publish_from(req, traceparent).await {
        Ok(p) => RouterReply {
            result: Some(router_reply::Result::Ack(PublishAck {
                chat,
                user,
                seq: p.seq,
                timestamp_ms: p.timestamp_ms,
                duplicate: p.duplicate,
            })),
        },
        Err(e) => error_reply(e.code(), e.to_string()),
    }
}

/// Joins the routers' queue group for publish requests and waits until
/// the NATS server has the subscription (a flush round trip), so a router
/// that reports ready is one that edges' requests can reach.
pub(crate) async fn subscribe(
    client: &async_nats::Client,
) -> Result<async_nats::Subscriber, String> {
    let sub = client
        .queue_subscribe(ROUTER_PUBLISH, ROUTER_QUEUE.into())
        .await
        .map_err(|e| format!("subscribing to {ROUTER_PUBLISH}: {e}"))?;
    client
        .flush()
        .await
        .map_err(|e| format!("subscribing to {ROUTER_PUBLISH}: {e}"))?;
    Ok(sub)
}

/// What the stop logs when NATS did not let go of the publish requests.
const UNSUBSCRIBE: &str = "unsubscribing publish requests";

/// Serves publish requests (from [`subscribe`]) and shard jobs until the
/// stop begins, then finishes what it holds until the stop's work
/// deadline, whatever NATS does.
pub(crate) async fn serve(
    client: async_nats::Client,
    mut publishes: async_nats::Subscriber,
    router: Arc<Router>,
    members: Option<Arc<Members>>,
    stop: Stop,
) {
    let shards = members.map(|m| tokio::spawn(take_shard_jobs(m, stop.clone())));
    let publish_slots = Arc::new(Semaphore::new(PUBLISH_CONCURRENCY));
    // On stop, unsubscribe first so NATS hands new requests to the other
    // replicas, and finish what it already delivered here until the
    // subscription ends (the unsubscribe was written to NATS) or the
    // deadline.
    let mut deadline = None;
    loop {
        tokio::select! {
            _ = stop.begun(), if deadline.is_none() => {
                deadline = Some(stop.work_deadline());
                // A full command queue (NATS gone) makes even this wait.
                if stop.step(UNSUBSCRIBE, stop.work_deadline(), publishes.drain()).await.is_none() {
                    break;
                }
            }
            _ = sleep_until_some(deadline) => {
                stop.gave_up(UNSUBSCRIBE, &"the unsubscribe never reached NATS");
                break;
            }
            msg = publishes.next() => {
                let Some(msg) = msg else { break };
                let Some(reply_to) = msg.reply.clone() else { continue };
                let Ok(permit) = publish_slots.clone().acquire_owned().await else { break };
                let (router, client) = (router.clone(), client.clone());
                tokio::spawn(async move {
                    let started = std::time::Instant::now();
                    let traceparent = switchboard_router::trace::nats_traceparent(msg.headers.as_ref());
                    let reply = handle_publish(&router, msg.payload, traceparent).await;
                    metrics::histogram!("switchboard_router_publish_duration_seconds").record(started.elapsed().as_secs_f64());
                    if let Err(e) = client.publish(reply_to, reply.encode_to_vec().into()).await {
                        tracing::debug!(error = %e, "reply failed; the edge retries");
                    }
                    drop(permit);
                });
            }
        }
    }
    // Let in-flight requests finish (bounded by the semaphore).
    let all = publish_slots.acquire_many(PUBLISH_CONCURRENCY as u32);
    if tokio::time::timeout_at(stop.work_deadline(), all)
        .await
        .is_err()
    {
        let open = PUBLISH_CONCURRENCY - publish_slots.available_permits();
        stop.gave_up(
            "publish requests in flight",
            &format_args!("{open} unanswered; the edges send them again to another router"),
        );
    }
    if let Some(shards) = shards {
        // Bounded inside too, but a pull or an ack waits for NATS.
        stop.join("pulling shard jobs", stop.work_deadline(), shards)
            .await;
    }
}

/// How long one pull request for shard jobs waits for jobs; also the
/// longest a stopping router keeps receiving jobs it then hands back
/// (while NATS answers).
const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// How often a router reads the consumer's backlog for the pending gauge.
const PENDING_EVERY: Duration = Duration::from_secs(5);

/// Pulls shard jobs, at most [`SHARD_CONCURRENCY`] at a time, until the
/// stop begins; then hands back jobs received but not started, and waits
/// for the started ones until the stop's work deadline. A job still
/// running then is never acknowledged, and JetStream delivers it again
/// after ack_wait.
async fn take_shard_jobs(members: Arc<Members>, stop: Stop) {
    let slots = Arc::new(Semaphore::new(SHARD_CONCURRENCY));
    let mut next_pending = Instant::now();
    'pull: while !stop.is_begun() {
        if Instant::now() >= next_pending {
            next_pending += PENDING_EVERY;
            match members.shard_jobs_pending().await {
                Ok(n) => metrics::gauge!("switchboard_router_shard_jobs_pending").set(n as f64),
                Err(e) => tracing::debug!(error = %e, "reading the shard backlog failed"),
            }
        }
        // Ask for exactly as many jobs as there are free slots: a job
        // waiting in a local buffer would run down its ack_wait unseen.
        let first = tokio::select! {
            _ = stop.begun() => break,
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let mut permits = vec![first];
        while permits.len() < SHARD_CONCURRENCY {
            match slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let batch = members
            .shard_jobs()
            .batch()
            .max_messages(permits.len())
            .expires(PULL_EXPIRES)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                metrics::counter!("switchboard_router_shard_errors_total", "reason" => "pull")
                    .increment(1);
                tracing::warn!(error = %e, "pulling shard jobs failed");
                tokio::select! {
                    _ = stop.begun() => break 'pull,
                    _ = tokio::time::sleep(PULL_EXPIRES) => continue 'pull,
                }
            }
        };
        // The batch ends when full or after PULL_EXPIRES, if NATS answers
        // (the caller bounds it after the stop began).
        while let Some(msg) = batch.next().await {
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(error = %e, "shard pull ended");
                    break;
                }
            };
            if stop.is_begun() {
                // Another router takes it now, not after ack_wait.
                let _ = msg.ack_with(AckKind::Nak(None)).await;
                continue;
            }
            let Some(permit) = permits.pop() else {
                // More than asked for: hand it back.
                let _ = msg.ack_with(AckKind::Nak(None)).await;
                continue;
            };
            tokio::spawn(run_shard_job(members.clone(), msg, permit));
        }
    }
    let all = slots.acquire_many(SHARD_CONCURRENCY as u32);
    if tokio::time::timeout_at(stop.work_deadline(), all)
        .await
        .is_err()
    {
        let open = SHARD_CONCURRENCY - slots.available_permits();
        stop.gave_up(
            "shard jobs in flight",
            &format_args!("{open} unacknowledged; JetStream delivers them again after ack_wait"),
        );
    }
}

/// Runs one shard job and acknowledges it once done; says "still working"
/// every third of ack_wait meanwhile. A failed job is handed back for a
/// later delivery (after ack_wait), up to [`SHARD_MAX_DELIVER`] times.
async fn run_shard_job(
    members: Arc<Members>,
    msg: async_nats::jetstream::Message,
    permit: OwnedSemaphorePermit,
) {
    let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
    if delivered > 1 {
        metrics::counter!("switchboard_router_shard_jobs_redelivered_total").increment(1);
    }
    let in_flight = metrics::gauge!("switchboard_router_shard_jobs_in_flight");
    in_flight.increment(1.0);
    let job = match ShardJob::decode(msg.payload.clone()) {
        Ok(job) => job,
        Err(e) => {
            metrics::counter!("switchboard_router_shard_errors_total", "reason" => "decode")
                .increment(1);
            tracing::warn!(error = %e, "undecodable shard job; dropped");
            let _ = msg.ack_with(AckKind::Term).await;
            in_flight.decrement(1.0);
            return;
        }
    };
    let ack_wait = members.shard_ack_wait();
    let every = ack_wait / 3;
    let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let work = members.process_shard(job);
    tokio::pin!(work);
    let done = loop {
        tokio::select! {
            done = &mut work => break done,
            _ = progress.tick() => {
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    tracing::debug!(error = %e, "in-progress ack failed");
                }
            }
        }
    };
    let answer = match done {
        Ok(()) => msg.ack().await,
        Err(e) if delivered >= SHARD_MAX_DELIVER => {
            metrics::counter!("switchboard_router_shard_errors_total", "reason" => "abandoned")
                .increment(1);
            tracing::error!(error = %e, delivered, "shard job failed on its last delivery; its members' unread counters and push jobs are lost");
            msg.ack_with(AckKind::Term).await
        }
        Err(e) => {
            metrics::counter!("switchboard_router_shard_errors_total", "reason" => "failed")
                .increment(1);
            tracing::warn!(error = %e, delivered, "shard job failed; it will be delivered again");
            msg.ack_with(AckKind::Nak(Some(ack_wait))).await
        }
    };
    if let Err(e) = answer {
        // Unanswered, the job comes back after ack_wait: repeated, not lost.
        tracing::debug!(error = %e, "answering a shard job failed");
    }
    in_flight.decrement(1.0);
    drop(permit);
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
