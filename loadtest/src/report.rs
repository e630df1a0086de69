//! The one report every scenario produces.
//!
//! A [`Report`] holds raw, mergeable numbers only: counts, histograms as
//! their recorded (value, count) pairs, earliest and latest timestamps. A
//! worker prints it as one JSON line; the parent merges the workers'
//! reports and [`Report::render`]s the result, computing every derived
//! figure (loss, rates, percentiles) once, from the merged numbers.
use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value, json};

/// Latencies are microseconds, recorded up to an hour (values above
/// saturate instead of being dropped).
const MAX_US: u64 = 3_600_000_000;

/// Significant digits of the whole-run histograms.
const FINE: u8 = 3;
/// Significant digits of the per-second histograms: ~25 KiB each instead
/// of ~190 KiB, still 1% resolution.
const COARSE: u8 = 2;

/// How many posts a rendered report lists one by one.
const POSTS_LISTED: usize = 1000;

/// Microseconds since the Unix epoch: every process on one box shares
/// this clock, so timestamps and series from several workers line up.
pub(crate) fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// An HDR histogram of microseconds that serializes as its recorded
/// (value, count) pairs, so that merging loses nothing.
#[derive(Clone, Debug)]
pub(crate) struct Hist(Histogram<u64>);

impl Hist {
    fn with_sigfig(sigfig: u8) -> Hist {
        Hist(Histogram::new_with_bounds(1, MAX_US, sigfig).expect("valid histogram bounds"))
    }

    /// For whole-run distributions.
    pub(crate) fn fine() -> Hist {
        Hist::with_sigfig(FINE)
    }

    /// For one second of a time series.
    pub(crate) fn coarse() -> Hist {
        Hist::with_sigfig(COARSE)
    }

    pub(crate) fn record(&mut self, us: u64) {
        self.0.saturating_record(us.clamp(1, MAX_US));
    }

    pub(crate) fn merge(&mut self, other: &Hist) {
        // Same bounds on both sides, so every value fits.
        self.0.add(&other.0).expect("histograms share their bounds");
    }

    pub(crate) fn len(&self) -> u64 {
        self.0.len()
    }

    pub(crate) fn quantile_ms(&self, q: f64) -> f64 {
        self.0.value_at_quantile(q) as f64 / 1000.0
    }

    pub(crate) fn max_ms(&self) -> f64 {
        self.0.max() as f64 / 1000.0
    }

    /// Cumulative distribution: (latency ms, fraction of samples at or
    /// below it), one point per recorded bucket.
    pub(crate) fn cdf(&self) -> Vec<(f64, f64)> {
        let total = self.0.len().max(1) as f64;
        let mut seen = 0u64;
        self.0
            .iter_recorded()
            .map(|v| {
                seen += v.count_at_value();
                (v.value_iterated_to() as f64 / 1000.0, seen as f64 / total)
            })
            .collect()
    }

    /// p50 .. max in milliseconds, with the sample count.
    pub(crate) fn summary(&self) -> Value {
        if self.len() == 0 {
            return json!({ "samples": 0 });
        }
        json!({
            "samples": self.len(),
            "mean": self.0.mean() / 1000.0,
            "p50": self.quantile_ms(0.5),
            "p90": self.quantile_ms(0.9),
            "p95": self.quantile_ms(0.95),
            "p99": self.quantile_ms(0.99),
            "p999": self.quantile_ms(0.999),
            "max": self.max_ms(),
        })
    }
}

impl Default for Hist {
    fn default() -> Hist {
        Hist::fine()
    }
}

#[derive(Serialize, Deserialize)]
struct HistRepr {
    sigfig: u8,
    /// (value µs, count) for every non-empty bucket.
    counts: Vec<(u64, u64)>,
}

impl Serialize for Hist {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        HistRepr {
            sigfig: self.0.sigfig(),
            counts: self
                .0
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Hist {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Hist, D::Error> {
        let repr = HistRepr::deserialize(d)?;
        if !(1..=5).contains(&repr.sigfig) {
            return Err(serde::de::Error::custom("sigfig must be 1..=5"));
        }
        let mut h = Hist::with_sigfig(repr.sigfig);
        for (value, count) in repr.counts {
            h.0.saturating_record_n(value.clamp(1, MAX_US), count);
        }
        Ok(h)
    }
}

/// Sockets opened by the load generator.
#[derive(Serialize, Deserialize, Default, Clone, Debug, PartialEq)]
pub(crate) struct Connections {
    pub(crate) attempted: u64,
    pub(crate) established: u64,
    pub(crate) failed: u64,
    /// Refused by the edge's admission control (HTTP 503), then retried.
    pub(crate) refused_with_503: u64,
    /// Unix µs of the first attempt (0: none).
    pub(crate) first_attempt_us: u64,
    /// Unix µs of the last socket established (0: none).
    pub(crate) last_established_us: u64,
}

/// What one kind of traffic delivered.
#[derive(Serialize, Deserialize, Default, Clone, Debug)]
pub(crate) struct Deliveries {
    /// Messages (or receipts, typing events, presence changes) sent.
    pub(crate) sent: u64,
    /// Deliveries the sends should have caused.
    pub(crate) expected: u64,
    /// Distinct deliveries received (late ones included).
    pub(crate) received: u64,
    /// Received again, or (for unsequenced kinds) matching nothing sent.
    pub(crate) duplicated: u64,
    /// Arrived after a higher seq of the same stream.
    pub(crate) out_of_order: u64,
    /// Received, but later than the scenario's window (counted in
    /// `received` too).
    #[serde(default)]
    pub(crate) late: u64,
    /// Send-to-receive latency of each delivery, µs.
    pub(crate) latency: Hist,
}

impl Deliveries {
    fn merge(&mut self, o: &Deliveries) {
        self.sent += o.sent;
        self.expected += o.expected;
        self.received += o.received;
        self.duplicated += o.duplicated;
        self.out_of_order += o.out_of_order;
        self.late += o.late;
        self.latency.merge(&o.latency);
    }

    fn render(&self) -> Value {
        json!({
            "sent": self.sent,
            "deliveries_expected": self.expected,
            "deliveries_received": self.received,
            "lost": self.expected.saturating_sub(self.received),
            "duplicated": self.duplicated,
            "out_of_order": self.out_of_order,
            "late": self.late,
            "latency_ms": self.latency.summary(),
        })
    }
}

/// One wall-clock second of a run.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub(crate) struct Second {
    /// Latency of the deliveries received in this second, all kinds.
    pub(crate) latency: Hist,
    /// Sockets established in this second.
    pub(crate) established: u64,
}

impl Default for Second {
    fn default() -> Second {
        Second {
            latency: Hist::coarse(),
            established: 0,
        }
    }
}

/// One channel post: when it went out and when its last copy arrived.
#[derive(Serialize, Deserialize, Default, Clone, Debug, PartialEq)]
pub(crate) struct Post {
    /// Unix µs the publisher stamped into the post (0: unknown).
    pub(crate) sent_us: u64,
    /// Unix µs of its last delivery.
    pub(crate) last_us: u64,
    /// Subscribers that received it.
    pub(crate) delivered: u64,
}

/// Readings of the edge (and router) processes and of the kernel, taken
/// by worker 0 only, around the phase that matters.
#[derive(Serialize, Deserialize, Default, Clone, Debug, PartialEq)]
pub(crate) struct Server {
    pub(crate) edge_rss_before_bytes: Option<u64>,
    pub(crate) edge_rss_after_bytes: Option<u64>,
    pub(crate) kernel_slab_before_bytes: Option<u64>,
    pub(crate) kernel_slab_after_bytes: Option<u64>,
    pub(crate) kernel_tcp_before_bytes: Option<u64>,
    pub(crate) kernel_tcp_after_bytes: Option<u64>,
    /// CPU over the window the scenario's per-delivery figures claim
    /// (from the first post to the last delivery, or the timeout).
    pub(crate) edge_cpu_seconds: Option<f64>,
    pub(crate) router_cpu_seconds: Option<f64>,
    /// Length of that window.
    #[serde(default)]
    pub(crate) cpu_window_seconds: Option<f64>,
    /// CPU while the sockets connected (and subscribed), apart.
    #[serde(default)]
    pub(crate) edge_cpu_connect_seconds: Option<f64>,
    #[serde(default)]
    pub(crate) router_cpu_connect_seconds: Option<f64>,
    /// CPU of the edges while every socket was held and nothing was
    /// posted (heartbeats, timers), and the length of that window: the
    /// held sockets' own cost, apart from a post's.
    #[serde(default)]
    pub(crate) edge_cpu_idle_seconds: Option<f64>,
    #[serde(default)]
    pub(crate) idle_window_seconds: Option<f64>,
}

impl Server {
    fn merge(&mut self, o: &Server) {
        let Server {
            edge_rss_before_bytes,
            edge_rss_after_bytes,
            kernel_slab_before_bytes,
            kernel_slab_after_bytes,
            kernel_tcp_before_bytes,
            kernel_tcp_after_bytes,
            edge_cpu_seconds,
            router_cpu_seconds,
            cpu_window_seconds,
            edge_cpu_connect_seconds,
            router_cpu_connect_seconds,
            edge_cpu_idle_seconds,
            idle_window_seconds,
        } = o;
        // Only one worker measures; keep whichever reading exists.
        self.edge_rss_before_bytes = self.edge_rss_before_bytes.or(*edge_rss_before_bytes);
        self.edge_rss_after_bytes = self.edge_rss_after_bytes.or(*edge_rss_after_bytes);
        self.kernel_slab_before_bytes = self.kernel_slab_before_bytes.or(*kernel_slab_before_bytes);
        self.kernel_slab_after_bytes = self.kernel_slab_after_bytes.or(*kernel_slab_after_bytes);
        self.kernel_tcp_before_bytes = self.kernel_tcp_before_bytes.or(*kernel_tcp_before_bytes);
        self.kernel_tcp_after_bytes = self.kernel_tcp_after_bytes.or(*kernel_tcp_after_bytes);
        self.edge_cpu_seconds = self.edge_cpu_seconds.or(*edge_cpu_seconds);
        self.router_cpu_seconds = self.router_cpu_seconds.or(*router_cpu_seconds);
        self.cpu_window_seconds = self.cpu_window_seconds.or(*cpu_window_seconds);
        self.edge_cpu_connect_seconds = self.edge_cpu_connect_seconds.or(*edge_cpu_connect_seconds);
        self.router_cpu_connect_seconds = self
            .router_cpu_connect_seconds
            .or(*router_cpu_connect_seconds);
        self.edge_cpu_idle_seconds = self.edge_cpu_idle_seconds.or(*edge_cpu_idle_seconds);
        self.idle_window_seconds = self.idle_window_seconds.or(*idle_window_seconds);
    }

    fn render(&self, connections: u64) -> Value {
        let per = |before: Option<u64>, after: Option<u64>| match (before, after) {
            (Some(b), Some(a)) if connections > 0 => {
                Some((a as f64 - b as f64) / connections as f64)
            }
            _ => None,
        };
        json!({
            "edge_rss_before_bytes": self.edge_rss_before_bytes,
            "edge_rss_after_bytes": self.edge_rss_after_bytes,
            "edge_rss_per_connection_bytes": per(self.edge_rss_before_bytes, self.edge_rss_after_bytes),
            "kernel_slab_per_connection_bytes": per(self.kernel_slab_before_bytes, self.kernel_slab_after_bytes),
            "kernel_tcp_buffer_per_connection_bytes": per(self.kernel_tcp_before_bytes, self.kernel_tcp_after_bytes),
            "edge_cpu_seconds": self.edge_cpu_seconds,
            "router_cpu_seconds": self.router_cpu_seconds,
            "cpu_window_seconds": self.cpu_window_seconds,
            "edge_cpu_connect_seconds": self.edge_cpu_connect_seconds,
            "router_cpu_connect_seconds": self.router_cpu_connect_seconds,
            "edge_cpu_idle_seconds": self.edge_cpu_idle_seconds,
            "idle_window_seconds": self.idle_window_seconds,
        })
    }
}

/// Everything one process (or, merged, a fleet of them) measured.
#[derive(Serialize, Deserialize, Default, Clone, Debug)]
pub(crate) struct Report {
    pub(crate) scenario: String,
    /// Processes merged into this report.
    pub(crate) workers: u32,
    /// The scenario's settings, as given (the same in every worker).
    pub(crate) params: Map<String, Value>,
    /// Unix µs the scenario started and finished.
    pub(crate) started_us: u64,
    pub(crate) finished_us: u64,
    pub(crate) connections: Connections,
    /// Traffic by kind (e.g. "dm", "channel"); empty where nothing is delivered.
    pub(crate) kinds: BTreeMap<String, Deliveries>,
    /// Unix second → that second's figures.
    pub(crate) series: BTreeMap<u64, Second>,
    /// Channel post number → its fan-out times.
    pub(crate) posts: BTreeMap<u64, Post>,
    pub(crate) server: Server,
    /// Scenario-specific counts, summed over workers.
    pub(crate) counters: BTreeMap<String, u64>,
    /// Scenario-specific unix µs, earliest over workers.
    pub(crate) earliest_us: BTreeMap<String, u64>,
    /// Scenario-specific unix µs, latest over workers.
    pub(crate) latest_us: BTreeMap<String, u64>,
    /// Scenario-specific distributions (µs), merged over workers.
    #[serde(default)]
    pub(crate) hists: BTreeMap<String, Hist>,
}

/// Earliest of two timestamps where 0 means "none".
fn min_set(a: u64, b: u64) -> u64 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (a, b) => a.min(b),
    }
}

impl Report {
    pub(crate) fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }

    /// Adds another worker's report to this one.
    pub(crate) fn merge(&mut self, o: &Report) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.scenario.is_empty() || o.scenario.is_empty() || self.scenario == o.scenario,
            "cannot merge a {} report into a {} report",
            o.scenario,
            self.scenario
        );
        if self.scenario.is_empty() {
            self.scenario = o.scenario.clone();
        }
        self.workers += o.workers;
        if self.params.is_empty() {
            self.params = o.params.clone();
        }
        self.started_us = min_set(self.started_us, o.started_us);
        self.finished_us = self.finished_us.max(o.finished_us);
        let (c, oc) = (&mut self.connections, &o.connections);
        c.attempted += oc.attempted;
        c.established += oc.established;
        c.failed += oc.failed;
        c.refused_with_503 += oc.refused_with_503;
        c.first_attempt_us = min_set(c.first_attempt_us, oc.first_attempt_us);
        c.last_established_us = c.last_established_us.max(oc.last_established_us);
        for (k, d) in &o.kinds {
            self.kinds.entry(k.clone()).or_default().merge(d);
        }
        for (t, s) in &o.series {
            let mine = self.series.entry(*t).or_default();
            mine.latency.merge(&s.latency);
            mine.established += s.established;
        }
        for (n, p) in &o.posts {
            let mine = self.posts.entry(*n).or_default();
            mine.sent_us = min_set(mine.sent_us, p.sent_us);
            mine.last_us = mine.last_us.max(p.last_us);
            mine.delivered += p.delivered;
        }
        self.server.merge(&o.server);
        for (k, v) in &o.counters {
            *self.counters.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.earliest_us {
            let mine = self.earliest_us.entry(k.clone()).or_default();
            *mine = min_set(*mine, *v);
        }
        for (k, v) in &o.latest_us {
            let mine = self.latest_us.entry(k.clone()).or_default();
            *mine = (*mine).max(*v);
        }
        for (k, h) in &o.hists {
            self.hists.entry(k.clone()).or_default().merge(h);
        }
        Ok(())
    }

    /// Refused upgrades retried, by HTTP status.
    pub(crate) fn refused_retried(&self) -> Map<String, Value> {
        self.counters
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("refused_retried_")?.to_owned(), json!(v))))
            .collect()
    }

    /// All kinds together.
    pub(crate) fn total(&self) -> Deliveries {
        let mut all = Deliveries::default();
        for d in self.kinds.values() {
            all.merge(d);
        }
        all
    }

    /// Seconds between two timestamps, if both are set.
    pub(crate) fn span_secs(from_us: u64, to_us: u64) -> Option<f64> {
        (from_us > 0 && to_us >= from_us).then(|| (to_us - from_us) as f64 / 1e6)
    }

    /// The series with every second from the first to the last filled in:
    /// (unix second, latency of that second, sockets established so far).
    pub(crate) fn timeline(&self) -> Vec<(u64, Hist, u64)> {
        let (Some(first), Some(last)) = (
            self.series.keys().next().copied(),
            self.series.keys().next_back().copied(),
        ) else {
            return Vec::new();
        };
        let mut established = 0;
        (first..=last)
            .map(|t| match self.series.get(&t) {
                Some(s) => {
                    established += s.established;
                    (t, s.latency.clone(), established)
                }
                None => (t, Hist::coarse(), established),
            })
            .collect()
    }

    /// Fan-out time of each post: (post number, ms from send to last
    /// delivery, subscribers reached).
    pub(crate) fn post_times(&self) -> Vec<(u64, f64, u64)> {
        self.posts
            .iter()
            .filter(|(_, p)| p.sent_us > 0 && p.last_us > 0)
            .map(|(n, p)| {
                let ms = p.last_us.saturating_sub(p.sent_us) as f64 / 1000.0;
                (*n, ms, p.delivered)
            })
            .collect()
    }

    /// The final, human- and script-facing JSON.
    pub(crate) fn render(&self) -> Value {
        let mut out = Map::new();
        out.insert("scenario".into(), json!(self.scenario));
        out.insert("workers".into(), json!(self.workers));
        out.insert("params".into(), Value::Object(self.params.clone()));
        out.insert("started_unix_ms".into(), json!(self.started_us / 1000));
        out.insert(
            "duration_secs".into(),
            json!(Report::span_secs(self.started_us, self.finished_us)),
        );
        let c = &self.connections;
        let connect_secs = Report::span_secs(c.first_attempt_us, c.last_established_us);
        out.insert(
            "connections".into(),
            json!({
                "attempted": c.attempted,
                "established": c.established,
                "failed": c.failed,
                "refused_with_503": c.refused_with_503,
                "refused_retried": self.refused_retried(),
                "not_connected": c.failed,
                "connect_seconds": connect_secs,
                "connects_per_second": connect_secs.filter(|s| *s > 0.0).map(|s| c.established as f64 / s),
            }),
        );
        if !self.kinds.is_empty() {
            let total = self.total();
            if let Value::Object(m) = total.render() {
                out.extend(m);
            }
            let kinds: Map<String, Value> = self
                .kinds
                .iter()
                .map(|(k, d)| (k.clone(), d.render()))
                .collect();
            out.insert("kinds".into(), Value::Object(kinds));
        }
        if !self.posts.is_empty() {
            out.insert("posts".into(), self.render_posts());
        }
        // Scenarios that open sockets twice say how many were held.
        let held = self
            .counters
            .get("sockets_at_probe")
            .copied()
            .unwrap_or(c.established);
        out.insert("server".into(), self.server.render(held));
        let series: Vec<Value> = self
            .timeline()
            .into_iter()
            .map(|(t, h, established)| {
                let n = h.len();
                json!({
                    "unix_secs": t,
                    "latency_samples": n,
                    "p50_ms": (n > 0).then(|| h.quantile_ms(0.5)),
                    "p99_ms": (n > 0).then(|| h.quantile_ms(0.99)),
                    "max_ms": (n > 0).then(|| h.max_ms()),
                    "established": established,
                })
            })
            .collect();
        out.insert("series".into(), Value::Array(series));
        // Scenario figures last, so they may refine the generic ones.
        out.extend(crate::scenario_figures(self));
        Value::Object(out)
    }

    fn render_posts(&self) -> Value {
        let times = self.post_times();
        let mut hist = Hist::fine();
        for (_, ms, _) in &times {
            hist.record((ms * 1000.0) as u64);
        }
        let listed: Vec<Value> = times
            .iter()
            .take(POSTS_LISTED)
            .map(|(n, ms, d)| json!({ "post": n, "ms_to_last_delivery": ms, "delivered": d }))
            .collect();
        json!({
            "count": self.posts.len(),
            "time_to_last_delivery_ms": hist.summary(),
            "each": listed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(values: &[u64]) -> Hist {
        let mut h = Hist::fine();
        for v in values {
            h.record(*v);
        }
        h
    }

    fn worker(kind: &str, sent: u64, expected: u64, received: u64, lat: &[u64]) -> Report {
        let mut r = Report {
            scenario: "channel".into(),
            workers: 1,
            ..Default::default()
        };
        r.kinds.insert(
            kind.into(),
            Deliveries {
                sent,
                expected,
                received,
                duplicated: 1,
                out_of_order: 2,
                late: 0,
                latency: hist(lat),
            },
        );
        r
    }

    #[test]
    fn a_histogram_survives_json_unchanged() {
        let h = hist(&[1, 7, 7, 950, 1_234_567, 59_000_000, MAX_US * 2]);
        let back: Hist = serde_json::from_str(&serde_json::to_string(&h).unwrap()).unwrap();
        assert_eq!(back.len(), h.len());
        assert_eq!(back.0.max(), h.0.max());
        for q in [0.0, 0.25, 0.5, 0.75, 0.9, 1.0] {
            assert_eq!(
                back.0.value_at_quantile(q),
                h.0.value_at_quantile(q),
                "q {q}"
            );
        }
        let coarse: Hist =
            serde_json::from_str(&serde_json::to_string(&Hist::coarse()).unwrap()).unwrap();
        assert_eq!(coarse.0.sigfig(), COARSE);
    }

    #[test]
    fn merged_histograms_equal_one_histogram_of_all_samples() {
        let a: Vec<u64> = (1..=1000).map(|i| i * 37).collect();
        let b: Vec<u64> = (1..=500).map(|i| i * 1013 + 5).collect();
        let mut merged = Report::default();
        for part in [&a, &b] {
            let r = worker("channel", 0, 0, 0, part);
            // Through JSON, as a worker's report travels.
            let r: Report = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
            merged.merge(&r).unwrap();
        }
        let all = hist(&[a.clone(), b.clone()].concat());
        let got = &merged.kinds["channel"].latency;
        assert_eq!(got.len(), 1500);
        for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(
                got.0.value_at_quantile(q),
                all.0.value_at_quantile(q),
                "q {q}"
            );
        }
    }

    #[test]
    fn counts_add_up_and_loss_is_derived_after_merging() {
        let mut merged = Report::default();
        merged.merge(&worker("dm", 10, 10, 9, &[5])).unwrap();
        merged.merge(&worker("dm", 5, 5, 5, &[7])).unwrap();
        merged.merge(&worker("typing", 3, 21, 20, &[])).unwrap();
        assert_eq!(merged.workers, 3);
        let v = merged.render();
        assert_eq!(v["kinds"]["dm"]["sent"], 15);
        assert_eq!(v["kinds"]["dm"]["deliveries_expected"], 15);
        assert_eq!(v["kinds"]["dm"]["deliveries_received"], 14);
        assert_eq!(v["kinds"]["dm"]["lost"], 1);
        assert_eq!(v["kinds"]["dm"]["duplicated"], 2);
        assert_eq!(v["kinds"]["dm"]["latency_ms"]["samples"], 2);
        assert_eq!(v["kinds"]["typing"]["lost"], 1);
        // Top level: all kinds together.
        assert_eq!(v["deliveries_expected"], 36);
        assert_eq!(v["lost"], 2);
        assert_eq!(v["out_of_order"], 6);
    }

    #[test]
    fn connections_sum_and_their_window_spans_all_workers() {
        let a = Report {
            connections: Connections {
                attempted: 10,
                established: 9,
                failed: 1,
                refused_with_503: 0,
                first_attempt_us: 2_000_000,
                last_established_us: 3_000_000,
            },
            ..Default::default()
        };
        let b = Report {
            connections: Connections {
                attempted: 10,
                established: 10,
                failed: 0,
                refused_with_503: 4,
                first_attempt_us: 1_000_000,
                last_established_us: 2_500_000,
            },
            ..Default::default()
        };
        let mut m = Report::default();
        m.merge(&a).unwrap();
        m.merge(&b).unwrap();
        let c = &m.connections;
        assert_eq!((c.attempted, c.established, c.failed), (20, 19, 1));
        assert_eq!(c.refused_with_503, 4);
        assert_eq!(
            (c.first_attempt_us, c.last_established_us),
            (1_000_000, 3_000_000)
        );
        let v = m.render();
        assert_eq!(v["connections"]["connect_seconds"], 2.0);
        assert_eq!(v["connections"]["connects_per_second"], 9.5);
    }

    #[test]
    fn series_merge_by_wall_clock_second() {
        let mut a = Report::default();
        let mut b = Report::default();
        let sec = |lat: &[u64], established| {
            let mut s = Second::default();
            for v in lat {
                s.latency.record(*v);
            }
            s.established = established;
            s
        };
        a.series.insert(100, sec(&[1000, 2000], 5));
        a.series.insert(101, sec(&[3000], 0));
        b.series.insert(101, sec(&[90_000], 7));
        b.series.insert(103, sec(&[], 1));
        let mut m = Report::default();
        for r in [&a, &b] {
            let r: Report = serde_json::from_str(&serde_json::to_string(r).unwrap()).unwrap();
            m.merge(&r).unwrap();
        }
        let t = m.timeline();
        let secs: Vec<u64> = t.iter().map(|(s, _, _)| *s).collect();
        assert_eq!(secs, [100, 101, 102, 103], "gaps are filled");
        let counts: Vec<u64> = t.iter().map(|(_, h, _)| h.len()).collect();
        assert_eq!(counts, [2, 2, 0, 0]);
        let established: Vec<u64> = t.iter().map(|(_, _, e)| *e).collect();
        assert_eq!(established, [5, 12, 12, 13], "cumulative");
        let max_101 = t[1].1.max_ms();
        assert!((89.0..=91.0).contains(&max_101), "{max_101}");
        let v = m.render();
        assert_eq!(v["series"][2]["latency_samples"], 0);
        assert_eq!(v["series"][2]["p99_ms"], Value::Null);
    }

    #[test]
    fn posts_keep_the_earliest_send_and_the_latest_delivery() {
        let mut a = Report::default();
        a.posts.insert(
            0,
            Post {
                sent_us: 1_000_000,
                last_us: 1_010_000,
                delivered: 3,
            },
        );
        let mut b = Report::default();
        b.posts.insert(
            0,
            Post {
                sent_us: 1_000_000,
                last_us: 1_250_000,
                delivered: 4,
            },
        );
        b.posts.insert(
            1,
            Post {
                sent_us: 0,
                last_us: 0,
                delivered: 0,
            },
        );
        let mut m = Report::default();
        m.merge(&a).unwrap();
        m.merge(&b).unwrap();
        assert_eq!(
            m.posts[&0],
            Post {
                sent_us: 1_000_000,
                last_us: 1_250_000,
                delivered: 7
            }
        );
        assert_eq!(m.post_times(), [(0, 250.0, 7)], "post 1 never arrived");
    }

    #[test]
    fn server_readings_come_from_the_worker_that_took_them() {
        let mut a = Report::default();
        a.connections.established = 100;
        a.server.edge_rss_before_bytes = Some(1_000_000);
        a.server.edge_rss_after_bytes = Some(3_000_000);
        a.server.edge_cpu_seconds = Some(1.5);
        a.server.edge_cpu_idle_seconds = Some(0.25);
        a.server.idle_window_seconds = Some(5.0);
        let mut b = Report::default();
        b.connections.established = 100;
        let mut m = Report::default();
        m.merge(&b).unwrap();
        m.merge(&a).unwrap();
        let v = m.render();
        assert_eq!(v["server"]["edge_cpu_seconds"], 1.5);
        assert_eq!(v["server"]["edge_cpu_idle_seconds"], 0.25);
        assert_eq!(v["server"]["idle_window_seconds"], 5.0);
        // Per connection over both workers' sockets.
        assert_eq!(v["server"]["edge_rss_per_connection_bytes"], 10_000.0);
    }

    #[test]
    fn reports_of_different_scenarios_do_not_merge() {
        let mut a = Report {
            scenario: "idle".into(),
            ..Default::default()
        };
        let b = Report {
            scenario: "chat".into(),
            ..Default::default()
        };
        assert!(a.merge(&b).is_err());
    }
}
