//! The backend's hooks (ADR 0034): the authorization hook of `proxy` mode
//! and the moderation hook run on every client publish before it is
//! sequenced. Each is an HTTP endpoint (a JSON POST) or the gRPC service
//! `switchboard.hooks.v1.Hooks`, chosen by the URL's scheme, and each call
//! has a deadline.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Uri, header};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use metrics::{Counter, Histogram, counter, histogram};
use serde::{Deserialize, Serialize};
use switchboard_protocol::{
    ChatId, StreamKey, UserId,
    hooks::v1::{
        self as pb, AuthorizeRequest, ModerateRequest, Verdict, hooks_client::HooksClient,
        moderate_request,
    },
};
use tonic::transport::{Channel, Endpoint};

use crate::authz::{Action, AuthorizeHook, HookDecision, HookError};

/// Where a hook is: `http://host[:port]/path` (JSON POST) or
/// `grpc://host:port` (the `Hooks` service, plaintext HTTP/2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookUrl {
    /// JSON over HTTP/1.1.
    Http(Uri),
    /// gRPC; the URI is the channel's (`http://host:port`).
    Grpc(Uri),
}

impl std::str::FromStr for HookUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let uri: Uri = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("{s:?}: no host"));
        }
        match uri.scheme_str() {
            Some("http") => Ok(HookUrl::Http(uri)),
            Some("grpc") => {
                if uri.port_u16().is_none() {
                    return Err(format!("{s:?}: grpc:// needs a port"));
                }
                if uri.path() != "/" && !uri.path().is_empty() {
                    return Err(format!("{s:?}: grpc:// takes no path"));
                }
                let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
                let channel = format!("http://{authority}")
                    .parse()
                    .map_err(|e| format!("{s:?}: {e}"))?;
                Ok(HookUrl::Grpc(channel))
            }
            _ => Err(format!(
                "{s:?}: expected http://host[:port]/path or grpc://host:port \
                 (https is not supported: terminate TLS in a sidecar)"
            )),
        }
    }
}

/// One hook's settings.
#[derive(Debug, Clone)]
pub struct HookSettings {
    /// Where it is.
    pub url: HookUrl,
    /// Deadline of one call.
    pub timeout: Duration,
}

/// The moderation hook's settings (`--moderation-*`).
#[derive(Debug, Clone)]
pub struct ModerationSettings {
    /// Where and how long.
    pub hook: HookSettings,
    /// A call that fails or times out accepts the message as sent
    /// (`true`) or refuses it with `Unavailable` (`false`, the default).
    pub fail_open: bool,
}

/// A hook's transport: one HTTP client or one lazy gRPC channel, shared
/// by every call (one per hook, so their sizes do not matter).
#[derive(Clone)]
#[allow(clippy::large_enum_variant)]
enum Transport {
    Http {
        client: Client<HttpConnector, Full<Bytes>>,
        uri: Uri,
    },
    Grpc(HooksClient<Channel>),
}

impl Transport {
    fn new(url: &HookUrl, timeout: Duration) -> Transport {
        match url {
            HookUrl::Http(uri) => {
                let mut connector = HttpConnector::new();
                connector.set_connect_timeout(Some(timeout));
                connector.set_nodelay(true);
                Transport::Http {
                    // Idle connections are reaped and capped: a slow hook
                    // opens one per concurrent call.
                    client: Client::builder(TokioExecutor::new())
                        .pool_timer(TokioTimer::new())
                        .pool_idle_timeout(Duration::from_secs(30))
                        .pool_max_idle_per_host(32)
                        .build(connector),
                    uri: uri.clone(),
                }
            }
            HookUrl::Grpc(uri) => {
                // Lazy: the edge starts while the backend is down, and each
                // call fails (closed or open) until it is up.
                let channel = Endpoint::from(uri.clone())
                    .connect_timeout(timeout)
                    .timeout(timeout)
                    .connect_lazy();
                Transport::Grpc(HooksClient::new(channel))
            }
        }
    }

    /// POSTs `body` as JSON and decodes the JSON answer; anything but a
    /// 2xx with a body of type `R` is an error.
    async fn post_json<B: Serialize, R: for<'de> Deserialize<'de>>(
        client: &Client<HttpConnector, Full<Bytes>>,
        uri: &Uri,
        body: &B,
    ) -> Result<R, HookError> {
        let body = serde_json::to_vec(body).map_err(|e| HookError(e.to_string()))?;
        let req = Request::builder()
            .method(Method::POST)
            .uri(uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| HookError(e.to_string()))?;
        let resp = client
            .request(req)
            .await
            .map_err(|e| HookError(format!("{uri}: {e}")))?;
        let status = resp.status();
        // Bounded: a hook's answer is small; a larger one is a broken hook.
        let body = http_body_util::Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| HookError(format!("{uri}: {e}")))?
            .to_bytes();
        if !status.is_success() {
            return Err(HookError(format!("{uri} answered {status}")));
        }
        serde_json::from_slice(&body).map_err(|e| HookError(format!("{uri}: bad answer: {e}")))
    }
}

/// Runs `call` within `timeout`.
async fn within<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, HookError>>,
) -> Result<T, HookError> {
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| HookError(format!("no answer within {} ms", timeout.as_millis())))?
}

fn grpc_error(s: tonic::Status) -> HookError {
    HookError(format!("grpc {:?}: {}", s.code(), s.message()))
}

/// The HTTP authorization request (`POST --authorize-url`).
#[derive(Serialize)]
struct HttpAuthorize<'a> {
    user: &'a str,
    chat: &'a str,
    action: &'a str,
}

/// The HTTP authorization answer.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpAuthorized {
    allow: bool,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    cache_ttl_ms: Option<u32>,
}

/// The authorization hook (`--authorize-url`).
pub(crate) struct Authorizer {
    transport: Transport,
    timeout: Duration,
    latency: Histogram,
}

impl Authorizer {
    pub(crate) fn new(settings: &HookSettings) -> Authorizer {
        Authorizer {
            transport: Transport::new(&settings.url, settings.timeout),
            timeout: settings.timeout,
            latency: histogram!("switchboard_edge_authorize_hook_seconds"),
        }
    }

    async fn call(
        &self,
        user: &UserId,
        chat: &ChatId,
        action: Action,
    ) -> Result<HookDecision, HookError> {
        match &self.transport {
            Transport::Http { client, uri } => {
                let a: HttpAuthorized = Transport::post_json(
                    client,
                    uri,
                    &HttpAuthorize {
                        user: user.as_str(),
                        chat: chat.as_str(),
                        action: action.as_str(),
                    },
                )
                .await?;
                Ok(HookDecision {
                    allow: a.allow,
                    reason: a.reason.unwrap_or_default(),
                    cache_ttl: a.cache_ttl_ms.map(|ms| Duration::from_millis(ms.into())),
                })
            }
            Transport::Grpc(client) => {
                let mut req = tonic::Request::new(AuthorizeRequest {
                    user: user.to_string(),
                    chat: chat.to_string(),
                    action: match action {
                        Action::Subscribe => pb::Action::Subscribe,
                        Action::Publish => pb::Action::Publish,
                        Action::Receipt => pb::Action::Receipt,
                        Action::Typing => pb::Action::Typing,
                    } as i32,
                });
                req.set_timeout(self.timeout);
                let a = client
                    .clone()
                    .authorize(req)
                    .await
                    .map_err(grpc_error)?
                    .into_inner();
                Ok(HookDecision {
                    allow: a.allow,
                    reason: a.reason.unwrap_or_default(),
                    cache_ttl: a.cache_ttl_ms.map(|ms| Duration::from_millis(ms.into())),
                })
            }
        }
    }
}

#[async_trait]
impl AuthorizeHook for Authorizer {
    async fn authorize(
        &self,
        user: &UserId,
        chat: &ChatId,
        action: Action,
    ) -> Result<HookDecision, HookError> {
        let started = Instant::now();
        let answer = within(self.timeout, self.call(user, chat, action)).await;
        self.latency.record(started.elapsed().as_secs_f64());
        answer
    }
}

/// What the moderation hook said about one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdicted {
    /// Sequence it as sent.
    Accept,
    /// Refuse it, with the hook's reason.
    Reject(String),
    /// Sequence this payload instead.
    Replace(Bytes),
}

/// The outcome of moderating one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Moderated {
    /// Sequence this payload (the original, or the hook's replacement).
    Publish(Bytes),
    /// Refused by the hook (`Rejected`).
    Rejected(String),
    /// The hook did not answer and the setting is fail-closed
    /// (`Unavailable`).
    Failed(String),
}

/// The HTTP moderation request (`POST --moderation-url`).
#[derive(Serialize)]
struct HttpModerate<'a> {
    sender: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    chat: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    client_msg_id: &'a str,
    /// Standard base64 (payloads are opaque bytes).
    payload: String,
}

/// The HTTP moderation answer.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpModerated {
    verdict: String,
    #[serde(default)]
    payload: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

/// Every `verdict` label of `switchboard_moderation_total`.
const VERDICTS: &[&str] = &["accept", "reject", "replace", "error_open", "error_closed"];

/// Verdicts remembered per (sender, stream, client_msg_id), so a retry of
/// a message gets the outcome its first attempt got (ADR 0034).
const MEMO_ENTRIES: usize = 10_000;
/// Replacement payloads remembered, bytes, all entries together.
const MEMO_BYTES: usize = 16 << 20;
/// How long a verdict is remembered: a client retries within seconds.
const MEMO_TTL: Duration = Duration::from_secs(120);

type MemoKey = (UserId, StreamKey, String);

struct Memo {
    entries: HashMap<MemoKey, (Instant, Verdicted), foldhash::fast::RandomState>,
    bytes: usize,
    /// When a full memo was last swept for expired verdicts.
    swept: Instant,
}

impl Default for Memo {
    fn default() -> Self {
        Memo {
            entries: HashMap::default(),
            bytes: 0,
            swept: Instant::now(),
        }
    }
}

/// Fewest time between two sweeps of a full memo.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

fn memo_bytes(v: &Verdicted) -> usize {
    match v {
        Verdicted::Replace(p) => p.len(),
        Verdicted::Reject(r) => r.len(),
        Verdicted::Accept => 0,
    }
}

/// The moderation hook (`--moderation-url`), run by the edge on each
/// client publish before it goes to the router.
pub(crate) struct Moderation {
    transport: Transport,
    timeout: Duration,
    fail_open: bool,
    max_payload_bytes: usize,
    memo: Mutex<Memo>,
    latency: Histogram,
    /// `switchboard_moderation_total` by [`VERDICTS`], kept: one atomic add
    /// per publish instead of a registry lookup.
    verdicts: [Counter; 5],
    memo_hits: Counter,
}

fn verdict(label: &'static str) -> Counter {
    counter!("switchboard_moderation_total", "verdict" => label)
}

/// Indexes of [`VERDICTS`].
const ACCEPT: usize = 0;
const REJECT: usize = 1;
const REPLACE: usize = 2;
const ERROR_OPEN: usize = 3;
const ERROR_CLOSED: usize = 4;

/// Registers the hooks' series at zero (scraped before any call).
pub(crate) fn register_series() {
    for v in VERDICTS {
        verdict(v).absolute(0);
    }
    counter!("switchboard_moderation_memo_hits_total").absolute(0);
}

impl Moderation {
    pub(crate) fn new(settings: &ModerationSettings, max_payload_bytes: usize) -> Moderation {
        Moderation {
            transport: Transport::new(&settings.hook.url, settings.hook.timeout),
            timeout: settings.hook.timeout,
            fail_open: settings.fail_open,
            max_payload_bytes,
            memo: Mutex::default(),
            latency: histogram!("switchboard_moderation_seconds"),
            verdicts: std::array::from_fn(|i| verdict(VERDICTS[i])),
            memo_hits: counter!("switchboard_moderation_memo_hits_total"),
        }
    }

    /// The largest payload the router takes (and the hook is asked about).
    pub(crate) fn max_payload_bytes(&self) -> usize {
        self.max_payload_bytes
    }

    /// Moderates one client publish.
    pub(crate) async fn moderate(
        &self,
        sender: &UserId,
        target: &StreamKey,
        client_msg_id: &str,
        payload: Bytes,
    ) -> Moderated {
        let key = (sender.clone(), target.clone(), client_msg_id.to_owned());
        if let Some(v) = self.recall(&key) {
            self.memo_hits.increment(1);
            return outcome(v, payload);
        }
        let started = Instant::now();
        let answer = within(
            self.timeout,
            self.call(sender, target, client_msg_id, &payload),
        )
        .await
        .and_then(|v| match v {
            Verdicted::Replace(p) if p.len() > self.max_payload_bytes => Err(HookError(format!(
                "replacement is {} bytes, the limit is {}",
                p.len(),
                self.max_payload_bytes
            ))),
            v => Ok(v),
        });
        self.latency.record(started.elapsed().as_secs_f64());
        match answer {
            Ok(v) => {
                self.verdicts[match v {
                    Verdicted::Accept => ACCEPT,
                    Verdicted::Reject(_) => REJECT,
                    Verdicted::Replace(_) => REPLACE,
                }]
                .increment(1);
                self.remember(key, v.clone());
                outcome(v, payload)
            }
            Err(e) if self.fail_open => {
                self.verdicts[ERROR_OPEN].increment(1);
                tracing::warn!(error = %e, "moderation hook failed; accepted (fail-open)");
                // What was sequenced stays what a retry gets.
                self.remember(key, Verdicted::Accept);
                Moderated::Publish(payload)
            }
            Err(e) => {
                self.verdicts[ERROR_CLOSED].increment(1);
                tracing::warn!(error = %e, "moderation hook failed; refused (fail closed)");
                // Not remembered: nothing was sequenced, a retry asks again.
                // The hook's address and error stay in the operator's log.
                Moderated::Failed("moderation hook unavailable".into())
            }
        }
    }

    async fn call(
        &self,
        sender: &UserId,
        target: &StreamKey,
        client_msg_id: &str,
        payload: &Bytes,
    ) -> Result<Verdicted, HookError> {
        match &self.transport {
            Transport::Http { client, uri } => {
                let (chat, user) = match target {
                    StreamKey::Chat(c) => (Some(c.as_str()), None),
                    StreamKey::User(u) => (None, Some(u.as_str())),
                };
                let m: HttpModerated = Transport::post_json(
                    client,
                    uri,
                    &HttpModerate {
                        sender: sender.as_str(),
                        chat,
                        user,
                        client_msg_id,
                        payload: BASE64.encode(payload),
                    },
                )
                .await?;
                match m.verdict.as_str() {
                    "accept" => Ok(Verdicted::Accept),
                    "reject" => Ok(Verdicted::Reject(m.reason.unwrap_or_default())),
                    "replace" => {
                        let p = m
                            .payload
                            .ok_or_else(|| HookError("verdict replace without a payload".into()))?;
                        let p = BASE64
                            .decode(p)
                            .map_err(|e| HookError(format!("replacement payload: {e}")))?;
                        Ok(Verdicted::Replace(p.into()))
                    }
                    other => Err(HookError(format!("unknown verdict {other:?}"))),
                }
            }
            Transport::Grpc(client) => {
                let mut req = tonic::Request::new(ModerateRequest {
                    sender: sender.to_string(),
                    target: Some(match target {
                        StreamKey::Chat(c) => moderate_request::Target::Chat(c.to_string()),
                        StreamKey::User(u) => moderate_request::Target::User(u.to_string()),
                    }),
                    client_msg_id: client_msg_id.to_owned(),
                    payload: payload.clone(),
                });
                req.set_timeout(self.timeout);
                let m = client
                    .clone()
                    .moderate(req)
                    .await
                    .map_err(grpc_error)?
                    .into_inner();
                match Verdict::try_from(m.verdict) {
                    Ok(Verdict::Accept) => Ok(Verdicted::Accept),
                    Ok(Verdict::Reject) => Ok(Verdicted::Reject(m.reason)),
                    Ok(Verdict::Replace) => Ok(Verdicted::Replace(m.payload)),
                    _ => Err(HookError(format!("verdict {} is no answer", m.verdict))),
                }
            }
        }
    }

    fn recall(&self, key: &MemoKey) -> Option<Verdicted> {
        let memo = self.memo.lock().unwrap_or_else(|p| p.into_inner());
        memo.entries
            .get(key)
            .filter(|(at, _)| at.elapsed() < MEMO_TTL)
            .map(|(_, v)| v.clone())
    }

    /// Keeps a verdict within the bounds. When full, expired entries are
    /// swept (at most once per [`SWEEP_EVERY`]: a pass over every entry on
    /// each publish made a full memo cost more than none); if it is still
    /// full, the verdict is not kept (a retry then asks the hook again).
    fn remember(&self, key: MemoKey, v: Verdicted) {
        let size = memo_bytes(&v);
        let mut memo = self.memo.lock().unwrap_or_else(|p| p.into_inner());
        let full = |m: &Memo| m.entries.len() >= MEMO_ENTRIES || m.bytes + size > MEMO_BYTES;
        if full(&memo) {
            let now = Instant::now();
            if now.duration_since(memo.swept) >= SWEEP_EVERY {
                memo.swept = now;
                let memo = &mut *memo;
                let bytes = &mut memo.bytes;
                memo.entries.retain(|_, (at, v)| {
                    let keep = at.elapsed() < MEMO_TTL;
                    if !keep {
                        *bytes -= memo_bytes(v);
                    }
                    keep
                });
            }
            if full(&memo) {
                return;
            }
        }
        if let Some((_, old)) = memo.entries.insert(key, (Instant::now(), v)) {
            memo.bytes -= memo_bytes(&old);
        }
        memo.bytes += size;
    }
}

fn outcome(v: Verdicted, payload: Bytes) -> Moderated {
    match v {
        Verdicted::Accept => Moderated::Publish(payload),
        Verdicted::Replace(p) => Moderated::Publish(p),
        Verdicted::Reject(reason) => Moderated::Rejected(if reason.is_empty() {
            "rejected by moderation".into()
        } else {
            reason
        }),
    }
}

/// The authorization hook of these settings, if any.
pub(crate) fn authorizer(settings: Option<&HookSettings>) -> Option<Arc<dyn AuthorizeHook>> {
    settings.map(|s| Arc::new(Authorizer::new(s)) as Arc<dyn AuthorizeHook>)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_choose_the_transport_and_bad_ones_say_why() {
        assert!(matches!(
            "http://hooks:8080/authorize".parse::<HookUrl>(),
            Ok(HookUrl::Http(_))
        ));
        match "grpc://hooks:9090".parse::<HookUrl>() {
            Ok(HookUrl::Grpc(u)) => assert_eq!(u.to_string(), "http://hooks:9090/"),
            other => panic!("{other:?}"),
        }
        for bad in [
            "hooks:9090",
            "https://hooks/a",
            "grpc://hooks",
            "grpc://hooks:1/x",
            "ftp://x/",
            "http:///x",
            "",
        ] {
            assert!(bad.parse::<HookUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_memo_is_bounded_in_bytes() {
        let m = Moderation::new(
            &ModerationSettings {
                hook: HookSettings {
                    url: "http://127.0.0.1:1/".parse().unwrap(),
                    timeout: Duration::from_millis(10),
                },
                fail_open: false,
            },
            64 * 1024,
        );
        let key = |i: usize| {
            (
                UserId::parse("u").unwrap(),
                StreamKey::Chat(ChatId::parse("c").unwrap()),
                format!("m{i}"),
            )
        };
        let big = Bytes::from(vec![0u8; MEMO_BYTES / 2 + 1]);
        m.remember(key(1), Verdicted::Replace(big.clone()));
        m.remember(key(2), Verdicted::Replace(big));
        assert!(m.recall(&key(1)).is_some());
        assert!(m.recall(&key(2)).is_none(), "over the byte bound");
        m.remember(key(3), Verdicted::Accept);
        assert_eq!(m.recall(&key(3)), Some(Verdicted::Accept));
    }
}
