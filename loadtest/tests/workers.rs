//! The real binary with `--workers 2` against a fake edge: the parent
//! must start both workers, hold them at each barrier, merge what they
//! counted, and fail when a worker fails.
mod common;

use std::{path::PathBuf, time::Duration};

use serde_json::Value;

/// Longest any one run may take before the test gives up on it.
const RUN_LIMIT: Duration = Duration::from_secs(90);

struct Run {
    ok: bool,
    report: Value,
    stderr: String,
}

async fn loadtest(args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard-loadtest"));
    cmd.args(args)
        .env("SWITCHBOARD_JWT_SECRET", common::SECRET)
        .kill_on_drop(true);
    let out = tokio::time::timeout(RUN_LIMIT, cmd.output())
        .await
        .expect("the run ends by itself")
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = if out.status.success() {
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("stdout is one JSON report ({e}); stderr:\n{stderr}"))
    } else {
        Value::Null
    };
    Run {
        ok: out.status.success(),
        report,
        stderr,
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

fn plot_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("sb-loadtest-{name}-{}", std::process::id()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_over_two_workers_merges_counts_latency_and_plots() {
    // One subscriber misses one post: the merged report must say so.
    let fake = common::start(common::Faults {
        drop_delivery: Some(("fan-4".into(), 2)),
        ..Default::default()
    })
    .await;
    let addr = fake.addr.to_string();
    let plots = plot_dir("channel");
    let run = loadtest(&[
        "--workers",
        "2",
        "--plot-dir",
        plots.to_str().unwrap(),
        "channel",
        "--addr",
        &addr,
        "--sources",
        "1",
        "--subscribers",
        "7",
        "--messages",
        "4",
        "--rate",
        "100",
        "--timeout-secs",
        "3",
    ])
    .await;
    assert!(run.ok, "stderr:\n{}", run.stderr);
    let r = &run.report;
    assert_eq!(r["scenario"], "channel");
    assert_eq!(r["workers"], 2);
    assert_eq!(u(&r["subscribers"]), 7);
    assert_eq!(u(&r["messages"]), 4);
    assert_eq!(u(&r["deliveries_expected"]), 28);
    assert_eq!(u(&r["deliveries_received"]), 27);
    assert_eq!(u(&r["lost"]), 1);
    assert_eq!(u(&r["duplicated"]), 0);
    assert_eq!(u(&r["out_of_order"]), 0);
    assert_eq!(u(&r["latency_ms"]["samples"]), 27);
    assert_eq!(
        u(&r["connections"]["attempted"]),
        8,
        "7 subscribers + publisher"
    );
    assert_eq!(u(&r["connections"]["established"]), 8);
    assert_eq!(u(&r["posts"]["count"]), 4);
    assert_eq!(u(&r["posts_fully_delivered"]), 3, "post 2 missed one");
    // Both workers' seconds, merged: every sample and socket is in the series.
    let series = r["series"].as_array().unwrap();
    let samples: u64 = series.iter().map(|s| u(&s["latency_samples"])).sum();
    assert_eq!(samples, 27);
    assert_eq!(u(&series.last().unwrap()["established"]), 8);
    // Disjoint slices: every name once, none twice.
    let mut want: Vec<String> = (0..7).map(|i| format!("fan-{i}")).collect();
    want.push("fan-publisher".into());
    want.sort();
    let seen: Vec<String> = fake.seen_users.lock().unwrap().iter().cloned().collect();
    assert_eq!(seen, want);
    for name in ["latency-over-time", "latency-cdf", "connections"] {
        let f = plots.join(format!("channel-{name}.svg"));
        let svg = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(svg.starts_with("<svg"));
    }
    std::fs::remove_dir_all(&plots).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_over_two_workers_accounts_for_every_kind() {
    let fake = common::start(common::Faults::default()).await;
    let addr = fake.addr.to_string();
    let run = loadtest(&[
        "mixed",
        "--workers",
        "2",
        "--addr",
        &addr,
        "--sources",
        "1",
        // 12 per worker: three whole groups of 4 each.
        "--users",
        "24",
        "--presence-users",
        "4",
        "--group-size",
        "4",
        "--rate",
        "200",
        "--duration-secs",
        "2",
        "--mix",
        "dm=40,group=30,receipt=15,typing=10,presence=4,channel=1",
        "--drain-secs",
        "5",
    ])
    .await;
    assert!(run.ok, "stderr:\n{}", run.stderr);
    let r = &run.report;
    assert_eq!(r["workers"], 2);
    assert_eq!(u(&r["users_ready"]), 24);
    // 24 users + 4 away users + the channel owner.
    assert_eq!(u(&r["connections"]["established"]), 29);
    assert!(u(&r["away_reconnects"]) > 0);
    assert_eq!(u(&r["connections"]["failed"]), 0);
    for kind in ["dm", "group", "channel", "receipt", "typing", "presence"] {
        let k = &r["kinds"][kind];
        assert!(u(&k["sent"]) > 0, "{kind} sent nothing: {k}");
        assert!(u(&k["deliveries_expected"]) > 0, "{kind}: {k}");
        assert_eq!(
            k["deliveries_received"], k["deliveries_expected"],
            "{kind}: {k}"
        );
        assert_eq!(u(&k["duplicated"]), 0, "{kind}: {k}");
        assert_eq!(
            u(&k["latency_ms"]["samples"]),
            u(&k["deliveries_received"]),
            "{kind}: every delivery timed"
        );
    }
    // The channel reaches every user in both workers.
    let channel = &r["kinds"]["channel"];
    assert_eq!(u(&channel["deliveries_expected"]), u(&channel["sent"]) * 24);
    // A DM reaches one user; a group post the other 3 members.
    assert_eq!(
        r["kinds"]["dm"]["deliveries_expected"],
        r["kinds"]["dm"]["sent"]
    );
    assert_eq!(
        u(&r["kinds"]["group"]["deliveries_expected"]),
        u(&r["kinds"]["group"]["sent"]) * 3
    );
    let totals: u64 = ["dm", "group", "channel", "receipt", "typing", "presence"]
        .iter()
        .map(|k| u(&r["kinds"][k]["deliveries_received"]))
        .sum();
    assert_eq!(u(&r["deliveries_received"]), totals);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_watchers_start_once_away_users_are_online() {
    // Away users slow to get in: a user that watched them before then
    // would see them offline, and their coming online would be a change
    // nobody sent (counted as duplicated).
    let fake = common::start(common::Faults {
        slow_first_connect: Some(("mix-p".into(), Duration::from_millis(500))),
        ..Default::default()
    })
    .await;
    let addr = fake.addr.to_string();
    let run = loadtest(&[
        "mixed",
        "--workers",
        "2",
        "--addr",
        &addr,
        "--sources",
        "1",
        "--users",
        "8",
        "--presence-users",
        "4",
        "--rate",
        "16",
        "--duration-secs",
        "1",
        "--mix",
        "presence=1",
        "--drain-secs",
        "5",
    ])
    .await;
    assert!(run.ok, "stderr:\n{}", run.stderr);
    let p = &run.report["kinds"]["presence"];
    assert!(u(&p["deliveries_expected"]) > 0, "{p}");
    assert_eq!(u(&p["duplicated"]), 0, "{p}");
    assert_eq!(p["deliveries_received"], p["deliveries_expected"], "{p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_idle_and_storm_run_over_two_workers() {
    let fake = common::start(common::Faults::default()).await;
    let addr = fake.addr.to_string();
    let common_args = ["--workers", "2", "--addr", &addr, "--sources", "1"];
    let chat = loadtest(
        &[
            &["chat"][..],
            &common_args,
            &[
                "--users",
                "10",
                "--group-size",
                "3",
                "--rate",
                "100",
                "--duration-secs",
                "1",
            ],
        ]
        .concat(),
    )
    .await;
    assert!(chat.ok, "stderr:\n{}", chat.stderr);
    let r = &chat.report;
    assert_eq!(r["workers"], 2);
    assert_eq!(u(&r["connections"]["established"]), 10);
    assert!(u(&r["published"]) > 0);
    assert!(u(&r["deliveries_expected"]) > 0);
    assert_eq!(r["deliveries_received"], r["deliveries_expected"]);
    assert_eq!(u(&r["acked"]), u(&r["published"]));

    let idle = loadtest(
        &[
            &["idle"][..],
            &common_args,
            &["--sockets", "9", "--hold-secs", "0"],
        ]
        .concat(),
    )
    .await;
    assert!(idle.ok, "stderr:\n{}", idle.stderr);
    let c = &idle.report["connections"];
    assert_eq!((u(&c["attempted"]), u(&c["established"])), (9, 9));

    let storm = loadtest(
        &[
            &["storm"][..],
            &common_args,
            &["--clients", "6", "--missed", "3"],
        ]
        .concat(),
    )
    .await;
    assert!(storm.ok, "stderr:\n{}", storm.stderr);
    let r = &storm.report;
    assert_eq!(
        (u(&r["joined"]), u(&r["back"]), u(&r["resumed"])),
        (6, 6, 6)
    );
    assert_eq!(u(&r["deliveries_expected"]), 18);
    assert_eq!(u(&r["deliveries_received"]), 18);
    assert!(r["seconds_until_all_resumed"].as_f64().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_owes_nothing_to_a_user_who_never_got_in() {
    // chat-1 is turned away: what its chat-mates send is not lost.
    let fake = common::start(common::Faults {
        refuse_user: Some("chat-1".into()),
        ..Default::default()
    })
    .await;
    let addr = fake.addr.to_string();
    let run = loadtest(&[
        "chat",
        "--addr",
        &addr,
        "--sources",
        "1",
        "--users",
        "6",
        "--group-size",
        "3",
        "--rate",
        "200",
        "--duration-secs",
        "1",
        "--window-ms",
        "2000",
    ])
    .await;
    assert!(
        run.ok,
        "stderr:
{}",
        run.stderr
    );
    let r = &run.report;
    assert_eq!(u(&r["connections"]["established"]), 5);
    assert_eq!(u(&r["connections"]["not_connected"]), 1);
    assert!(u(&r["to_unconnected"]) > 0, "{r:#}");
    assert_eq!(u(&r["lost_after_ack"]), 0, "{r:#}");
    assert_eq!(u(&r["lost"]), 0);
    assert_eq!(r["deliveries_received"], r["deliveries_expected"]);
    assert_eq!(r["refused"], serde_json::json!({}));
    assert_eq!(u(&r["unanswered"]), 0, "{r:#}");
    assert_eq!(r["acked"], r["published"], "every publish answered");
    assert_eq!(u(&r["window_ms"]), 2000);
    assert!(
        r["achieved_deliveries_per_second"]
            .as_f64()
            .is_some_and(|x| x > 0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_imports_members_and_counts_refusals_apart_from_failures() {
    // 4 groups of 5 users, 3 chats each, a group per chat: group 1's users
    // lose their socket at their second chat (failed, the third skipped),
    // group 2's get 503 for their first (refused, the rest go on).
    let fake = common::start(common::Faults {
        members_only: true,
        refuse_chat: Some(("sub-g2-c0".into(), 503)),
        close_on_chat: Some("sub-g1-c1".into()),
        ..Default::default()
    })
    .await;
    let (addr, api) = (fake.addr.to_string(), fake.api.to_string());
    let run = loadtest(&[
        "--workers",
        "2",
        "subscribe",
        "--addr",
        &addr,
        "--sources",
        "1",
        "--api-addr",
        &api,
        "--api-key",
        common::API_KEY,
        "--users",
        "20",
        "--group-size",
        "5",
        "--chats-per-user",
        "3",
        "--rounds",
        "2",
        "--settle-secs",
        "0",
    ])
    .await;
    assert!(run.ok, "stderr:\n{}", run.stderr);
    let r = &run.report;
    assert_eq!(r["workers"], 2);
    assert_eq!((u(&r["chats"]), u(&r["subscribes_per_round"])), (12, 60));
    assert_eq!(
        u(&r["import"]["chats"]),
        12,
        "each worker its groups' chats"
    );
    assert_eq!(u(&r["import"]["memberships_added"]), 60);
    let rounds = r["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    for (n, round) in rounds.iter().enumerate() {
        assert_eq!(round["cache"], if n == 0 { "cold" } else { "warm" });
        assert_eq!(u(&round["users_connected"]), 20, "{round}");
        assert_eq!(u(&round["subscribes_ok"]), 45, "{round}");
        assert_eq!(round["refused"], serde_json::json!({"503": 5}), "{round}");
        assert_eq!(u(&round["failed"]), 5, "{round}");
        assert_eq!(u(&round["skipped"]), 5, "{round}");
        // Every answer timed, refusals too.
        assert_eq!(u(&round["latency_ms"]["samples"]), 50, "{round}");
        assert!(round["subscribes_per_second"].as_f64().unwrap() > 0.0);
        assert_eq!(round["chat_auth"], Value::Null, "no metrics read");
    }
    // Reconnecting users: a socket per user and round, their connect
    // phases timed apart from the subscribes.
    assert_eq!(u(&r["connections"]["established"]), 40);
    let connecting: f64 = rounds
        .iter()
        .map(|x| x["connect_seconds"].as_f64().unwrap())
        .sum();
    // (serde_json reads floats back to within a unit in the last place.)
    let told = r["connections"]["connect_seconds"].as_f64().unwrap();
    assert!((told - connecting).abs() < 1e-9, "{told} vs {connecting}");

    // Nobody imported: an edge that checks membership refuses every one.
    let fake = common::start(common::Faults {
        members_only: true,
        ..Default::default()
    })
    .await;
    let addr = fake.addr.to_string();
    let run = loadtest(&[
        "subscribe",
        "--addr",
        &addr,
        "--sources",
        "1",
        "--no-import",
        "--users",
        "6",
        "--group-size",
        "3",
        "--chats-per-user",
        "2",
        "--rounds",
        "1",
        "--settle-secs",
        "0",
    ])
    .await;
    assert!(run.ok, "stderr:\n{}", run.stderr);
    let r = &run.report;
    assert_eq!(r["import"], Value::Null);
    let round = &r["rounds"][0];
    assert_eq!(round["refused"], serde_json::json!({"403": 12}), "{round}");
    assert_eq!(u(&round["subscribes_ok"]), 0);
    assert_eq!(u(&round["failed"]), 0, "a refusal is not a failure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_worker_fails_the_run_and_says_which() {
    // The publisher (worker 0's) is turned away.
    let fake = common::start(common::Faults {
        refuse_user: Some("fan-publisher".into()),
        ..Default::default()
    })
    .await;
    let addr = fake.addr.to_string();
    let run = loadtest(&[
        "--workers",
        "2",
        "channel",
        "--addr",
        &addr,
        "--sources",
        "1",
        "--subscribers",
        "4",
        "--messages",
        "2",
    ])
    .await;
    assert!(!run.ok, "the run must fail");
    assert!(
        run.stderr.contains("worker 0 failed"),
        "stderr:\n{}",
        run.stderr
    );
    assert!(run.stderr.contains("publisher"), "stderr:\n{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_die_with_their_parent() {
    let fake = common::start(common::Faults::default()).await;
    let addr = fake.addr.to_string();
    let mut parent = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard-loadtest"))
        .args(["--workers", "2", "idle", "--addr", &addr, "--sources", "1"])
        .args(["--sockets", "6", "--hold-secs", "60"])
        .env("SWITCHBOARD_JWT_SECRET", common::SECRET)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let open = || fake.open.load(std::sync::atomic::Ordering::Relaxed);
    let until = |want: fn(u64) -> bool| async move {
        for _ in 0..300 {
            if want(open()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    assert!(until(|n| n == 6).await, "both workers hold their sockets");
    // SIGKILL: the parent gets no chance to stop them itself.
    parent.start_kill().unwrap();
    parent.wait().await.unwrap();
    assert!(
        until(|n| n == 0).await,
        "{} sockets still open: workers outlived their parent",
        open()
    );
}
