//! Token checks at connect and chat authorization.

use crate::common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use switchboard_edge::{AuthConfig, Claims, Settings};

/// Connects with `token` and returns (error code, close code).
async fn refused(edge: &switchboard_edge::Edge, token: &str) -> (u64, Option<u16>) {
    let mut raw = Raw::open(edge, "switchboard.v1.json").await;
    raw.send(json!({"id": 1, "connect": {"token": token}}))
        .await;
    let (close, frames) = raw.until_close().await;
    let err = frames
        .iter()
        .find_map(|f| f.get("error"))
        .expect("an error frame");
    let disconnect = frames
        .iter()
        .find_map(|f| f.get("disconnect"))
        .expect("a disconnect frame");
    assert_eq!(disconnect["code"].as_u64().map(|c| c as u16), close);
    (err["code"].as_u64().unwrap(), close)
}

#[tokio::test]
async fn bad_tokens_are_refused_with_documented_codes() {
    let edge = start(config()).await;

    let mut expired = claims("alice");
    expired.exp = now_secs() - 600;
    assert_eq!(
        refused(&edge, &token_for(&expired)).await,
        (440, Some(4501))
    );
    // Expired a moment ago, inside the clock-skew leeway: still refused.
    expired.exp = now_secs() - 1;
    assert_eq!(
        refused(&edge, &token_for(&expired)).await,
        (440, Some(4501))
    );

    let other = AuthConfig::new(Some(b"wrong-key".to_vec()), None, None, None, 0).unwrap();
    assert_eq!(
        refused(&edge, &other.mint_hs256(&claims("alice")).unwrap()).await,
        (401, Some(4501))
    );

    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let none = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(serde_json::to_vec(&claims("alice")).unwrap())
    );
    assert_eq!(refused(&edge, &none).await, (401, Some(4501)));

    assert_eq!(refused(&edge, "").await, (401, Some(4501)));
    assert_eq!(refused(&edge, "garbage").await, (401, Some(4501)));
    edge.shutdown().await;
}

#[tokio::test]
async fn rs256_and_es256_keys_work_and_hs256_is_then_refused() {
    let dir = env!("CARGO_MANIFEST_DIR");
    for (alg, private, public) in [
        (Algorithm::RS256, "rsa_private.pem", "rsa_public.pem"),
        (Algorithm::ES256, "ec_private.pem", "ec_public.pem"),
    ] {
        let config = Settings {
            jwt_public_key_file: Some(format!("{dir}/tests/fixtures/{public}").into()),
            max_connections: Some(100),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let edge = start(config).await;
        let pem = std::fs::read(format!("{dir}/tests/fixtures/{private}")).unwrap();
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
            _ => EncodingKey::from_ec_pem(&pem).unwrap(),
        };
        let good = jsonwebtoken::encode(&Header::new(alg), &claims("carol"), &key).unwrap();
        let mut raw = Raw::open(&edge, "switchboard.v1.json").await;
        let reply = raw.request(json!({"connect": {"token": good}})).await;
        assert_eq!(reply["connectResult"]["user"], "carol", "{alg:?}: {reply}");
        // An HS256 token signed with the public key bytes (the classic
        // algorithm-confusion attack) must not pass.
        let public_pem = std::fs::read(format!("{dir}/tests/fixtures/{public}")).unwrap();
        let confused = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims("mallory"),
            &EncodingKey::from_secret(&public_pem),
        )
        .unwrap();
        assert_eq!(refused(&edge, &confused).await, (401, Some(4501)));
        edge.shutdown().await;
    }
}

#[tokio::test]
async fn chat_allowlist_limits_subscribe_and_publish() {
    // The default mode: what the claim does not grant is refused.
    let mut config = config();
    config.authz.mode = switchboard_edge::ChatAuthMode::Token;
    let edge = start(config).await;
    let mut c: Claims = claims("dave");
    c.chats = Some(vec!["allowed".into()]);
    let mut raw = Raw::open(&edge, "switchboard.v1.json").await;
    let reply = raw
        .request(json!({"connect": {"token": token_for(&c)}}))
        .await;
    assert!(reply.get("connectResult").is_some());

    let ok = raw.request(json!({"subscribe": {"chat": "allowed"}})).await;
    assert!(ok.get("subscribeResult").is_some(), "{ok}");
    let denied = raw.request(json!({"subscribe": {"chat": "secret"}})).await;
    assert_eq!(denied["error"]["code"], 403, "{denied}");
    let denied = raw
        .request(json!({"publish": {"chat": "secret", "clientMsgId": "m1", "payload": b64("x")}}))
        .await;
    assert_eq!(denied["error"]["code"], 403, "{denied}");
    // The socket stays usable after a refusal.
    let ack = raw
        .request(json!({"publish": {"chat": "allowed", "clientMsgId": "m2", "payload": b64("x")}}))
        .await;
    assert_eq!(seq(&ack["publishAck"]), 1, "{ack}");
    edge.shutdown().await;
}

#[tokio::test]
async fn upgrade_with_bad_bearer_header_gets_http_401() {
    let edge = start(config()).await;
    use tokio_tungstenite::tungstenite::{Error, client::IntoClientRequest, http::HeaderValue};
    let mut req = ws_url(&edge).into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", HeaderValue::from_static("Bearer nope"));
    match tokio_tungstenite::connect_async(req).await {
        Err(Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("expected HTTP 401, got {other:?}"),
    }
    // A good header token makes the Connect token optional.
    let mut req = ws_url(&edge).into_client_request().unwrap();
    let bearer = format!("Bearer {}", token("erin"));
    req.headers_mut()
        .insert("Authorization", HeaderValue::from_str(&bearer).unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut raw = Raw {
        ws,
        next_id: 1,
        skipped: Default::default(),
    };
    let reply = raw.request(json!({"connect": {}})).await;
    assert_eq!(reply["connectResult"]["user"], "erin", "{reply}");
    edge.shutdown().await;
}

#[tokio::test]
async fn refresh_extends_and_rejects_other_users() {
    let edge = start(config()).await;
    let mut raw = Raw::connected(&edge, "frank").await;
    let mut later = claims("frank");
    later.exp = now_secs() + 7200;
    let r = raw
        .request(json!({"refresh": {"token": token_for(&later)}}))
        .await;
    let exp: i64 = r["refreshResult"]["tokenExpiresAtMs"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(exp, (later.exp * 1000) as i64);
    let r = raw
        .request(json!({"refresh": {"token": token("grace")}}))
        .await;
    assert_eq!(r["error"]["code"], 401, "{r}");
    edge.shutdown().await;
}

#[tokio::test]
async fn token_expiry_on_an_open_socket_warns_then_closes() {
    let mut cfg = config();
    cfg.token_expiry_warning = std::time::Duration::from_millis(1500);
    cfg.auth = AuthConfig::new(Some(SECRET.as_bytes().to_vec()), None, None, None, 0).unwrap();
    let edge = start(cfg).await;
    let mut short = claims("heidi");
    short.exp = now_secs() + 2;
    let mut raw = Raw::open(&edge, "switchboard.v1.json").await;
    let reply = raw
        .request(json!({"connect": {"token": token_for(&short)}}))
        .await;
    assert!(reply.get("connectResult").is_some(), "{reply}");
    let (close, frames) = raw.until_close().await;
    assert!(
        frames.iter().any(|f| f.get("tokenExpiring").is_some()),
        "{frames:?}"
    );
    assert_eq!(close, Some(4005));
    edge.shutdown().await;
}

#[tokio::test]
async fn browsers_from_other_origins_are_refused_with_http_403() {
    let mut cfg = config();
    cfg.allowed_origins = vec![
        "https://app.example.com".into(),
        "https://*.chat.example".into(),
    ];
    let edge = start(cfg).await;
    use tokio_tungstenite::tungstenite::{Error, client::IntoClientRequest, http::HeaderValue};
    let with_origin = |origin: Option<&'static str>| {
        let mut req = ws_url(&edge).into_client_request().unwrap();
        if let Some(o) = origin {
            req.headers_mut()
                .insert("Origin", HeaderValue::from_static(o));
        }
        req
    };
    for bad in [
        "https://evil.example",
        "https://app.example.com.evil",
        "null",
    ] {
        match tokio_tungstenite::connect_async(with_origin(Some(bad))).await {
            Err(Error::Http(resp)) => assert_eq!(resp.status(), 403, "{bad}"),
            other => panic!("{bad}: expected HTTP 403, got {other:?}"),
        }
    }
    // Allowed origins, and apps that send none, get their socket.
    for good in [
        Some("https://app.example.com"),
        Some("https://web.chat.example"),
        None,
    ] {
        let (ws, _) = tokio_tungstenite::connect_async(with_origin(good))
            .await
            .unwrap_or_else(|e| panic!("{good:?}: {e}"));
        let mut raw = Raw {
            ws,
            next_id: 1,
            skipped: Default::default(),
        };
        let reply = raw
            .request(json!({"connect": {"token": token("webby")}}))
            .await;
        assert_eq!(reply["connectResult"]["user"], "webby", "{reply}");
    }
    let (_, metrics) = http_get(edge.addr(), "/metrics").await;
    assert!(
        metrics.contains("switchboard_edge_upgrades_rejected_total{reason=\"origin\"} 3"),
        "rejections by origin are counted"
    );
    edge.shutdown().await;
}

#[tokio::test]
async fn not_before_audience_and_issuer_are_checked_on_the_socket() {
    let mut cfg = config();
    cfg.auth = AuthConfig::new(
        Some(SECRET.as_bytes().to_vec()),
        None,
        Some("switchboard".into()),
        Some("https://auth.example".into()),
        0,
    )
    .unwrap();
    let edge = start(cfg).await;
    let good = || {
        let mut c = claims("ada");
        c.aud = Some("switchboard".into());
        c.iss = Some("https://auth.example".into());
        c
    };
    let mut early = good();
    early.nbf = Some(now_secs() + 600);
    assert_eq!(refused(&edge, &token_for(&early)).await, (440, Some(4501)));
    for (aud, iss) in [
        (Some("other-service"), Some("https://auth.example")),
        (Some("switchboard"), Some("https://evil.example")),
        (None, Some("https://auth.example")),
        (Some("switchboard"), None),
    ] {
        let mut c = good();
        c.aud = aud.map(Into::into);
        c.iss = iss.map(Into::into);
        assert_eq!(
            refused(&edge, &token_for(&c)).await,
            (401, Some(4501)),
            "aud {aud:?} iss {iss:?}"
        );
    }
    let mut raw = Raw::open(&edge, "switchboard.v1.json").await;
    let r = raw
        .request(json!({"connect": {"token": token_for(&good())}}))
        .await;
    assert_eq!(r["connectResult"]["user"], "ada", "{r}");
    edge.shutdown().await;
}
