//! History over Redis: one Lua script sequences, de-duplicates and appends
//! atomically, so any number of router replicas keep one order per stream.
//!
//! Keys of a stream share a hash tag (`sb:{chat:team-1}:…`), so one stream
//! lives in one Redis Cluster slot:
//! - `…:seq`    INCR counter (last seq)
//! - `…:epoch`  random id of this history; created with the first message
//! - `…:log`    Redis stream, entry id `<seq>-0`, fields s/m/p/t (sender,
//!   client message id, payload, unix ms); `MAXLEN` = max messages
//! - `…:d:<sender>:<client_msg_id>` de-duplication key → `seq:ts`, `PX` =
//!   history age
//!
//! Idle streams expire after max(history age, 1 day); the next message
//! starts a new epoch and clients that resume are told to re-sync.
use async_trait::async_trait;
use bytes::Bytes;
use redis::streams::StreamRangeReply;
use switchboard_presence::RedisConn;
use switchboard_protocol::{StreamKey, now_ms, v1::StreamPosition};

use super::{Appended, Draft, History, HistoryError, HistoryLimits, Recovery, delivery_frame};

const APPEND: &str = r#"
local dup = redis.call('GET', KEYS[4])
local epoch = redis.call('GET', KEYS[3])
if dup and epoch then
  local sep = string.find(dup, ':', 1, true)
  return {0, tonumber(string.sub(dup, 1, sep - 1)), tonumber(string.sub(dup, sep + 1)), epoch}
end
if not epoch then
  epoch = ARGV[7]
  redis.call('SET', KEYS[3], epoch)
  redis.call('DEL', KEYS[1], KEYS[2])
end
local seq = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[5], seq .. '-0', 's', ARGV[2], 'm', ARGV[3], 'p', ARGV[4], 't', ARGV[1])
redis.call('SET', KEYS[4], seq .. ':' .. ARGV[1], 'PX', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[8])
redis.call('PEXPIRE', KEYS[2], ARGV[8])
redis.call('PEXPIRE', KEYS[3], ARGV[8])
return {1, seq, tonumber(ARGV[1]), epoch}
"#;

/// Streams idle longer than this are forgotten (ms), at least the history age.
const MIN_STREAM_TTL_MS: i64 = 86_400_000;

/// The Redis implementation of [`History`].
pub struct RedisHistory {
    conn: RedisConn,
    script: redis::Script,
    limits: HistoryLimits,
}

fn prefix(stream: &StreamKey) -> String {
    format!("sb:{{{stream}}}")
}

fn unavailable(e: redis::RedisError) -> HistoryError {
    metrics::counter!("switchboard_redis_errors_total", "op" => "history").increment(1);
    HistoryError::Redis(e)
}

/// Opens the Redis connection every backend shares: `redis://` or
/// `redis+unix://` (one server), `redis+cluster://h1:p1,h2:p2` (Redis
/// Cluster) or `redis+sentinel://s1:p1,s2:p2/MASTER` (the primary the
/// sentinels name, found again after a failover). ADR 0018.
pub async fn connect_redis(url: &str) -> Result<RedisConn, redis::RedisError> {
    switchboard_presence::connect_redis(url).await
}

impl RedisHistory {
    /// History on this connection.
    pub fn new(conn: impl Into<RedisConn>, limits: HistoryLimits) -> Self {
        RedisHistory {
            conn: conn.into(),
            script: redis::Script::new(APPEND),
            limits,
        }
    }
}

#[async_trait]
impl History for RedisHistory {
    async fn append(&self, stream: &StreamKey, draft: Draft) -> Result<Appended, HistoryError> {
        let p = prefix(stream);
        let dedup_key = format!("{p}:d:{}:{}", draft.sender, draft.client_msg_id);
        let fresh_epoch = format!("{:08x}", rand::random::<u32>());
        let ttl = self.limits.max_age_ms.max(1);
        let mut conn = self.conn.clone();
        let (fresh, seq, ts, epoch): (i64, u64, i64, String) = self
            .script
            .key(format!("{p}:seq"))
            .key(format!("{p}:log"))
            .key(format!("{p}:epoch"))
            .key(&dedup_key)
            .arg(draft.timestamp_ms)
            .arg(draft.sender.as_str())
            .arg(&draft.client_msg_id)
            .arg(draft.payload.as_ref())
            .arg(self.limits.max_messages)
            .arg(ttl)
            .arg(&fresh_epoch)
            .arg(ttl.max(MIN_STREAM_TTL_MS))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let frame = delivery_frame(
            stream,
            seq,
            ts,
            draft.sender.as_str(),
            &draft.client_msg_id,
            draft.payload,
            &epoch,
        );
        Ok(Appended {
            frame,
            seq,
            timestamp_ms: ts,
            duplicate: fresh == 0,
        })
    }

    async fn recover(
        &self,
        stream: &StreamKey,
        since: Option<u64>,
        epoch: &str,
    ) -> Result<Recovery, HistoryError> {
        let p = prefix(stream);
        let mut conn = self.conn.clone();
        let from = format!("{}-0", since.unwrap_or(u64::MAX - 1).saturating_add(1));
        let (stored_epoch, last_seq, range): (Option<String>, Option<u64>, StreamRangeReply) =
            redis::pipe()
                .atomic()
                .get(format!("{p}:epoch"))
                .get(format!("{p}:seq"))
                .cmd("XRANGE")
                .arg(format!("{p}:log"))
                .arg(if since.is_some() { from.as_str() } else { "+" })
                .arg("+")
                .arg("COUNT")
                .arg(self.limits.max_messages)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
        let stored_epoch = stored_epoch.unwrap_or_default();
        let last_seq = last_seq.unwrap_or(0);
        let mut position = StreamPosition {
            seq: last_seq,
            epoch: stored_epoch.clone(),
            ..Default::default()
        };
        let Some(since) = since else {
            return Ok(Recovery {
                position,
                frames: Vec::new(),
            });
        };
        if stored_epoch.is_empty() {
            position.resync_required = since > 0;
            return Ok(Recovery {
                position,
                frames: Vec::new(),
            });
        }
        if (!epoch.is_empty() && epoch != stored_epoch) || since > last_seq {
            position.resync_required = true;
            return Ok(Recovery {
                position,
                frames: Vec::new(),
            });
        }
        let oldest_allowed = now_ms() - self.limits.max_age_ms;
        let mut frames = Vec::with_capacity(range.ids.len());
        for entry in &range.ids {
            let seq: u64 = entry
                .id
                .split('-')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let ts: i64 = entry.get("t").unwrap_or(0);
            if ts < oldest_allowed || seq <= since {
                continue;
            }
            let sender: String = entry.get("s").unwrap_or_default();
            let cmid: String = entry.get("m").unwrap_or_default();
            let payload: Vec<u8> = entry.get("p").unwrap_or_default();
            frames.push((
                seq,
                delivery_frame(
                    stream,
                    seq,
                    ts,
                    &sender,
                    &cmid,
                    Bytes::from(payload),
                    &stored_epoch,
                ),
            ));
        }
        let first = frames.first().map(|(s, _)| *s).unwrap_or(last_seq + 1);
        position.resync_required = since + 1 < first;
        position.recovered = frames.len() as u32;
        Ok(Recovery {
            position,
            frames: frames.into_iter().map(|(_, f)| f).collect(),
        })
    }

    fn streams(&self) -> usize {
        // Not tracked for Redis (the keyspace is shared by the cluster).
        0
    }
}
