//! In-process history for standalone mode.
use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
};

use async_trait::async_trait;
use dashmap::DashMap;
use switchboard_protocol::{SharedFrame, StreamKey, v1::StreamPosition};

use super::{Appended, Draft, History, HistoryError, HistoryLimits, Recovery, delivery_frame};

/// History in this process's memory, bounded by [`HistoryLimits`].
pub struct MemoryHistory {
    streams: DashMap<StreamKey, Mutex<Log>>,
    limits: HistoryLimits,
}

struct Log {
    epoch: String,
    last_seq: u64,
    last_write_ms: i64,
    /// (seq, timestamp_ms, frame), oldest first.
    window: VecDeque<(u64, i64, SharedFrame)>,
    dedup: HashMap<(String, String), (u64, i64)>,
    dedup_order: VecDeque<(String, String)>,
}

impl Log {
    fn new() -> Self {
        Log {
            epoch: new_epoch(),
            last_seq: 0,
            last_write_ms: 0,
            window: VecDeque::new(),
            dedup: HashMap::new(),
            dedup_order: VecDeque::new(),
        }
    }

    fn trim(&mut self, limits: &HistoryLimits, now_ms: i64) {
        while self.window.len() > limits.max_messages
            || self
                .window
                .front()
                .is_some_and(|(_, ts, _)| now_ms - ts > limits.max_age_ms)
        {
            self.window.pop_front();
        }
        while self.dedup_order.len() > limits.dedup_entries {
            if let Some(k) = self.dedup_order.pop_front() {
                self.dedup.remove(&k);
            }
        }
    }

    fn position(&self) -> StreamPosition {
        StreamPosition {
            seq: self.last_seq,
            epoch: self.epoch.clone(),
            ..Default::default()
        }
    }
}

fn new_epoch() -> String {
    format!("{:08x}", rand::random::<u32>())
}

impl MemoryHistory {
    /// An empty history with these limits.
    pub fn new(limits: HistoryLimits) -> Self {
        MemoryHistory {
            streams: DashMap::new(),
            limits,
        }
    }

    fn evict_if_full(&self, incoming: &StreamKey) {
        if self.streams.len() < self.limits.max_streams || self.streams.contains_key(incoming) {
            return;
        }
        // Rare (only at the cap): drop the least recently written stream.
        // Its epoch goes with it, so its clients are told to re-sync.
        let oldest = self
            .streams
            .iter()
            .min_by_key(|e| e.value().lock().map(|l| l.last_write_ms).unwrap_or(0))
            .map(|e| e.key().clone());
        if let Some(k) = oldest {
            self.streams.remove(&k);
            metrics::counter!("switchboard_history_evicted_streams_total").increment(1);
        }
    }
}

#[async_trait]
impl History for MemoryHistory {
    async fn append(&self, stream: &StreamKey, draft: Draft) -> Result<Appended, HistoryError> {
        self.evict_if_full(stream);
        let entry = self
            .streams
            .entry(stream.clone())
            .or_insert_with(|| Mutex::new(Log::new()));
        // The lock is held only for this synchronous block; a panic while
        // holding it is a bug, so a poisoned lock is recovered as is.
        let mut log = entry.lock().unwrap_or_else(|p| p.into_inner());
        let key = (draft.sender.to_string(), draft.client_msg_id.clone());
        if let Some(&(seq, ts)) = log.dedup.get(&key) {
            let frame = log
                .window
                .iter()
                .find(|(s, _, _)| *s == seq)
                .map(|(_, _, f)| f.clone())
                .unwrap_or_else(|| {
                    delivery_frame(
                        stream,
                        seq,
                        ts,
                        draft.sender.as_str(),
                        &draft.client_msg_id,
                        draft.payload.clone(),
                        &log.epoch,
                    )
                });
            return Ok(Appended {
                frame,
                seq,
                timestamp_ms: ts,
                duplicate: true,
            });
        }
        log.last_seq += 1;
        let seq = log.last_seq;
        let ts = draft.timestamp_ms;
        log.last_write_ms = ts;
        let frame = delivery_frame(
            stream,
            seq,
            ts,
            draft.sender.as_str(),
            &draft.client_msg_id,
            draft.payload.clone(),
            &log.epoch,
        );
        log.window.push_back((seq, ts, frame.clone()));
        log.dedup.insert(key.clone(), (seq, ts));
        log.dedup_order.push_back(key);
        log.trim(&self.limits, ts);
        Ok(Appended {
            frame,
            seq,
            timestamp_ms: ts,
            duplicate: false,
        })
    }

    async fn recover(
        &self,
        stream: &StreamKey,
        since: Option<u64>,
        epoch: &str,
    ) -> Result<Recovery, HistoryError> {
        // Reads never create a stream: subscribing to idle chats costs nothing.
        let Some(entry) = self.streams.get(stream) else {
            let position = StreamPosition {
                resync_required: since.is_some_and(|s| s > 0),
                ..Default::default()
            };
            return Ok(Recovery {
                position,
                frames: Vec::new(),
            });
        };
        let mut log = entry.lock().unwrap_or_else(|p| p.into_inner());
        log.trim(&self.limits, switchboard_protocol::now_ms());
        let mut position = log.position();
        let Some(since) = since else {
            return Ok(Recovery {
                position,
                frames: Vec::new(),
            });
        };
        let epoch_ok = epoch.is_empty() || epoch == log.epoch;
        if !epoch_ok || since > log.last_seq {
            position.resync_required = true;
            return Ok(Recovery {
                position,
                frames: Vec::new(),
            });
        }
        let oldest = log
            .window
            .front()
            .map(|(s, _, _)| *s)
            .unwrap_or(log.last_seq + 1);
        // Seqs since+1 ..= oldest-1 are gone: the client has a hole and must
        // re-sync; it still gets what the window holds.
        position.resync_required = since + 1 < oldest;
        let frames: Vec<SharedFrame> = log
            .window
            .iter()
            .filter(|(s, _, _)| *s > since)
            .map(|(_, _, f)| f.clone())
            .collect();
        position.recovered = frames.len() as u32;
        Ok(Recovery { position, frames })
    }

    fn streams(&self) -> usize {
        self.streams.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_protocol::{ChatId, UserId};

    fn chat(c: &str) -> StreamKey {
        StreamKey::Chat(ChatId::parse(c).unwrap())
    }

    fn draft(id: &str, ts: i64) -> Draft {
        Draft {
            sender: UserId::parse("alice").unwrap(),
            client_msg_id: id.into(),
            payload: bytes::Bytes::from_static(b"x"),
            timestamp_ms: ts,
        }
    }

    fn limits(max_messages: usize) -> HistoryLimits {
        HistoryLimits {
            max_messages,
            max_age_ms: i64::MAX / 4,
            max_streams: 2,
            dedup_entries: 100,
        }
    }

    #[tokio::test]
    async fn sequences_and_deduplicates() {
        let h = MemoryHistory::new(limits(10));
        let a = h.append(&chat("c"), draft("m1", 1)).await.unwrap();
        let b = h.append(&chat("c"), draft("m2", 2)).await.unwrap();
        let again = h.append(&chat("c"), draft("m1", 3)).await.unwrap();
        assert_eq!((a.seq, b.seq), (1, 2));
        assert!(again.duplicate);
        assert_eq!((again.seq, again.timestamp_ms), (1, 1));
        assert_eq!(
            h.append(&chat("other"), draft("m1", 4)).await.unwrap().seq,
            1
        );
    }

    #[tokio::test]
    async fn recovers_inside_the_window_and_flags_outside() {
        let h = MemoryHistory::new(limits(3));
        for i in 1..=5 {
            h.append(&chat("c"), draft(&format!("m{i}"), i))
                .await
                .unwrap();
        }
        let epoch = h
            .recover(&chat("c"), None, "")
            .await
            .unwrap()
            .position
            .epoch;
        let r = h.recover(&chat("c"), Some(3), &epoch).await.unwrap();
        let seqs: Vec<u64> = r
            .frames
            .iter()
            .map(|f| f.delivery_position().unwrap().1)
            .collect();
        assert_eq!(seqs, vec![4, 5]);
        assert!(!r.position.resync_required);
        assert_eq!(r.position.recovered, 2);

        // Window holds 3..=5: since=1 misses seq 2.
        let r = h.recover(&chat("c"), Some(1), &epoch).await.unwrap();
        assert!(r.position.resync_required);
        // Wrong epoch or a seq from the future: re-sync, nothing replayed.
        assert!(
            h.recover(&chat("c"), Some(5), "bogus")
                .await
                .unwrap()
                .position
                .resync_required
        );
        assert!(
            h.recover(&chat("c"), Some(9), &epoch)
                .await
                .unwrap()
                .position
                .resync_required
        );
        assert!(
            h.recover(&chat("c"), Some(5), &epoch)
                .await
                .unwrap()
                .frames
                .is_empty()
        );
    }

    #[tokio::test]
    async fn streams_are_bounded_and_eviction_changes_epoch() {
        let h = MemoryHistory::new(limits(3));
        h.append(&chat("a"), draft("m", 1)).await.unwrap();
        let epoch_a = h
            .recover(&chat("a"), None, "")
            .await
            .unwrap()
            .position
            .epoch;
        h.append(&chat("b"), draft("m", 2)).await.unwrap();
        h.append(&chat("c"), draft("m", 3)).await.unwrap();
        assert_eq!(h.streams(), 2);
        let r = h.recover(&chat("a"), Some(1), &epoch_a).await.unwrap();
        assert!(
            r.position.resync_required,
            "evicted stream must ask for re-sync"
        );
    }
}
