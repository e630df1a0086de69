//! A lane: one task that takes the queued events of its streams and users
//! in batches and appends them, one stream (or user) at a time in order,
//! different ones concurrently.
use std::{collections::HashMap, sync::Arc};

use switchboard_protocol::{StreamKey, events::v1::Event, v1::Delivery};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    Backlog,
    chain::{Head, Writer},
};

/// Events taken from the queue at once.
const BATCH: usize = 256;
/// Streams whose last tap position a lane remembers; beyond, it forgets
/// them all (each costs one lookup in the stream when it comes back).
const HEADS_PER_LANE: usize = 8192;

/// One queued event.
pub(super) enum Job {
    /// A sequenced message: appended in seq order per stream.
    Message {
        stream: StreamKey,
        /// The stream's tap subject.
        subject: String,
        delivery: Delivery,
    },
    /// A connection or presence event: appended as it comes.
    Plain {
        /// `u:<user>`: one user's events stay in order on this node.
        key: String,
        subject: String,
        msg_id: String,
        event: Event,
        kind: &'static str,
    },
}

impl Job {
    /// What keeps its order: the stream's subject, or the user.
    pub(super) fn key(&self) -> &str {
        match self {
            Job::Message { subject, .. } => subject,
            Job::Plain { key, .. } => key,
        }
    }

    /// Bytes it holds, about (what the queue's byte bound counts).
    pub(super) fn size(&self) -> usize {
        use prost::Message;
        match self {
            Job::Message {
                subject, delivery, ..
            } => subject.len() + delivery.encoded_len(),
            Job::Plain {
                key,
                subject,
                msg_id,
                event,
                ..
            } => key.len() + subject.len() + msg_id.len() + event.encoded_len(),
        }
    }

    /// The `kind` label.
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Job::Message { .. } => "message",
            Job::Plain { kind, .. } => kind,
        }
    }
}

pub(super) struct Lane {
    writer: Arc<Writer>,
    rx: mpsc::Receiver<Job>,
    closing: CancellationToken,
    backlog: Arc<Backlog>,
    /// Where each stream's subject ended when this lane last appended to
    /// or looked at it.
    heads: HashMap<String, Head>,
    /// `heads.len()` as last added to `switchboard_event_tap_heads`.
    reported_heads: usize,
}

impl Lane {
    pub(super) fn new(
        writer: Arc<Writer>,
        rx: mpsc::Receiver<Job>,
        closing: CancellationToken,
        backlog: Arc<Backlog>,
    ) -> Self {
        Lane {
            writer,
            rx,
            closing,
            backlog,
            heads: HashMap::new(),
            reported_heads: 0,
        }
    }

    /// Appends until closed, then what was queued before the close.
    pub(super) async fn run(mut self) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut closed = false;
        loop {
            tokio::select! {
                biased;
                _ = self.closing.cancelled(), if !closed => {
                    // No more sends; what is queued is still received.
                    self.rx.close();
                    closed = true;
                    continue;
                }
                n = self.rx.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        return;
                    }
                }
            }
            let (n, size) = (batch.len(), batch.iter().map(Job::size).sum());
            self.append(std::mem::take(&mut batch)).await;
            self.backlog.release(n, size);
        }
    }

    /// Appends one batch: the jobs of each key in order (a stream's by
    /// seq), the keys concurrently.
    async fn append(&mut self, batch: Vec<Job>) {
        let mut groups: Vec<(String, Vec<Job>)> = Vec::new();
        let mut at: HashMap<String, usize> = HashMap::new();
        for job in batch {
            match at.get(job.key()) {
                Some(&i) => groups[i].1.push(job),
                None => {
                    at.insert(job.key().to_owned(), groups.len());
                    groups.push((job.key().to_owned(), vec![job]));
                }
            }
        }
        let runs = groups.into_iter().map(|(key, mut jobs)| {
            sort_by_seq(&mut jobs);
            let head = self.heads.remove(&key);
            let writer = self.writer.clone();
            async move {
                let mut head = head;
                for job in jobs {
                    writer.append(job, &mut head).await;
                }
                (key, head)
            }
        });
        let done = futures_util::future::join_all(runs).await;
        if self.heads.len() + done.len() > HEADS_PER_LANE {
            self.heads.clear();
        }
        for (key, head) in done {
            if let Some(head) = head {
                self.heads.insert(key, head);
            }
        }
        let now = self.heads.len();
        metrics::gauge!("switchboard_event_tap_heads")
            .increment(now as f64 - self.reported_heads as f64);
        self.reported_heads = now;
    }
}

/// A stream's message jobs in seq order when they share an epoch (two
/// publishes answered by one Redis round trip may reach the tap in either
/// order); otherwise as they came.
fn sort_by_seq(jobs: &mut [Job]) {
    let epoch = match jobs.first() {
        Some(Job::Message { delivery, .. }) => delivery.epoch.clone(),
        _ => return,
    };
    let same = jobs
        .iter()
        .all(|j| matches!(j, Job::Message { delivery, .. } if delivery.epoch == epoch));
    if same {
        jobs.sort_by_key(|j| match j {
            Job::Message { delivery, .. } => delivery.seq,
            Job::Plain { .. } => 0,
        });
    }
}
