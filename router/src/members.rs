//! Member-wide work for chats and channels, and the offline hand-off.
//!
//! Live delivery of a channel post is tier 1 and 2: one NATS copy per edge
//! with viewers, then each edge's local fan-out. This module is tier 3: the
//! work that concerns every *member*, online or not (unread counters, push
//! jobs for offline members). Members are kept in Redis in a fixed number
//! of bucket sets per channel; a post appends one [`ShardJob`] per bucket
//! to the JetStream work queue `SB_SHARD` (subject `sb.shard.jobs`), and
//! every router replica pulls from its one durable consumer, so a million
//! members are processed in parallel, in bounded pieces, and a job whose
//! router dies before acknowledging it is delivered again (ADR 0020).
//!
//! Every step is safe to repeat, because repeating is what a redelivery
//! does: shard jobs are de-duplicated by message id
//! `<stream>:<seq>:<bucket>`, unread counters are bumped by a script that
//! remembers which seqs it counted, and push jobs are de-duplicated by
//! `SB_PUSH`'s message id `<stream>:<seq>:<user>`.
//!
//! Keys (one hash tag per channel, so a channel lives in one cluster slot):
//! `sb:{channel:<c>}:m:<bucket>` member sets, `sb:{channel:<c>}:n` member
//! count; per user `sb:{user:<u>}:unread` hash channel → unread count and
//! `sb:{user:<u>}:counted` hash channel → `<last seq>:<mask>` (the seqs
//! already counted). Push jobs go to the JetStream work queue `SB_PUSH` on
//! `sb.push.<user>`.
use std::{sync::Arc, time::Duration};

use prost::Message;
use switchboard_presence::{
    BucketsError, MemberStore, PresenceError, PresenceStore, RedisConn, RedisMembers, bucket_key,
};
use switchboard_protocol::{
    ChatId, SharedFrame, StreamKey, UserId,
    internal::v1::{PushJob, ShardJob},
    now_ms,
    subject::{PUSH_ALL, SHARD_JOBS, push_subject},
    v1::{Delivery, server_frame},
};

/// JetStream stream holding push jobs.
pub const PUSH_STREAM: &str = "SB_PUSH";
/// JetStream stream holding shard jobs.
pub const SHARD_STREAM: &str = "SB_SHARD";
/// The durable pull consumer every router takes shard jobs from.
pub const SHARD_CONSUMER: &str = "sb-routers";
/// Deliveries of one shard job before JetStream gives up on it (it then
/// stays in the stream until `max_age`, and the
/// `$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.SB_SHARD.>` advisory fires).
/// With the largest `--shard-ack-wait-ms`, 5 × 15 s stays well inside the
/// 120 s de-duplication window of `SB_PUSH`, so no retry pushes twice.
pub const SHARD_MAX_DELIVER: i64 = 5;
/// Shard jobs handed out and not yet acknowledged, all routers together
/// (each takes at most 16 at a time): room for 256 replicas.
pub const SHARD_MAX_ACK_PENDING: i64 = 4096;
/// Largest `--shard-ack-wait-ms` (see [`SHARD_MAX_DELIVER`]).
pub const SHARD_ACK_WAIT_MAX: Duration = Duration::from_secs(15);
/// De-duplication window of both streams: a shard or push job published
/// again within it (a retry, a redelivered job) is stored once.
const DEDUP_WINDOW: Duration = Duration::from_secs(120);
/// Chats with at most this many members get one shard job per post for
/// all their buckets: one JetStream append and ack instead of one per
/// bucket, which every small group pays since membership is what
/// authorizes chats (ADR 0031). Bigger chats keep one job per bucket, so
/// their member work spreads over the routers.
pub const WHOLE_CHAT_MAX_MEMBERS: u64 = 1_000;
/// A publish retried within this long of the original (same client message
/// id) schedules its member work again, in case the first attempt's
/// router died between append and shard publish; the de-duplication window
/// makes that a no-op when the first attempt got through. Half the window,
/// so a retry's jobs are always de-duplicated against the first's.
pub const MEMBER_RETRY_WINDOW: Duration = Duration::from_secs(60);
/// Bumps one user's unread counter for one post at most once.
/// KEYS[1] `sb:{user:<u>}:unread`, KEYS[2] `sb:{user:<u>}:counted` (one
/// slot); ARGV channel, seq. The counted field holds the highest seq
/// counted and a bit mask of the 52 seqs below it (bit k = seq last-1-k),
/// so a job redelivered after newer posts were counted still counts once;
/// one redelivered after more than 52 newer posts of its channel were
/// counted for the user is taken as counted (never counted twice).
/// Numbers stay below 2^53, where Lua's doubles are exact.
const COUNT_UNREAD: &str = r#"
local seq = tonumber(ARGV[2])
local last, mask = 0, 0
local v = redis.call('HGET', KEYS[2], ARGV[1])
if v then
  local i = string.find(v, ':', 1, true)
  last = tonumber(string.sub(v, 1, i - 1))
  mask = tonumber(string.sub(v, i + 1))
end
if seq > last then
  local shift = seq - last
  if shift > 52 then
    mask = 0
  else
    mask = (mask % 2 ^ (52 - shift)) * 2 ^ shift + 2 ^ (shift - 1)
  end
  last = seq
else
  local k = last - seq - 1
  if k < 0 or k >= 52 or math.floor(mask / 2 ^ k) % 2 == 1 then
    return 0
  end
  mask = mask + 2 ^ k
end
redis.call('HSET', KEYS[2], ARGV[1], string.format('%d:%d', last, mask))
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
return 1
"#;

/// How member work is set up at startup.
#[derive(Debug, Clone, Copy)]
pub struct MembersSettings {
    /// Member buckets per channel (shard jobs per post); must stay the same
    /// for the life of the data.
    pub buckets: u32,
    /// Replicas of `SB_PUSH` and `SB_SHARD` (`--push-stream-replicas`).
    pub stream_replicas: usize,
    /// How long a router may hold a shard job without acknowledging it
    /// (or saying it is still working) before JetStream delivers it again.
    pub shard_ack_wait: Duration,
}

/// Member work failed. Every variant keeps its cause as its source; the
/// message carries the cause's text too (callers print one line).
#[derive(Debug, thiserror::Error)]
pub enum MembersError {
    /// Redis failed (member sets, counts, unread counters).
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Presence could not say who is online, or the member sets failed.
    #[error(transparent)]
    Presence(#[from] PresenceError),
    /// The member bucket count disagrees with the data's.
    #[error(transparent)]
    Buckets(BucketsError),
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
    /// The shard-job stream could not be created or updated at startup.
    #[error(
        "creating stream {SHARD_STREAM} with {replicas} replicas (--push-stream-replicas): {source}"
    )]
    ShardStream {
        /// The replica count asked for.
        replicas: usize,
        /// Why the creation failed.
        source: async_nats::jetstream::context::CreateStreamError,
    },
    /// The routers' shard-job consumer could not be created or updated.
    #[error("creating consumer {SHARD_CONSUMER} on {SHARD_STREAM}: {0}")]
    ShardConsumer(#[source] async_nats::jetstream::stream::ConsumerError),
    /// A shard job was not stored (or not acknowledged) by JetStream; the
    /// post's member work is incomplete until the publish is retried.
    #[error("nats: {0}")]
    ShardJob(#[source] async_nats::jetstream::context::PublishError),
    /// The shard consumer's state could not be read.
    #[error("nats: {0}")]
    ShardInfo(#[source] async_nats::jetstream::context::ConsumerInfoError),
    /// A push job was not queued (or not acknowledged) by JetStream.
    #[error("nats: {0}")]
    PushJob(#[source] async_nats::jetstream::context::PublishError),
}

/// Channel membership, shard jobs and push hand-off.
pub struct Members {
    conn: RedisConn,
    /// The member sets, shared with the edges' `members` authorization.
    store: RedisMembers,
    presence: Arc<dyn PresenceStore>,
    js: async_nats::jetstream::Context,
    shard_jobs: ShardConsumer,
    shard_ack_wait: Duration,
    buckets: u32,
}

/// The routers' durable pull consumer on `SB_SHARD`.
pub type ShardConsumer =
    async_nats::jetstream::consumer::Consumer<async_nats::jetstream::consumer::pull::Config>;

impl Members {
    /// Creates (or finds) `SB_PUSH`, creates or updates `SB_SHARD` and the
    /// routers' consumer on it.
    pub async fn new(
        conn: RedisConn,
        presence: Arc<dyn PresenceStore>,
        nats: async_nats::Client,
        settings: MembersSettings,
    ) -> Result<Members, MembersError> {
        use async_nats::jetstream::{consumer, stream};
        let replicas = settings.stream_replicas;
        let js = async_nats::jetstream::new(nats);
        let config = stream::Config {
            name: PUSH_STREAM.into(),
            subjects: vec![PUSH_ALL.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            max_messages: 10_000_000,
            max_bytes: 4 << 30,
            max_age: Duration::from_secs(86_400),
            duplicate_window: DEDUP_WINDOW,
            num_replicas: replicas,
            ..Default::default()
        };
        // Replicas starting together race to create the stream; whoever
        // loses finds it created.
        let mut stream = match js.get_or_create_stream(config).await {
            Ok(s) => s,
            Err(source) => js
                .get_stream(PUSH_STREAM)
                .await
                .map_err(|_| MembersError::PushStream { replicas, source })?,
        };
        if let Ok(info) = stream.info().await
            && info.config.num_replicas != replicas
        {
            tracing::warn!(
                stream = PUSH_STREAM,
                replicas = info.config.num_replicas,
                wanted = replicas,
                "the push stream exists with another replica count; change it with the NATS CLI"
            );
        }
        // Bounded: a full stream refuses new jobs (the publish's member
        // work fails and is counted) rather than dropping queued ones.
        let config = stream::Config {
            name: SHARD_STREAM.into(),
            subjects: vec![SHARD_JOBS.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            discard: stream::DiscardPolicy::New,
            max_messages: 1_000_000,
            max_bytes: 1 << 30,
            max_age: Duration::from_secs(86_400),
            duplicate_window: DEDUP_WINDOW,
            num_replicas: replicas,
            ..Default::default()
        };
        // Created or updated, so new limits reach an existing stream; a
        // second try covers the create race between replicas.
        if let Err(first) = js.create_or_update_stream(config.clone()).await {
            tracing::debug!(error = %first, "creating the shard stream; trying again");
            js.create_or_update_stream(config)
                .await
                .map_err(|source| MembersError::ShardStream { replicas, source })?;
        }
        let consumer_config = consumer::pull::Config {
            durable_name: Some(SHARD_CONSUMER.into()),
            description: Some("switchboard routers: member work of channel posts".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: settings.shard_ack_wait,
            max_deliver: SHARD_MAX_DELIVER,
            max_ack_pending: SHARD_MAX_ACK_PENDING,
            ..Default::default()
        };
        let shard_jobs = js
            .create_consumer_on_stream(consumer_config, SHARD_STREAM)
            .await
            .map_err(MembersError::ShardConsumer)?;
        let store = RedisMembers::open(conn.clone(), Some(settings.buckets.max(1)))
            .await
            .map_err(MembersError::Buckets)?;
        Ok(Members {
            buckets: store.buckets(),
            store,
            conn,
            presence,
            js,
            shard_jobs,
            shard_ack_wait: settings.shard_ack_wait,
        })
    }

    /// The routers' shard-job consumer (pull, explicit ack).
    pub fn shard_jobs(&self) -> &ShardConsumer {
        &self.shard_jobs
    }

    /// How long a shard job may go unacknowledged before it is redelivered.
    pub fn shard_ack_wait(&self) -> Duration {
        self.shard_ack_wait
    }

    /// Shard jobs not yet done, all routers together: waiting in
    /// `SB_SHARD` plus handed out and not acknowledged.
    pub async fn shard_jobs_pending(&self) -> Result<u64, MembersError> {
        let info = self
            .shard_jobs
            .get_info()
            .await
            .map_err(MembersError::ShardInfo)?;
        Ok(info.num_pending + info.num_ack_pending as u64)
    }

    /// Adds members; returns how many were new.
    pub async fn add(&self, channel: &ChatId, users: &[UserId]) -> Result<u64, MembersError> {
        Ok(self.store.add(channel, users).await?)
    }

    /// Removes members; returns how many were removed.
    pub async fn remove(&self, channel: &ChatId, users: &[UserId]) -> Result<u64, MembersError> {
        Ok(self.store.remove(channel, users).await?)
    }

    /// Number of members.
    pub async fn count(&self, channel: &ChatId) -> Result<u64, MembersError> {
        Ok(self.store.count(channel).await?)
    }

    /// The member store itself (what the API and authorization use).
    pub fn store(&self) -> &RedisMembers {
        &self.store
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

    /// Every member of a chat, all buckets read in one pipeline (the
    /// chat's keys share its slot).
    async fn all_members(&self, channel: &ChatId) -> Result<Vec<UserId>, MembersError> {
        let mut pipe = redis::pipe();
        for b in 0..self.buckets {
            pipe.cmd("SMEMBERS").arg(bucket_key(channel, b));
        }
        let sets: Vec<Vec<String>> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(sets
            .iter()
            .flatten()
            .filter_map(|u| UserId::parse(u).ok())
            .collect())
    }

    /// The members in one bucket (`0..buckets`) of a channel.
    pub async fn bucket(&self, channel: &ChatId, bucket: u32) -> Result<Vec<UserId>, MembersError> {
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
                let members = self.count(c).await?;
                if members == 0 {
                    return Ok(());
                }
                // A retry may choose the other shape if the count crossed
                // the threshold meanwhile: both then run, and that is safe
                // (counters and push jobs are de-duplicated per user).
                let jobs: Vec<(ShardJob, String)> = if members <= WHOLE_CHAT_MAX_MEMBERS {
                    vec![(
                        ShardJob {
                            channel: c.to_string(),
                            bucket: 0,
                            delivery: Some(d.clone()),
                            whole_chat: true,
                        },
                        format!("chat:{c}:{}:all", d.seq),
                    )]
                } else {
                    (0..self.buckets)
                        .map(|bucket| {
                            let job = ShardJob {
                                channel: c.to_string(),
                                bucket,
                                delivery: Some(d.clone()),
                                whole_chat: false,
                            };
                            (job, format!("chat:{c}:{}:{bucket}", d.seq))
                        })
                        .collect()
                };
                // All sent before any ack is awaited: one round trip for
                // the post, not one per bucket.
                let mut acks = Vec::with_capacity(jobs.len());
                for (job, id) in jobs {
                    let msg = async_nats::jetstream::message::PublishMessage::build()
                        .payload(job.encode_to_vec().into())
                        .message_id(id);
                    let ack = self
                        .js
                        .send_publish(SHARD_JOBS, msg)
                        .await
                        .map_err(MembersError::ShardJob)?;
                    acks.push(ack.into_future());
                }
                let mut stored = 0;
                for ack in futures_util::future::join_all(acks).await {
                    stored += u64::from(!ack.map_err(MembersError::ShardJob)?.duplicate);
                }
                metrics::counter!("switchboard_router_shard_jobs_published_total")
                    .increment(stored);
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

    /// One bucket of a channel post (or every bucket of a small chat's):
    /// bump unread counters of every member,
    /// and queue a push job for every offline one. Safe to run again for
    /// the same job (a redelivery): no counter is bumped twice for one
    /// post, and a push job already queued within `SB_PUSH`'s
    /// de-duplication window is not queued again.
    pub async fn process_shard(&self, job: ShardJob) -> Result<(), MembersError> {
        let (Ok(channel), Some(d)) = (ChatId::parse(&job.channel), job.delivery) else {
            return Ok(());
        };
        let members = if job.whole_chat {
            self.all_members(&channel).await?
        } else {
            self.bucket(&channel, job.bucket).await?
        };
        let mut conn = self.conn.clone();
        for chunk in members.chunks(1000) {
            // EVAL, not EVALSHA: a pipeline cannot fall back when a
            // restarted Redis lost its script cache. Each call stays in its
            // user's slot.
            let mut pipe = redis::pipe();
            for u in chunk {
                pipe.cmd("EVAL")
                    .arg(COUNT_UNREAD)
                    .arg(2)
                    .arg(format!("sb:{{user:{u}}}:unread"))
                    .arg(format!("sb:{{user:{u}}}:counted"))
                    .arg(channel.as_str())
                    .arg(d.seq)
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
    fn every_redelivery_fits_the_dedup_window() {
        // Deliveries of a job spaced by the largest ack wait, with room for
        // the jobs' own run time: a retried push is always de-duplicated.
        let span = SHARD_ACK_WAIT_MAX * SHARD_MAX_DELIVER as u32;
        assert!(span * 3 / 2 < DEDUP_WINDOW, "{span:?}");
        assert!(MEMBER_RETRY_WINDOW * 2 <= DEDUP_WINDOW);
    }
}
