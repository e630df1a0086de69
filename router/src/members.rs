//! Member-wide work for chats and channels, and the offline hand-off.
//!
//! Live delivery of a channel post is tier 1 and 2: one NATS copy per edge
//! with viewers, then each edge's local fan-out. This module is tier 3: the
//! work that concerns every *member*, online or not (unread counters, push
//! jobs for offline members). Members are kept in Redis in a fixed number
//! of bucket sets per channel; a post publishes one [`ShardJob`] per bucket
//! on `sb.router.shard`, and every router replica takes jobs from that
//! queue group, so a million members are processed in parallel, in bounded
//! pieces.
//!
//! Keys (one hash tag per channel, so a channel lives in one cluster slot):
//! `sb:{channel:<c>}:m:<bucket>` member sets, `sb:{channel:<c>}:n` member
//! count; per user `sb:{user:<u>}:unread` hash channel → unread count.
//! Push jobs go to the JetStream work queue `SB_PUSH` on `sb.push.<user>`,
//! de-duplicated by message id `<stream>:<seq>:<user>`.
use std::{sync::Arc, time::Duration};

use prost::Message;
use switchboard_presence::{PresenceError, PresenceStore, RedisConn};
use switchboard_protocol::{
    ChatId, SharedFrame, StreamKey, UserId,
    internal::v1::{PushJob, ShardJob},
    now_ms,
    subject::{PUSH_ALL, ROUTER_SHARD, push_subject},
    v1::{Delivery, server_frame},
};

/// JetStream stream holding push jobs.
pub const PUSH_STREAM: &str = "SB_PUSH";

/// Member work failed. Every variant keeps its cause as its source; the
/// message carries the cause's text too (callers print one line).
#[derive(Debug, thiserror::Error)]
pub enum MembersError {
    /// Redis failed (member sets, counts, unread counters).
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Presence could not say who is online.
    #[error(transparent)]
    Presence(#[from] PresenceError),
    /// The push stream could not be created or found at startup.
    #[error(
        "creating stream {PUSH_STREAM} with {replicas} replicas (--push-stream-replicas): {source}"
    )]
    PushStream {
        /// The replica count asked for.
        replicas: usize,
        /// Why the creation failed.
        source: async_nats::jetstream::context::CreateStreamError,
    },
    /// A shard job was not handed to NATS.
    #[error("nats: {0}")]
    ShardJob(#[source] async_nats::PublishError),
    /// A push job was not queued (or not acknowledged) by JetStream.
    #[error("nats: {0}")]
    PushJob(#[source] async_nats::jetstream::context::PublishError),
}

/// Channel membership, shard jobs and push hand-off.
pub struct Members {
    conn: RedisConn,
    presence: Arc<dyn PresenceStore>,
    nats: async_nats::Client,
    js: async_nats::jetstream::Context,
    buckets: u32,
}

/// FNV-1a: a stable hash, so every process puts a member in the same bucket.
fn bucket_of(user: &str, buckets: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in user.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h % buckets
}

fn bucket_key(channel: &ChatId, bucket: u32) -> String {
    format!("sb:{{channel:{channel}}}:m:{bucket}")
}

fn count_key(channel: &ChatId) -> String {
    format!("sb:{{channel:{channel}}}:n")
}

impl Members {
    /// `buckets` must stay the same for the life of the data.
    pub async fn new(
        conn: RedisConn,
        presence: Arc<dyn PresenceStore>,
        nats: async_nats::Client,
        buckets: u32,
        push_replicas: usize,
    ) -> Result<Members, MembersError> {
        let js = async_nats::jetstream::new(nats.clone());
        let config = async_nats::jetstream::stream::Config {
            name: PUSH_STREAM.into(),
            subjects: vec![PUSH_ALL.into()],
            retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
            max_messages: 10_000_000,
            max_bytes: 4 << 30,
            max_age: Duration::from_secs(86_400),
            duplicate_window: Duration::from_secs(120),
            num_replicas: push_replicas,
            ..Default::default()
        };
        // Replicas starting together race to create the stream; whoever
        // loses finds it created.
        let mut stream = match js.get_or_create_stream(config).await {
            Ok(s) => s,
            Err(source) => {
                js.get_stream(PUSH_STREAM)
                    .await
                    .map_err(|_| MembersError::PushStream {
                        replicas: push_replicas,
                        source,
                    })?
            }
        };
        if let Ok(info) = stream.info().await
            && info.config.num_replicas != push_replicas
        {
            tracing::warn!(
                stream = PUSH_STREAM,
                replicas = info.config.num_replicas,
                wanted = push_replicas,
                "the push stream exists with another replica count; change it with the NATS CLI"
            );
        }
        Ok(Members {
            conn,
            presence,
            nats,
            js,
            buckets: buckets.max(1),
        })
    }

    /// Adds members; returns how many were new.
    pub async fn add(&self, channel: &ChatId, users: &[UserId]) -> Result<u64, MembersError> {
        self.change(channel, users, "SADD").await
    }

    /// Removes members; returns how many were removed.
    pub async fn remove(&self, channel: &ChatId, users: &[UserId]) -> Result<u64, MembersError> {
        self.change(channel, users, "SREM").await
    }

    async fn change(
        &self,
        channel: &ChatId,
        users: &[UserId],
        op: &str,
    ) -> Result<u64, MembersError> {
        let mut conn = self.conn.clone();
        let mut changed = 0u64;
        for chunk in users.chunks(10_000) {
            let mut by_bucket: std::collections::HashMap<u32, Vec<&str>> = Default::default();
            for u in chunk {
                by_bucket
                    .entry(bucket_of(u, self.buckets))
                    .or_default()
                    .push(u.as_str());
            }
            let mut pipe = redis::pipe();
            for (b, members) in &by_bucket {
                pipe.cmd(op).arg(bucket_key(channel, *b)).arg(members);
            }
            let counts: Vec<u64> = pipe.query_async(&mut conn).await?;
            changed += counts.iter().sum::<u64>();
        }
        let delta = if op == "SADD" {
            changed as i64
        } else {
            -(changed as i64)
        };
        let _: i64 = redis::cmd("INCRBY")
            .arg(count_key(channel))
            .arg(delta)
            .query_async(&mut conn)
            .await?;
        Ok(changed)
    }

    /// Number of members.
    pub async fn count(&self, channel: &ChatId) -> Result<u64, MembersError> {
        let n: Option<i64> = redis::cmd("GET")
            .arg(count_key(channel))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    /// Members online now, counted bucket by bucket (never listed to the caller).
    pub async fn online_count(&self, channel: &ChatId) -> Result<u64, MembersError> {
        let mut total = 0;
        for b in 0..self.buckets {
            let members = self.bucket(channel, b).await?;
            for chunk in members.chunks(1000) {
                let st = self.presence.status(chunk, now_ms()).await?;
                total += st.iter().filter(|s| s.online).count() as u64;
            }
        }
        Ok(total)
    }

    async fn bucket(&self, channel: &ChatId, bucket: u32) -> Result<Vec<UserId>, MembersError> {
        let raw: Vec<String> = redis::cmd("SMEMBERS")
            .arg(bucket_key(channel, bucket))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(raw.iter().filter_map(|u| UserId::parse(u).ok()).collect())
    }

    /// After a message is sequenced: schedule member work for a channel
    /// with members, or hand a personal message to push if the user is
    /// offline.
    pub async fn after_publish(
        &self,
        target: &StreamKey,
        frame: &SharedFrame,
    ) -> Result<(), MembersError> {
        let Some(server_frame::Kind::Delivery(d)) = frame.frame().kind.as_ref() else {
            return Ok(());
        };
        match target {
            StreamKey::User(u) => {
                let st = self
                    .presence
                    .status(std::slice::from_ref(u), now_ms())
                    .await?;
                if !st.first().is_some_and(|s| s.online) {
                    self.push(u, d).await?;
                }
                Ok(())
            }
            StreamKey::Chat(c) => {
                if self.count(c).await? == 0 {
                    return Ok(());
                }
                for bucket in 0..self.buckets {
                    let job = ShardJob {
                        channel: c.to_string(),
                        bucket,
                        delivery: Some(d.clone()),
                    };
                    self.nats
                        .publish(ROUTER_SHARD, job.encode_to_vec().into())
                        .await
                        .map_err(MembersError::ShardJob)?;
                }
                metrics::counter!("switchboard_router_shard_jobs_published_total")
                    .increment(self.buckets as u64);
                Ok(())
            }
        }
    }

    async fn push(&self, user: &UserId, d: &Delivery) -> Result<(), MembersError> {
        let ack = self.push_send(user, d).await?;
        ack.await.map_err(MembersError::PushJob)?;
        Ok(())
    }

    async fn push_send(
        &self,
        user: &UserId,
        d: &Delivery,
    ) -> Result<async_nats::jetstream::context::PublishAckFuture, MembersError> {
        let stream = if d.chat.is_empty() {
            format!("user:{}", d.user)
        } else {
            format!("chat:{}", d.chat)
        };
        let job = PushJob {
            user: user.to_string(),
            delivery: Some(d.clone()),
        };
        let msg = async_nats::jetstream::message::PublishMessage::build()
            .payload(job.encode_to_vec().into())
            .message_id(format!("{stream}:{}:{user}", d.seq));
        let ack = self
            .js
            .send_publish(push_subject(user), msg)
            .await
            .map_err(MembersError::PushJob)?;
        metrics::counter!("switchboard_router_push_jobs_total").increment(1);
        Ok(ack)
    }

    /// One bucket of a channel post: bump unread counters of every member,
    /// and queue a push job for every offline one.
    pub async fn process_shard(&self, job: ShardJob) -> Result<(), MembersError> {
        let (Ok(channel), Some(d)) = (ChatId::parse(&job.channel), job.delivery) else {
            return Ok(());
        };
        let members = self.bucket(&channel, job.bucket).await?;
        let mut conn = self.conn.clone();
        for chunk in members.chunks(1000) {
            let mut pipe = redis::pipe();
            for u in chunk {
                pipe.cmd("HINCRBY")
                    .arg(format!("sb:{{user:{u}}}:unread"))
                    .arg(channel.as_str())
                    .arg(1)
                    .ignore();
            }
            let _: () = pipe.query_async(&mut conn).await?;
            let st = self.presence.status(chunk, now_ms()).await?;
            let mut acks = Vec::new();
            for s in st.iter().filter(|s| !s.online) {
                acks.push(self.push_send(&s.user, &d).await?);
            }
            for ack in futures_util::future::join_all(
                acks.into_iter().map(std::future::IntoFuture::into_future),
            )
            .await
            {
                ack.map_err(MembersError::PushJob)?;
            }
        }
        metrics::counter!("switchboard_router_shard_jobs_done_total").increment(1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_stable_and_spread() {
        assert_eq!(bucket_of("alice", 64), bucket_of("alice", 64));
        let mut seen = std::collections::HashSet::new();
        for i in 0..10_000 {
            seen.insert(bucket_of(&format!("user-{i}"), 64));
        }
        assert_eq!(seen.len(), 64);
    }
}
