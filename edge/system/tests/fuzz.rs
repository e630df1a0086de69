//! The fuzz targets' bodies (`protocol/fuzz/targets.rs`,
//! `edge/fuzz/targets.rs`) on stable Rust, as a short smoke run: every
//! input of the checked-in corpus, then mutations of it (bit flips,
//! random bytes, cuts, splices) for `SB_FUZZ_SMOKE_SECS` seconds per
//! target (default 2). No coverage guidance: this catches a target or a
//! decoder that broke, not new bugs deep down; the long, guided campaign
//! is `scripts/fuzz` (cargo-fuzz, libFuzzer). A failing input is written
//! to the cargo target's tmp dir and printed in hex; `SB_FUZZ_SEED`
//! replays a run's mutations.

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

#[path = "../../../protocol/fuzz/targets.rs"]
mod protocol_targets;

#[path = "../../fuzz/targets.rs"]
mod edge_targets;

fn corpus(dir: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(dir);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    out.sort();
    assert!(!out.is_empty(), "empty corpus {}", dir.display());
    out
}

/// xorshift64*: reproducible from its seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, b'{', b'"', b'\\'];
const MAX_LEN: usize = 64 * 1024;

fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut data = corpus[rng.below(corpus.len())].clone();
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.next() as u8;
            }
            2 if len > 0 => {
                let i = rng.below(len);
                data[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            3 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                data.splice(at..at, bytes);
            }
            4 if len > 0 => {
                let from = rng.below(len);
                let to = (from + 1 + rng.below(len - from)).min(len);
                data.drain(from..to);
            }
            5 if len > 0 => {
                let from = rng.below(len);
                let to = (from + 1 + rng.below(len - from)).min(len);
                let copy = data[from..to].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, copy);
            }
            6 => {
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            _ => data.truncate(rng.below(len + 1)),
        }
    }
    data.truncate(MAX_LEN);
    data
}

fn seed() -> u64 {
    std::env::var("SB_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        })
}

fn budget() -> Duration {
    let secs = std::env::var("SB_FUZZ_SMOKE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs)
}

/// Runs `target` on one input; on a panic, keeps the input and fails
/// naming it.
fn run_one(name: &str, target: fn(&[u8]), data: &[u8], seed: u64) {
    if catch_unwind(AssertUnwindSafe(|| target(data))).is_err() {
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-{name}-crash"));
        std::fs::write(&path, data).unwrap();
        let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
        panic!(
            "fuzz target {name} failed (SB_FUZZ_SEED={seed}) on {} bytes, kept in {}: {hex}",
            data.len(),
            path.display()
        );
    }
}

/// The corpus, then mutations until the budget is spent. Returns inputs run.
fn smoke(name: &str, corpus_dir: &str, target: fn(&[u8])) -> usize {
    let corpus = corpus(corpus_dir);
    let seed = seed();
    let mut rng = Rng(seed);
    for input in &corpus {
        run_one(name, target, input, seed);
    }
    let deadline = Instant::now() + budget();
    let mut runs = corpus.len();
    while Instant::now() < deadline {
        let input = mutate(&mut rng, &corpus);
        run_one(name, target, &input, seed);
        runs += 1;
    }
    eprintln!(
        "fuzz smoke {name}: {} corpus inputs, {runs} runs in all (SB_FUZZ_SEED={seed})",
        corpus.len()
    );
    runs
}

#[test]
fn fuzz_smoke_decode_client_refuses_garbage_and_round_trips() {
    let runs = smoke(
        "decode_client",
        "protocol/fuzz/corpus/decode_client",
        protocol_targets::decode_client,
    );
    assert!(runs > 0);
}

#[test]
fn fuzz_smoke_decode_server_refuses_garbage_and_round_trips() {
    smoke(
        "decode_server",
        "protocol/fuzz/corpus/decode_server",
        protocol_targets::decode_server,
    );
}

#[test]
fn fuzz_smoke_ids_accepts_only_subject_safe_ids() {
    smoke("ids", "protocol/fuzz/corpus/ids", protocol_targets::ids);
}

#[test]
fn fuzz_smoke_edge_frames_stay_within_the_message_limit() {
    smoke("frames", "edge/fuzz/corpus/frames", edge_targets::frames);
}

/// The smoke run really fails on a failing target, and keeps the input.
#[test]
fn fuzz_smoke_reports_a_failing_input() {
    fn picky(data: &[u8]) {
        assert!(!data.starts_with(b"{"), "picky");
    }
    let caught = catch_unwind(|| run_one("picky", picky, b"{x", 7));
    assert!(caught.is_err());
    let kept = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-picky-crash");
    assert_eq!(std::fs::read(kept).unwrap(), b"{x");
}
