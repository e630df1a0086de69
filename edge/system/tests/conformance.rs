//! The client conformance suite (protocol/conformance/scenarios.json),
//! run by protocol/js/conformance/run.mjs against every client: the
//! TypeScript SDK in Node (JSON and protobuf), in headless Chromium, and
//! the Rust client (this package's `system-client-agent`), on real edge,
//! router, NATS and Redis processes with faults injected. Needs node, the
//! SDK built and its packages installed (`npm ci && npm run build` in
//! protocol/js) and Debian's chromium; `scripts/test` sees to all three.
//!
//! The table of scenario x client in docs/clients.md is checked here
//! against the scenario list, and every run fails on a scenario that
//! fails, so the table cannot claim what the suite does not show.
use std::{collections::BTreeMap, path::PathBuf, process::Stdio};

use serde_json::Value;

use crate::common::*;

const CLIENTS: [&str; 4] = ["ts-node", "ts-node-proto", "ts-browser", "rust"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn scenarios() -> Value {
    let text = std::fs::read_to_string(repo().join("protocol/conformance/scenarios.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

async fn run(client: &str) {
    let js = repo().join("protocol/js");
    assert!(
        js.join("node_modules/ws").exists() && js.join("dist/index.js").exists(),
        "the TypeScript SDK is not built: run scripts/test (or `npm ci && npm run build` in protocol/js)"
    );
    let out_file = tempfile::NamedTempFile::new().unwrap();
    let out = tokio::process::Command::new("node")
        .arg("conformance/run.mjs")
        .args(["--client", client, "--out"])
        .arg(out_file.path())
        .current_dir(&js)
        .env("EDGE_BIN", EDGE_BIN)
        .env("ROUTER_BIN", ROUTER_BIN)
        .env("AGENT_BIN", env!("CARGO_BIN_EXE_system-client-agent"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .expect("node must be installed (scripts/test installs it)");
    let log = format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "conformance failed for {client}\n{log}"
    );
    // Every scenario ran for this client, or is skipped by the list.
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(out_file.path()).unwrap()).unwrap();
    let ran: BTreeMap<String, String> = results["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_owned(),
                r["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for s in scenarios()["scenarios"].as_array().unwrap() {
        let id = s["id"].as_str().unwrap();
        let want = if s["skip"][client].is_string() {
            "skipped"
        } else {
            "passed"
        };
        assert_eq!(ran.get(id).map(String::as_str), Some(want), "{id}\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_ts_node() {
    run("ts-node").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_ts_node_proto() {
    run("ts-node-proto").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_ts_browser() {
    run("ts-browser").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_rust() {
    run("rust").await;
}

/// The table docs/clients.md shows between its markers.
fn table() -> String {
    let list = scenarios();
    let mut t = String::from("| scenario | fault |");
    for c in CLIENTS {
        t.push_str(&format!(" `{c}` |"));
    }
    t.push_str("\n|---|---|");
    t.push_str(&"---|".repeat(CLIENTS.len()));
    t.push('\n');
    for s in list["scenarios"].as_array().unwrap() {
        t.push_str(&format!(
            "| `{}` | {} |",
            s["id"].as_str().unwrap(),
            s["fault"].as_str().unwrap()
        ));
        for c in CLIENTS {
            let cell = match s["skip"][c].as_str() {
                Some(why) => format!(" — ({why}) |"),
                None => " ✓ |".into(),
            };
            t.push_str(&cell);
        }
        t.push('\n');
    }
    t
}

#[test]
fn clients_doc_table_matches_the_scenario_list() {
    let doc = std::fs::read_to_string(repo().join("docs/clients.md")).unwrap();
    let (begin, end) = (
        "<!-- conformance-table:begin -->\n",
        "<!-- conformance-table:end -->",
    );
    let start = doc
        .find(begin)
        .expect("docs/clients.md has the table markers")
        + begin.len();
    let stop = doc[start..].find(end).unwrap() + start;
    let want = table();
    assert!(
        doc[start..stop] == want,
        "docs/clients.md's conformance table is out of date; replace it with:\n{want}"
    );
}
