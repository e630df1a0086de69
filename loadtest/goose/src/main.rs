//! goose scenario: backend services publishing into Switchboard over
//! `POST /api/publish` (docs/protocol.md, "Backend publish API").
//!
//! Run with (edge or router, API key set):
//!   SWITCHBOARD_API_KEY=dev-key cargo run --release --manifest-path loadtest/goose/Cargo.toml -- \
//!     --host http://127.0.0.1:18070 --users 20 --increase-rate 10 --run-time 30s
//!
//! Each goose user is one backend: it posts to a chat of its own and to a
//! personal stream, with client message ids unique per user and request,
//! and fails the request unless the reply carries a seq.
use std::sync::atomic::{AtomicU64, Ordering};

use goose::prelude::*;

static NEXT: AtomicU64 = AtomicU64::new(0);

fn api_key() -> String {
    std::env::var("SWITCHBOARD_API_KEY").unwrap_or_else(|_| "dev-key".into())
}

async fn post(user: &mut GooseUser, body: serde_json::Value, name: &str) -> TransactionResult {
    let request = user
        .get_request_builder(&GooseMethod::Post, "/api/publish")?
        .bearer_auth(api_key())
        .json(&body);
    let goose_request = GooseRequest::builder()
        .set_request_builder(request)
        .name(name)
        .build();
    let mut goose = user.request(goose_request).await?;
    let ok = match &goose.response {
        Ok(r) => r.status().as_u16() == 200,
        Err(_) => false,
    };
    if ok {
        let seq = match goose.response {
            Ok(r) => r
                .json::<serde_json::Value>()
                .await
                .ok()
                .and_then(|v| v["seq"].as_u64()),
            Err(_) => None,
        };
        if seq.is_none_or(|s| s == 0) {
            return user.set_failure("reply has no seq", &mut goose.request, None, None);
        }
        Ok(())
    } else {
        user.set_failure("publish refused", &mut goose.request, None, None)
    }
}

async fn publish_chat(user: &mut GooseUser) -> TransactionResult {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let body = serde_json::json!({
        "chat": format!("goose-{}", user.weighted_users_index),
        "client_msg_id": format!("goose-{}-{n}", user.weighted_users_index),
        "text": format!("load message {n}"),
        "sender": "goose",
    });
    post(user, body, "publish chat").await
}

async fn publish_dm(user: &mut GooseUser) -> TransactionResult {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let body = serde_json::json!({
        "user": format!("goose-target-{}", user.weighted_users_index % 100),
        "client_msg_id": format!("goose-dm-{}-{n}", user.weighted_users_index),
        "payload": "aGVsbG8=",
        "sender": "goose",
    });
    post(user, body, "publish dm").await
}

#[tokio::main]
async fn main() -> Result<(), GooseError> {
    GooseAttack::initialize()?
        .register_scenario(
            scenario!("BackendPublish")
                .register_transaction(transaction!(publish_chat).set_weight(4)?)
                .register_transaction(transaction!(publish_dm).set_weight(1)?),
        )
        .execute()
        .await?;
    Ok(())
}
