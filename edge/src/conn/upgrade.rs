//! The checks a `GET /ws` passes before it becomes a socket, cheapest
//! first: a WebSocket request, not draining, an allowed origin, a
//! subprotocol we speak, a valid bearer token if one is sent, then room
//! under the connection cap, the accept rate and the handshake limit.
//! The 101 names the subprotocol and, when an offer is acceptable,
//! permessage-deflate.
use std::sync::atomic::Ordering;

use bytes::Bytes;
use fastwebsockets::upgrade::UpgradeFut;
use http_body_util::Empty;
use hyper::{Request, Response, StatusCode, body::Incoming, header};
use switchboard_protocol::Encoding;
use tokio::time::Instant;

use crate::{conn::handshake::Accepted, metrics, ratelimit, state::EdgeState};

/// Why an upgrade was refused: the HTTP answer, which the server renders.
#[derive(Debug)]
pub(crate) enum Refused {
    /// This status, with this text.
    Status(StatusCode, String),
    /// 503 with a Retry-After: over a limit or draining, for this reason.
    RetryLater(&'static str),
}

fn refused(status: StatusCode, text: impl Into<String>) -> Refused {
    Refused::Status(status, text.into())
}

/// A request that passed: the 101 answer, the upgrade to come and what
/// the handshake needs.
pub(super) type Switching = (Response<Empty<Bytes>>, UpgradeFut, Accepted);

pub(super) fn check(
    state: &EdgeState,
    req: &mut Request<Incoming>,
    accepted_at: Instant,
) -> Result<Switching, Refused> {
    if !fastwebsockets::upgrade::is_upgrade_request(req) {
        metrics::upgrade_rejected("not_websocket");
        return Err(refused(
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade\n",
        ));
    }
    if state.draining.load(Ordering::Acquire) {
        metrics::upgrade_rejected("draining");
        return Err(Refused::RetryLater("draining"));
    }
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok());
    if !origin_allowed(&state.config.allowed_origins, origin) {
        metrics::upgrade_rejected("origin");
        return Err(refused(StatusCode::FORBIDDEN, "origin not allowed\n"));
    }
    // Subprotocol: JSON when none is offered; an offer without ours fails.
    let offered = req
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok());
    let (encoding, echo) = match offered {
        None => (Encoding::Json, false),
        Some(list) => match Encoding::negotiate(list) {
            Some(e) => (e, true),
            None => {
                metrics::upgrade_rejected("subprotocol");
                return Err(refused(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unsupported subprotocol; offer {} or {}\n",
                        Encoding::PROTOBUF_SUBPROTOCOL,
                        Encoding::JSON_SUBPROTOCOL
                    ),
                ));
            }
        },
    };
    let header_identity = match req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        None => None,
        Some(h) => match h
            .strip_prefix("Bearer ")
            .map(|t| state.config.auth.verify(t.trim()))
        {
            Some(Ok(id)) => Some(id),
            Some(Err(e)) => {
                metrics::auth_failure(e.label());
                metrics::upgrade_rejected("unauthorized");
                return Err(refused(StatusCode::UNAUTHORIZED, format!("{e}\n")));
            }
            None => {
                metrics::upgrade_rejected("unauthorized");
                return Err(refused(
                    StatusCode::UNAUTHORIZED,
                    "expected Authorization: Bearer <token>\n",
                ));
            }
        },
    };
    let Some(permit) = state.admission.try_admit() else {
        metrics::upgrade_rejected("over_capacity");
        return Err(Refused::RetryLater("connection limit reached"));
    };
    // A storm is spread out at the clients (Retry-After, then their own
    // jitter) instead of queuing handshakes here.
    let admitted = {
        let mut bucket = state.accept_rate.lock().unwrap_or_else(|e| e.into_inner());
        bucket.take(state.config.accept_rate, ratelimit::clock_ms())
    };
    if !admitted {
        metrics::upgrade_rejected("accept_rate");
        return Err(Refused::RetryLater("too many new connections"));
    }
    let Ok(handshake) = state.handshakes.clone().try_acquire_owned() else {
        metrics::upgrade_rejected("handshakes");
        return Err(Refused::RetryLater("too many handshakes in progress"));
    };
    let deflate = if state.config.deflate {
        negotiate_deflate(req.headers())
    } else {
        None
    };
    let (mut response, fut) = match fastwebsockets::upgrade::upgrade(req) {
        Ok(r) => r,
        Err(e) => {
            metrics::upgrade_rejected("bad_handshake");
            return Err(refused(StatusCode::BAD_REQUEST, format!("{e}\n")));
        }
    };
    let accepted = Accepted {
        encoding,
        deflate: deflate.is_some(),
        header_identity,
        deadline: accepted_at + state.config.handshake_timeout,
        permit,
        handshake,
    };
    if echo {
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            header::HeaderValue::from_static(encoding.subprotocol()),
        );
    }
    if let Some(answer) = deflate {
        state.metrics.deflate.negotiated.increment(1);
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            header::HeaderValue::from_static(answer),
        );
    }
    Ok((response, fut, accepted))
}

/// The answer to the request's permessage-deflate offers, if one is
/// acceptable (see `switchboard_protocol::deflate::accept`). The offers
/// of every `Sec-WebSocket-Extensions` line count, in order.
fn negotiate_deflate(headers: &header::HeaderMap) -> Option<&'static str> {
    let mut offers = String::new();
    for value in headers.get_all(header::SEC_WEBSOCKET_EXTENSIONS) {
        // A line that is not text offers nothing we could parse.
        let Ok(v) = value.to_str() else { continue };
        if !offers.is_empty() {
            offers.push(',');
        }
        offers.push_str(v);
    }
    switchboard_protocol::deflate::accept(&offers)
}

/// Whether a browser at `origin` may open a socket. Only browsers send
/// `Origin`, and they always do on a WebSocket: without one the request
/// comes from an app or a server, which the token authenticates.
fn origin_allowed(allowed: &[String], origin: Option<&str>) -> bool {
    let Some(origin) = origin else { return true };
    if allowed.is_empty() {
        return true;
    }
    let origin = origin.trim_end_matches('/').to_ascii_lowercase();
    allowed.iter().any(|pattern| {
        if pattern == "*" || *pattern == origin {
            return true;
        }
        // `https://*.example.com`: any subdomain, not the bare domain.
        match pattern.split_once("://*.") {
            Some((scheme, domain)) => origin
                .strip_prefix(scheme)
                .and_then(|o| o.strip_prefix("://"))
                .and_then(|host| host.strip_suffix(domain))
                .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
            None => false,
        }
    })
}

#[cfg(test)]
mod origin_tests {
    use super::origin_allowed;

    #[test]
    fn origins_match_exactly_or_by_subdomain() {
        let allowed = vec![
            "https://app.example.com".to_owned(),
            "https://*.chat.example".to_owned(),
        ];
        assert!(origin_allowed(&allowed, None), "apps send no Origin");
        assert!(origin_allowed(&[], Some("https://anything")));
        assert!(origin_allowed(&allowed, Some("https://app.example.com")));
        assert!(origin_allowed(&allowed, Some("HTTPS://App.Example.com/")));
        assert!(origin_allowed(&allowed, Some("https://web.chat.example")));
        assert!(origin_allowed(&allowed, Some("https://a.b.chat.example")));
        for bad in [
            "https://evil.example",
            "http://app.example.com",
            "https://app.example.com.evil",
            "https://chat.example",
            "https://evilchat.example",
            "http://web.chat.example",
            "null",
        ] {
            assert!(!origin_allowed(&allowed, Some(bad)), "{bad}");
        }
        assert!(origin_allowed(&["*".to_owned()], Some("null")));
    }
}
