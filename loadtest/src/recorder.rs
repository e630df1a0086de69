//! Live collection of one process's measurements, turned into a
//! [`Report`] at the end. Counters are atomics; latency samples are
//! buffered per socket task and flushed in batches, so thousands of
//! sockets do not queue on one lock for every delivery.
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use serde_json::{Map, Value};

use crate::report::{Connections, Deliveries, Hist, Post, Report, Second, Server, now_us};

/// Samples a socket task keeps before taking the lock.
const BATCH: usize = 64;

/// Counters of one kind of traffic.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) sent: AtomicU64,
    pub(crate) expected: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) duplicated: AtomicU64,
    pub(crate) out_of_order: AtomicU64,
    /// Received, but later than the scenario's window after sending.
    pub(crate) late: AtomicU64,
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    pub(crate) fn get(c: &AtomicU64) -> u64 {
        c.load(Relaxed)
    }

    /// Everything expected has arrived.
    pub(crate) fn complete(&self) -> bool {
        self.received.load(Relaxed) >= self.expected.load(Relaxed)
    }
}

/// Fan-out times of one channel post, filled in by every subscriber.
#[derive(Default)]
struct PostSlot {
    sent_us: AtomicU64,
    last_us: AtomicU64,
    delivered: AtomicU64,
}

#[derive(Default)]
struct Samples {
    kinds: Vec<Hist>,
    /// Per kind: latency to the kernel's receipt of the frame (where
    /// sockets stamp their reads), not to the socket task reading it.
    kernel: Vec<Hist>,
    /// Per kind: sent → sequenced by the router (the publish's half).
    sequenced: Vec<Hist>,
    series: BTreeMap<u64, Second>,
}

/// One process's measurements while a scenario runs.
pub(crate) struct Recorder {
    names: Vec<&'static str>,
    kinds: Vec<Counters>,
    samples: Mutex<Samples>,
    posts: Vec<PostSlot>,
    attempted: AtomicU64,
    established: AtomicU64,
    failed: AtomicU64,
    refused: AtomicU64,
    first_attempt_us: AtomicU64,
    last_established_us: AtomicU64,
    started_us: u64,
    extra: Mutex<Extra>,
}

#[derive(Default)]
struct Extra {
    counters: BTreeMap<String, u64>,
    earliest_us: BTreeMap<String, u64>,
    latest_us: BTreeMap<String, u64>,
    hists: BTreeMap<String, Hist>,
}

impl Recorder {
    /// A recorder for these kinds of traffic (indices into `kinds` name
    /// them from then on) and up to `posts` channel posts.
    pub(crate) fn new(kinds: &[&'static str], posts: usize) -> Arc<Recorder> {
        Arc::new(Recorder {
            names: kinds.to_vec(),
            kinds: kinds.iter().map(|_| Counters::default()).collect(),
            samples: Mutex::new(Samples {
                kinds: kinds.iter().map(|_| Hist::fine()).collect(),
                kernel: kinds.iter().map(|_| Hist::fine()).collect(),
                sequenced: kinds.iter().map(|_| Hist::fine()).collect(),
                series: BTreeMap::new(),
            }),
            posts: (0..posts).map(|_| PostSlot::default()).collect(),
            attempted: AtomicU64::new(0),
            established: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            first_attempt_us: AtomicU64::new(u64::MAX),
            last_established_us: AtomicU64::new(0),
            started_us: now_us(),
            extra: Mutex::new(Extra::default()),
        })
    }

    pub(crate) fn kind(&self, kind: usize) -> &Counters {
        &self.kinds[kind]
    }

    /// Every kind has received all it expected.
    pub(crate) fn all_complete(&self) -> bool {
        self.kinds.iter().all(Counters::complete)
    }

    pub(crate) fn attempt(&self) {
        self.attempted.fetch_add(1, Relaxed);
        self.first_attempt_us.fetch_min(now_us(), Relaxed);
    }

    pub(crate) fn established(&self) {
        let now = now_us();
        self.established.fetch_add(1, Relaxed);
        self.last_established_us.fetch_max(now, Relaxed);
        let mut s = self.samples.lock().expect("samples lock");
        s.series.entry(now / 1_000_000).or_default().established += 1;
    }

    pub(crate) fn failed(&self) {
        self.failed.fetch_add(1, Relaxed);
    }

    pub(crate) fn refused(&self) {
        self.refused.fetch_add(1, Relaxed);
    }

    pub(crate) fn established_count(&self) -> u64 {
        self.established.load(Relaxed)
    }

    pub(crate) fn failed_count(&self) -> u64 {
        self.failed.load(Relaxed)
    }

    /// A delivery of channel post `post`, stamped `sent_us`, arrived at `now_us`.
    pub(crate) fn post_delivered(&self, post: u64, sent_us: u64, now_us: u64) {
        if let Some(slot) = self.posts.get(post as usize) {
            slot.sent_us.store(sent_us, Relaxed);
            slot.last_us.fetch_max(now_us, Relaxed);
            slot.delivered.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn add_counter(&self, name: &str, n: u64) {
        let mut e = self.extra.lock().expect("extra lock");
        *e.counters.entry(name.into()).or_default() += n;
    }

    pub(crate) fn earliest(&self, name: &str, us: u64) {
        let mut e = self.extra.lock().expect("extra lock");
        let v = e.earliest_us.entry(name.into()).or_insert(us);
        *v = (*v).min(us);
    }

    pub(crate) fn latest(&self, name: &str, us: u64) {
        let mut e = self.extra.lock().expect("extra lock");
        let v = e.latest_us.entry(name.into()).or_default();
        *v = (*v).max(us);
    }

    /// One sample of a scenario-specific distribution (not a delivery:
    /// an ack's latency, say), µs. Takes a lock: for a few thousand a
    /// second, not for every delivery.
    pub(crate) fn sample(&self, name: &str, us: u64) {
        let mut e = self.extra.lock().expect("extra lock");
        e.hists.entry(name.into()).or_default().record(us);
    }

    /// Many samples of one distribution at once (µs), under one lock: a
    /// task keeps its own and hands them over when done.
    pub(crate) fn sample_all(&self, name: &str, us: &[u64]) {
        if us.is_empty() {
            return;
        }
        let mut e = self.extra.lock().expect("extra lock");
        let h = e.hists.entry(name.into()).or_default();
        for v in us {
            h.record(*v);
        }
    }

    /// A sample buffer for one socket task.
    pub(crate) fn samples(self: &Arc<Self>) -> Batch {
        Batch {
            rec: self.clone(),
            buf: Vec::new(),
        }
    }

    fn flush(&self, buf: &mut Vec<Sample>) {
        if buf.is_empty() {
            return;
        }
        let mut s = self.samples.lock().expect("samples lock");
        for x in buf.drain(..) {
            s.kinds[x.kind].record(x.latency_us);
            if let Some(k) = x.kernel_us {
                s.kernel[x.kind].record(k);
            }
            if let Some(q) = x.sequenced_us {
                s.sequenced[x.kind].record(q);
            }
            s.series
                .entry(x.at_us / 1_000_000)
                .or_default()
                .latency
                .record(x.latency_us);
        }
    }

    /// This process's report.
    pub(crate) fn report(&self, scenario: &str, params: Value, server: Server) -> Report {
        let samples = self.samples.lock().expect("samples lock");
        let extra = self.extra.lock().expect("extra lock");
        let kinds = self
            .names
            .iter()
            .zip(&self.kinds)
            .zip(&samples.kinds)
            .map(|((name, c), h)| {
                let d = Deliveries {
                    sent: c.sent.load(Relaxed),
                    expected: c.expected.load(Relaxed),
                    received: c.received.load(Relaxed),
                    duplicated: c.duplicated.load(Relaxed),
                    out_of_order: c.out_of_order.load(Relaxed),
                    late: c.late.load(Relaxed),
                    latency: h.clone(),
                };
                (name.to_string(), d)
            })
            .collect();
        let posts = self
            .posts
            .iter()
            .enumerate()
            .filter(|(_, p)| p.delivered.load(Relaxed) > 0)
            .map(|(n, p)| {
                let post = Post {
                    sent_us: p.sent_us.load(Relaxed),
                    last_us: p.last_us.load(Relaxed),
                    delivered: p.delivered.load(Relaxed),
                };
                (n as u64, post)
            })
            .collect();
        let first = self.first_attempt_us.load(Relaxed);
        let mut hists = extra.hists.clone();
        for (name, h) in self.names.iter().zip(&samples.kernel) {
            if h.len() > 0 {
                hists.insert(format!("{KERNEL_PREFIX}{name}"), h.clone());
            }
        }
        for (name, h) in self.names.iter().zip(&samples.sequenced) {
            if h.len() > 0 {
                hists.insert(format!("{SEQUENCED_PREFIX}{name}"), h.clone());
            }
        }
        Report {
            scenario: scenario.into(),
            workers: 1,
            params: match params {
                Value::Object(m) => m,
                _ => Map::new(),
            },
            started_us: self.started_us,
            finished_us: now_us(),
            connections: Connections {
                attempted: self.attempted.load(Relaxed),
                established: self.established.load(Relaxed),
                failed: self.failed.load(Relaxed),
                refused_with_503: self.refused.load(Relaxed),
                first_attempt_us: if first == u64::MAX { 0 } else { first },
                last_established_us: self.last_established_us.load(Relaxed),
            },
            kinds,
            series: samples.series.clone(),
            posts,
            server,
            counters: extra.counters.clone(),
            earliest_us: extra.earliest_us.clone(),
            latest_us: extra.latest_us.clone(),
            hists,
        }
    }
}

/// The report's `hists` name of a kind's latency to the kernel's receipt.
pub(crate) const KERNEL_PREFIX: &str = "kernel_";
/// The report's `hists` name of a kind's time from send to sequencing.
pub(crate) const SEQUENCED_PREFIX: &str = "sequenced_";

/// One delivery's latency.
struct Sample {
    kind: usize,
    /// Unix µs its socket task read it.
    at_us: u64,
    /// Sent → read by its socket task.
    latency_us: u64,
    /// Sent → received by the kernel, where sockets stamp their reads.
    kernel_us: Option<u64>,
    /// Sent → sequenced by the router (its timestamp, ms).
    sequenced_us: Option<u64>,
}

/// Latency samples of one socket task, flushed to the recorder in
/// batches and when dropped.
pub(crate) struct Batch {
    rec: Arc<Recorder>,
    buf: Vec<Sample>,
}

impl Batch {
    /// A delivery of `kind` sent at `sent_us` arrived at `now_us`.
    pub(crate) fn latency(&mut self, kind: usize, sent_us: u64, now_us: u64) {
        self.latency_stamped(kind, sent_us, now_us, None);
    }

    /// Splits the last sample at its sequencing (`sequenced_ms`, the
    /// router's timestamp): how much of it was the publish's way in.
    pub(crate) fn sequenced_at(&mut self, sequenced_ms: i64) {
        if let Some(last) = self.buf.last_mut() {
            let at = u64::try_from(sequenced_ms).unwrap_or(0) * 1000;
            let sent = last.at_us - last.latency_us;
            last.sequenced_us = Some(at.saturating_sub(sent));
        }
    }

    /// As [`Batch::latency`], with the time the kernel received it, which
    /// leaves out how long the frame waited for its socket task (with
    /// thousands of sockets per load-generator thread, that wait is the
    /// load generator's, not the server's).
    pub(crate) fn latency_stamped(
        &mut self,
        kind: usize,
        sent_us: u64,
        now_us: u64,
        kernel_at_us: Option<u64>,
    ) {
        self.buf.push(Sample {
            kind,
            at_us: now_us,
            latency_us: now_us.saturating_sub(sent_us),
            kernel_us: kernel_at_us.map(|k| k.min(now_us).saturating_sub(sent_us)),
            sequenced_us: None,
        });
        if self.buf.len() >= BATCH {
            self.rec.flush(&mut self.buf);
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.rec.flush(&mut self.buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batched_samples_reach_the_report_in_their_second() {
        let rec = Recorder::new(&["a", "b"], 2);
        {
            let mut s = rec.samples();
            for i in 0..100u64 {
                s.latency(0, 5_000_000 + i, 5_000_000 + i + 1000);
            }
            s.latency(1, 6_000_000, 7_500_000);
        }
        Counters::add(&rec.kind(1).expected, 2);
        Counters::add(&rec.kind(1).received, 1);
        rec.post_delivered(1, 10, 20);
        rec.post_delivered(1, 10, 15);
        rec.post_delivered(9, 10, 15); // beyond the slots: ignored
        let r = rec.report("t", Value::Null, Server::default());
        assert_eq!(r.kinds["a"].latency.len(), 100);
        assert_eq!(r.kinds["b"].latency.len(), 1);
        assert_eq!(r.kinds["b"].expected, 2);
        assert_eq!(r.series[&5].latency.len(), 100);
        assert_eq!(r.series[&7].latency.len(), 1);
        assert_eq!(r.posts.len(), 1);
        assert_eq!(r.posts[&1].delivered, 2);
        assert_eq!(r.posts[&1].last_us, 20);
        assert!(!rec.all_complete());
    }
}
