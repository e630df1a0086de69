//! The demo page in headless Chromium: two pages, one sends, the other
//! shows the message; over permessage-deflate, which Chromium offers by
//! default. Needs node, `npm ci` in edge/system/tests/browser and
//! Debian's chromium; `scripts/test` installs all three.

use std::{path::Path, process::Stdio};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browser_tabs_chat_through_the_demo_page() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run scripts/test (or `npm ci` in edge/system/tests/browser)"
    );
    let mut cfg = config();
    cfg.dev = true;
    let edge = start(cfg).await;
    let url = format!("http://{}", edge.addr());
    let out = tokio::process::Command::new("node")
        .arg(dir.join("chat.mjs"))
        .arg(&url)
        .current_dir(&dir)
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
    // Both pages negotiated deflate; the long message went to them
    // compressed, and Chromium compressed what it sent.
    let addr = edge.addr();
    let shared = r#"switchboard_edge_deflate_compressed_frames_total{kind="shared"}"#;
    assert!(metric(addr, "switchboard_edge_deflate_negotiated_total").await >= 2.0);
    assert!(metric(addr, shared).await >= 1.0, "{log}");
    assert!(metric(addr, "switchboard_edge_deflate_inflated_frames_total").await >= 1.0);
    edge.shutdown().await;
}
