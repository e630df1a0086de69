//! A router replica's NATS side: publish requests and shard jobs from the
//! routers' queue group.
use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use prost::Message;
use switchboard_protocol::{
    ChatId, StreamKey, UserId,
    internal::v1::{RouterPublish, RouterReply, ShardJob, router_publish, router_reply},
    subject::{ROUTER_PUBLISH, ROUTER_QUEUE, ROUTER_SHARD},
    v1::{self, ErrorCode, PublishAck},
};
use switchboard_router::{Members, PublishRequest, Router};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Publish requests handled at once by one replica.
const PUBLISH_CONCURRENCY: usize = 4096;
/// Shard jobs handled at once by one replica.
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
async fn handle_publish(router: &Router, payload: bytes::Bytes) -> RouterReply {
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
    match router.publish(req).await {
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

/// Serves publish requests and shard jobs until `stop`.
pub(crate) async fn serve(
    client: async_nats::Client,
    router: Arc<Router>,
    members: Option<Arc<Members>>,
    stop: CancellationToken,
) -> Result<(), async_nats::SubscribeError> {
    let mut publishes = client
        .queue_subscribe(ROUTER_PUBLISH, ROUTER_QUEUE.into())
        .await?;
    let mut shards = client
        .queue_subscribe(ROUTER_SHARD, ROUTER_QUEUE.into())
        .await?;
    let publish_slots = Arc::new(Semaphore::new(PUBLISH_CONCURRENCY));
    let shard_slots = Arc::new(Semaphore::new(SHARD_CONCURRENCY));
    // On stop, unsubscribe first so NATS hands new work to the other
    // replicas, and finish what it already delivered here (a dropped shard
    // job would lose member work) until both streams end or the deadline.
    let mut deadline = None;
    let (mut publishes_open, mut shards_open) = (true, true);
    while publishes_open || shards_open {
        tokio::select! {
            _ = stop.cancelled(), if deadline.is_none() => {
                deadline = Some(tokio::time::Instant::now() + DRAIN_DEADLINE);
                if let Err(e) = publishes.drain().await {
                    tracing::warn!(error = %e, "unsubscribing publish requests failed");
                    publishes_open = false;
                }
                if let Err(e) = shards.drain().await {
                    tracing::warn!(error = %e, "unsubscribing shard jobs failed");
                    shards_open = false;
                }
            }
            _ = sleep_until_some(deadline) => break,
            msg = publishes.next(), if publishes_open => {
                let Some(msg) = msg else {
                    publishes_open = false;
                    continue;
                };
                let Some(reply_to) = msg.reply.clone() else { continue };
                let Ok(permit) = publish_slots.clone().acquire_owned().await else { break };
                let (router, client) = (router.clone(), client.clone());
                tokio::spawn(async move {
                    let started = std::time::Instant::now();
                    let reply = handle_publish(&router, msg.payload).await;
                    metrics::histogram!("switchboard_router_publish_duration_seconds").record(started.elapsed().as_secs_f64());
                    if let Err(e) = client.publish(reply_to, reply.encode_to_vec().into()).await {
                        tracing::debug!(error = %e, "reply failed; the edge retries");
                    }
                    drop(permit);
                });
            }
            msg = shards.next(), if shards_open => {
                let Some(msg) = msg else {
                    shards_open = false;
                    continue;
                };
                let Some(members) = members.clone() else { continue };
                let Ok(permit) = shard_slots.clone().acquire_owned().await else { break };
                tokio::spawn(async move {
                    match ShardJob::decode(msg.payload) {
                        Ok(job) => {
                            if let Err(e) = members.process_shard(job).await {
                                metrics::counter!("switchboard_router_shard_errors_total").increment(1);
                                tracing::warn!(error = %e, "shard job failed");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "undecodable shard job"),
                    }
                    drop(permit);
                });
            }
        }
    }
    // Let in-flight requests finish (bounded by the semaphores).
    let until = deadline.unwrap_or_else(|| tokio::time::Instant::now() + DRAIN_DEADLINE);
    let _ = tokio::time::timeout_at(until, async {
        let _ = publish_slots.acquire_many(PUBLISH_CONCURRENCY as u32).await;
        let _ = shard_slots.acquire_many(SHARD_CONCURRENCY as u32).await;
    })
    .await;
    Ok(())
}

/// How long a stopping replica keeps finishing work NATS gave it.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
