//! The demo page (edge/assets/demo.html, on the TypeScript SDK) in
//! headless Chromium: two users see each other online and typing,
//! exchange group messages and DMs with read ticks, and the edge restarts
//! mid-conversation without a message lost or shown twice; over
//! permessage-deflate, which Chromium offers by default. Needs node,
//! `npm ci` in edge/system/tests/browser and in protocol/js (the demo test
//! drives the edge with the conformance harness), and Debian's chromium;
//! `scripts/test` installs all of them.

use std::{path::Path, process::Stdio};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_chat_through_the_demo_page_across_an_edge_restart() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run scripts/test (or `npm ci` in edge/system/tests/browser)"
    );
    let out = tokio::process::Command::new("node")
        .arg(dir.join("demo.mjs"))
        .current_dir(&dir)
        .env("EDGE_BIN", EDGE_BIN)
        .env("ROUTER_BIN", ROUTER_BIN)
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
    assert!(out.status.success(), "browser test failed\n{log}");
}
