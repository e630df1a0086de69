//! History over Redis: one Lua script sequences, de-duplicates and appends
//! atomically, so any number of router replicas keep one order per stream.
//!
//! Keys of a stream share a hash tag (`sb:{chat:team-1}:…`), so one stream
//! lives in one Redis Cluster slot:
//! - `…:seq`    INCR counter (last seq)
//! - `…:epoch`  random id of this history; created with the first message
//! - `…:log`    Redis stream, entry id `<seq>-0`, fields s/m/p/t (sender,
//!   client message id, payload, unix ms); `MAXLEN` = max messages
//! - `…:d:<sender>:<client_msg_id>` de-duplication key → `seq:ts:epoch`,
//!   `PX` = history age
//! - `…:w`      `master_replid` of the primary that wrote the stream last
//! - `…:f`      `<epoch>:<last seq>` of the stream's last failover cut
//!
//! Idle streams expire after max(history age, 1 day); the next message
//! starts a new epoch and clients that resume are told to re-sync.
//!
//! Failover fencing (ADR 0019): a promoted replica has a new
//! `master_replid`, so a stream whose `…:w` names another primary may have
//! lost its latest acked writes. Its next append starts a new epoch (seq
//! goes on from what survived), so no (epoch, seq) is handed out twice;
//! each router counts the acked seqs it remembers above the surviving one
//! as lost (`rpo`).
//!
//! Appends are batched: concurrent ones go to Redis as one pipeline of
//! `EVALSHA` calls (`batch`), each call inside its stream's slot, so a
//! stream's messages keep their arrival order and one failing call leaves
//! the others alone.
use async_trait::async_trait;
use bytes::Bytes;
use redis::{Value, streams::StreamRangeReply};
use switchboard_presence::RedisConn;
use switchboard_protocol::{StreamKey, now_ms, v1::StreamPosition};

use super::{
    Appended, Draft, History, HistoryError, HistoryLimits, Recovery,
    batch::{BatchLimits, Batcher, Flush, Refused},
    delivery_frame,
    rpo::{ACKS_PER_STREAM, AckLog, Fence, MAX_STREAMS},
};

// KEYS: seq, log, epoch, dedup, writer (the master_replid of the primary
// that wrote last), fence (`<cut epoch>:<surviving seq>` of the last cut).
// ARGV: ts, sender, client msg id, payload, max messages, dedup ttl, fresh
// epoch, stream ttl, the epoch the caller last acked ("" when none).
// Returns {fresh, seq, ts, epoch, fenced now, fence record or ""}.
const APPEND: &str = r#"
local dup = redis.call('GET', KEYS[4])
local epoch = redis.call('GET', KEYS[3])
if dup and epoch then
  local a = string.find(dup, ':', 1, true)
  local b = string.find(dup, ':', a + 1, true)
  local dup_epoch = epoch
  local ts = string.sub(dup, a + 1)
  if b then
    ts = string.sub(dup, a + 1, b - 1)
    dup_epoch = string.sub(dup, b + 1)
  end
  return {0, tonumber(string.sub(dup, 1, a - 1)), tonumber(ts), dup_epoch, 0, ''}
end
local info = redis.call('INFO', 'replication')
local replid = string.match(info, 'master_replid:(%w+)') or ''
local previous = string.match(info, 'master_replid2:(%w+)') or ''
local fenced = 0
if not epoch then
  epoch = ARGV[7]
  redis.call('SET', KEYS[3], epoch)
  redis.call('DEL', KEYS[1], KEYS[2])
else
  local writer = redis.call('GET', KEYS[5])
  if writer and replid ~= '' and writer ~= replid and writer == previous then
    -- This node was promoted from the replica of the primary that wrote
    -- the stream last: that primary's latest acked writes may not have
    -- reached it. Cut the history: new epoch, seq goes on. (A writer id
    -- of another shard means the slot migrated here: nothing was lost.)
    fenced = 1
    local last = redis.call('GET', KEYS[1]) or '0'
    redis.call('SET', KEYS[6], epoch .. ':' .. last, 'PX', ARGV[8])
    epoch = ARGV[7]
    redis.call('SET', KEYS[3], epoch)
    redis.call('DEL', KEYS[2])
  end
end
if replid ~= '' then
  redis.call('SET', KEYS[5], replid, 'PX', ARGV[8])
end
local seq = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[5], seq .. '-0', 's', ARGV[2], 'm', ARGV[3], 'p', ARGV[4], 't', ARGV[1])
redis.call('SET', KEYS[4], seq .. ':' .. ARGV[1] .. ':' .. epoch, 'PX', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[8])
redis.call('PEXPIRE', KEYS[2], ARGV[8])
redis.call('PEXPIRE', KEYS[3], ARGV[8])
local cut = ''
if fenced == 1 or (ARGV[9] ~= '' and ARGV[9] ~= epoch) then
  cut = redis.call('GET', KEYS[6]) or ''
end
return {1, seq, tonumber(ARGV[1]), epoch, fenced, cut}
"#;

/// Streams idle longer than this are forgotten (ms), at least the history age.
const MIN_STREAM_TTL_MS: i64 = 86_400_000;

/// Appends waiting for their round trip at most; beyond, publishes are
/// refused as unavailable. Above a router's publish concurrency, so only
/// an overloaded Redis fills it.
const APPEND_QUEUE_CAPACITY: usize = 16_384;
/// Appends sent in one pipeline at most, by default.
const APPEND_BATCH_MAX: usize = 256;

/// The Redis implementation of [`History`].
pub struct RedisHistory {
    conn: RedisConn,
    script: redis::Script,
    appends: Batcher<AppendFlush>,
    limits: HistoryLimits,
    acked: AckLog,
}

/// Sends queued `EVALSHA` calls as one pipeline per hash slot.
struct AppendFlush {
    conn: RedisConn,
    script: redis::Script,
}

/// One queued append: its stream's hash tag (the slot it must go to) and
/// the script call.
struct AppendCall {
    tag: String,
    call: redis::Cmd,
}

impl Flush for AppendFlush {
    type Job = AppendCall;
    type Out = redis::RedisResult<Value>;

    async fn flush(&mut self, calls: Vec<AppendCall>) -> Vec<redis::RedisResult<Value>> {
        if !self.conn.is_cluster() {
            let calls = calls.into_iter().map(|c| c.call).collect();
            return send_appends(self.conn.clone(), &self.script, calls).await;
        }
        // A cluster refuses a pipeline that spans slots: one pipeline per
        // stream, all in flight at once (each to its slot's master).
        let mut groups: Vec<(String, Vec<usize>, Vec<redis::Cmd>)> = Vec::new();
        for (i, c) in calls.into_iter().enumerate() {
            match groups.iter_mut().find(|g| g.0 == c.tag) {
                Some(g) => {
                    g.1.push(i);
                    g.2.push(c.call);
                }
                None => groups.push((c.tag, vec![i], vec![c.call])),
            }
        }
        let n = groups.iter().map(|g| g.1.len()).sum();
        let sends = groups.into_iter().map(|(_, at, calls)| {
            let conn = self.conn.clone();
            let script = &self.script;
            async move { (at, send_appends(conn, script, calls).await) }
        });
        let mut answers: Vec<Option<redis::RedisResult<Value>>> = (0..n).map(|_| None).collect();
        for (at, got) in futures_util::future::join_all(sends).await {
            for (i, a) in at.into_iter().zip(got) {
                answers[i] = Some(a);
            }
        }
        answers
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Err(answer_count_error())))
            .collect()
    }
}

/// Sends `calls` as one pipeline; when Redis lost its script cache
/// (restart, failover) loads the script and resends, in order, the calls
/// that did not run.
async fn send_appends(
    mut conn: RedisConn,
    script: &redis::Script,
    calls: Vec<redis::Cmd>,
) -> Vec<redis::RedisResult<Value>> {
    let mut pipe = redis::pipe();
    for call in calls {
        pipe.add_command(call);
    }
    let mut answers = send(&mut conn, &pipe).await;
    let no_script = |a: &redis::RedisResult<Value>| matches!(a, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript));
    if answers.iter().any(no_script) {
        if let Err(e) = script.prepare_invoke().load_async(&mut conn).await {
            return answers.into_iter().map(|_| Err(e.clone())).collect();
        }
        let again: Vec<usize> = (0..answers.len())
            .filter(|i| no_script(&answers[*i]))
            .collect();
        let mut retry = redis::pipe();
        for call in pipe
            .cmd_iter()
            .enumerate()
            .filter(|(i, _)| again.contains(i))
        {
            retry.add_command(call.1.clone());
        }
        for (i, answer) in again.into_iter().zip(send(&mut conn, &retry).await) {
            answers[i] = answer;
        }
    }
    answers
}

/// One answer per call; a failed round trip fails each call.
async fn send(conn: &mut RedisConn, pipe: &redis::Pipeline) -> Vec<redis::RedisResult<Value>> {
    let n = pipe.cmd_iter().count();
    match pipe
        .clone()
        .ignore_errors()
        .query_async::<Vec<redis::RedisResult<Value>>>(conn)
        .await
    {
        Ok(answers) if answers.len() == n => answers,
        Ok(_) => (0..n).map(|_| Err(answer_count_error())).collect(),
        Err(e) => (0..n).map(|_| Err(e.clone())).collect(),
    }
}

fn answer_count_error() -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Client,
        "pipeline answer count differs from its calls",
    ))
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
    /// History on this connection; spawns the append batching task (call
    /// it inside a tokio runtime), which ends when the history is dropped.
    pub fn new(conn: impl Into<RedisConn>, limits: HistoryLimits) -> Self {
        Self::with_append_batch(conn, limits, APPEND_BATCH_MAX)
    }

    /// History that sends at most `batch` appends per round trip (1: one
    /// round trip per append, no batching).
    pub fn with_append_batch(
        conn: impl Into<RedisConn>,
        limits: HistoryLimits,
        batch: usize,
    ) -> Self {
        let conn = conn.into();
        let script = redis::Script::new(APPEND);
        let flush = AppendFlush {
            conn: conn.clone(),
            script: script.clone(),
        };
        let batch = BatchLimits {
            queue_capacity: APPEND_QUEUE_CAPACITY,
            max_batch: batch.max(1),
        };
        RedisHistory {
            conn,
            script,
            appends: Batcher::spawn(flush, batch),
            limits,
            acked: AckLog::new(MAX_STREAMS, ACKS_PER_STREAM),
        }
    }

    /// (acked messages counted as lost, streams fenced) by this history
    /// since it started: what it added to
    /// `switchboard_history_failover_lost_total` and
    /// `switchboard_history_epoch_fenced_total`.
    pub fn failover_counts(&self) -> (u64, u64) {
        self.acked.totals()
    }
}

#[async_trait]
impl History for RedisHistory {
    async fn append(&self, stream: &StreamKey, draft: Draft) -> Result<Appended, HistoryError> {
        let p = prefix(stream);
        let dedup_key = format!("{p}:d:{}:{}", draft.sender, draft.client_msg_id);
        let fresh_epoch = format!("{:08x}", rand::random::<u32>());
        let ttl = self.limits.max_age_ms.max(1);
        let acked_epoch = self.acked.epoch_of(&p);
        let mut call = redis::cmd("EVALSHA");
        call.arg(self.script.get_hash())
            .arg(6)
            .arg(format!("{p}:seq"))
            .arg(format!("{p}:log"))
            .arg(format!("{p}:epoch"))
            .arg(&dedup_key)
            .arg(format!("{p}:w"))
            .arg(format!("{p}:f"))
            .arg(draft.timestamp_ms)
            .arg(draft.sender.as_str())
            .arg(&draft.client_msg_id)
            .arg(draft.payload.as_ref())
            .arg(self.limits.max_messages)
            .arg(ttl)
            .arg(&fresh_epoch)
            .arg(ttl.max(MIN_STREAM_TTL_MS))
            .arg(&acked_epoch);
        let call = AppendCall {
            tag: p.clone(),
            call,
        };
        let answer = self.appends.submit(call).await.map_err(|r| match r {
            Refused::Full => HistoryError::QueueFull {
                capacity: APPEND_QUEUE_CAPACITY,
            },
            Refused::Stopped => HistoryError::Stopped,
        })?;
        let (fresh, seq, ts, epoch, fenced, cut): (i64, u64, i64, String, i64, String) = answer
            .and_then(|v| Ok(redis::from_redis_value(v)?))
            .map_err(unavailable)?;
        if fresh != 0 {
            let fence = Fence::parse(&cut);
            self.acked
                .on_acked(&p, &epoch, seq, fence.as_ref(), fenced != 0);
        }
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

    /// One pipeline of two GETs per stream (on a Redis Cluster the
    /// connection sends them to their slots' nodes concurrently).
    async fn positions(&self, streams: &[StreamKey]) -> Result<Vec<StreamPosition>, HistoryError> {
        if streams.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for stream in streams {
            let p = prefix(stream);
            pipe.get(format!("{p}:epoch")).get(format!("{p}:seq"));
        }
        let raw: Vec<Option<String>> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(raw
            .chunks(2)
            .map(|pair| StreamPosition {
                epoch: pair[0].clone().unwrap_or_default(),
                seq: pair[1].as_deref().and_then(|s| s.parse().ok()).unwrap_or(0),
                ..Default::default()
            })
            .collect())
    }

    fn streams(&self) -> usize {
        // Not tracked for Redis (the keyspace is shared by the cluster).
        0
    }
}
