//! The backend API over gRPC (`switchboard.api.v1.Switchboard`, ADR 0033)
//! and the standard health service (`grpc.health.v1.Health`), on a
//! listener of its own (`--grpc-listen`).
//!
//! Every call is translated into the [`Api`] call its HTTP twin makes, so
//! both transports accept, refuse and answer alike; a refusal becomes a
//! status with [`ApiCode::grpc_code`], the HTTP API's message, and the
//! HTTP status in the `switchboard-code` metadata. The key is the same
//! `authorization: Bearer <key>`, as metadata.
//!
//! Bounds: messages of at most [`max_message_bytes`] (tonic refuses
//! larger ones before reading them), [`MAX_CONNECTIONS`] connections
//! (beyond, connections wait in the listen backlog), [`MAX_STREAMS`]
//! concurrent calls per connection, [`CALL_TIMEOUT`] per call, connections
//! recycled after [`MAX_CONNECTION_AGE`], and a batch of at most
//! [`MAX_BATCH_MESSAGES`] messages and [`MAX_BATCH_BYTES`].
use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use metrics::gauge;
use switchboard_protocol::{
    StreamKey,
    api::v1::{
        self as pb,
        switchboard_server::{Switchboard, SwitchboardServer},
    },
    v1::Error as ErrorMessage,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tonic::{
    Request, Response, Status, Streaming,
    body::Body,
    codegen::{Service, http},
    metadata::MetadataValue,
    server::NamedService,
    transport::server::{Connected, TcpConnectInfo},
};
use tonic_health::{
    ServingStatus,
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
};

use crate::{
    Stop,
    api::{Api, ApiCode, ApiError, HistoryFields, MAX_BATCH_MESSAGES, Op, PublishFields},
    telemetry::{Transport, api_request},
};

/// Connections served at once; more wait in the listen backlog. Backends
/// keep a few long-lived channels each.
pub const MAX_CONNECTIONS: usize = 1024;
/// Concurrent calls on one connection (HTTP/2 streams).
pub const MAX_STREAMS: u32 = 256;
/// Longest a call may take, unless the caller's deadline is shorter.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection is asked to go away (GOAWAY) after this long, and its calls
/// get [`CALL_TIMEOUT`] more: clients reconnect, so their long-lived HTTP/2
/// connections spread over replicas added since (a Kubernetes Service
/// balances connections, not calls).
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);
/// Largest batch, all its messages' payloads together.
pub const MAX_BATCH_BYTES: usize = 16 << 20;
/// Metadata carrying the HTTP API's status of a refusal.
pub const CODE_METADATA: &str = "switchboard-code";

/// Largest message a call may send: a publish of the largest payload with
/// room for its ids, and at least 8 MiB, the HTTP API's largest body (a
/// member list). Checked before the message is read: tonic refuses a
/// larger one from its length prefix.
pub fn max_message_bytes(max_payload_bytes: usize) -> usize {
    (max_payload_bytes + 16 * 1024).max(8 << 20)
}

/// Whether a node should get new work; `Some(why)` when not. The health
/// service reports NOT_SERVING while it says so (as `/readyz` answers 503).
pub type Readiness = Arc<dyn Fn() -> Option<&'static str> + Send + Sync>;

/// The gRPC server of a node, until [`GrpcServer::stop`].
pub struct GrpcServer {
    serve: JoinHandle<()>,
    health: JoinHandle<()>,
    shutdown: CancellationToken,
}

impl GrpcServer {
    /// Serves `listener` (a bound, non-blocking std listener) on `runtime`:
    /// the API behind `api`, and health as `ready` says.
    pub fn start(
        listener: std::net::TcpListener,
        api: Arc<Api>,
        ready: Readiness,
        runtime: &tokio::runtime::Handle,
    ) -> std::io::Result<GrpcServer> {
        listener.set_nonblocking(true)?;
        gauge!("switchboard_grpc_connections").set(0.0);
        let shutdown = CancellationToken::new();
        let reporter = HealthReporter::new();
        let max_message = max_message_bytes(api.max_payload_bytes());
        let routes = Routes {
            key_check: api.clone(),
            api: SwitchboardServer::new(ApiService { api }).max_decoding_message_size(max_message),
            health: HealthServer::new(HealthService::from_health_reporter(reporter.clone())),
        };
        let health = runtime.spawn(report_health(reporter, ready, shutdown.clone()));
        let signal = shutdown.clone();
        let serve = runtime.spawn(async move {
            // Registered with the reactor of the runtime that serves it.
            let listener = match TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "gRPC listener");
                    return;
                }
            };
            let served = tonic::transport::Server::builder()
                .max_concurrent_streams(MAX_STREAMS)
                .timeout(CALL_TIMEOUT)
                .max_connection_age(MAX_CONNECTION_AGE)
                .max_connection_age_grace(CALL_TIMEOUT)
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .serve_with_incoming_shutdown(routes, incoming(listener), signal.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "gRPC server failed");
            }
        });
        Ok(GrpcServer {
            serve,
            health,
            shutdown,
        })
    }

    /// Once the stop has begun: health turns NOT_SERVING and its watches
    /// end, the listener closes, connections are told to go away (GOAWAY)
    /// and calls in flight get until the work deadline.
    pub async fn stop(self, stop: &Stop) {
        self.shutdown.cancel();
        let _ = self.health.await;
        stop.join("gRPC calls in flight", stop.work_deadline(), self.serve)
            .await;
    }
}

/// The names health reports: the server as a whole, and the API.
const HEALTH_NAMES: [&str; 2] = ["", <SwitchboardServer<ApiService> as NamedService>::NAME];

/// Keeps health in step with readiness (checked every second) until the
/// stop, then reports NOT_SERVING and ends every watch, so a watching
/// client does not hold its connection open through the stop.
async fn report_health(mut reporter: HealthReporter, ready: Readiness, stop: CancellationToken) {
    let mut reported = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let status = match ready() {
            None => ServingStatus::Serving,
            Some(_) => ServingStatus::NotServing,
        };
        if reported != Some(status) {
            for name in HEALTH_NAMES {
                reporter.set_service_status(name, status).await;
            }
            reported = Some(status);
        }
    }
    for name in HEALTH_NAMES {
        reporter
            .set_service_status(name, ServingStatus::NotServing)
            .await;
        reporter.clear_service_status(name).await;
    }
}

/// Accepted connections, at most [`MAX_CONNECTIONS`] at once; an accept
/// error (out of file descriptors) is logged and retried after a pause,
/// never the end of the server.
fn incoming(
    listener: TcpListener,
) -> impl futures_util::Stream<Item = Result<Conn, std::io::Error>> {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    futures_util::stream::unfold((listener, permits), |(listener, permits)| async move {
        // The semaphore is never closed.
        let permit = permits.clone().acquire_owned().await.ok()?;
        loop {
            match listener.accept().await {
                Ok((io, _)) => {
                    let _ = io.set_nodelay(true);
                    gauge!("switchboard_grpc_connections").increment(1.0);
                    let conn = Conn {
                        io,
                        _permit: permit,
                    };
                    return Some((Ok(conn), (listener, permits)));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "gRPC accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

/// A gRPC connection, holding its place among [`MAX_CONNECTIONS`].
struct Conn {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Conn {
    fn drop(&mut self) {
        gauge!("switchboard_grpc_connections").decrement(1.0);
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The two services by path, without tonic's axum-based router. The API
/// key is checked here, from the headers, before a request's message is
/// read: a caller without the key gets nothing decoded or buffered.
#[derive(Clone)]
struct Routes {
    key_check: Arc<Api>,
    api: SwitchboardServer<ApiService>,
    health: HealthServer<HealthService>,
}

/// The API call a request path names (`/switchboard.api.v1.Switchboard/<Method>`);
/// `None` for other paths.
fn op_of(path: &str) -> Option<Op> {
    let method = path
        .strip_prefix('/')?
        .strip_prefix(<SwitchboardServer<ApiService> as NamedService>::NAME)?
        .strip_prefix('/')?;
    Some(match method {
        "Publish" | "PublishBatch" => Op::Publish,
        "Kick" => Op::Kick,
        "Presence" => Op::Presence,
        "History" => Op::History,
        "UpdateMembers" | "CountMembers" | "ListChats" | "UpdateContacts" => Op::Members,
        _ => return None,
    })
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send>>;

impl Service<http::Request<Body>> for Routes {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Both generated servers are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let health = req
            .uri()
            .path()
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(<HealthServer<HealthService> as NamedService>::NAME))
            .is_some_and(|rest| rest.starts_with('/'));
        if health {
            return Box::pin(self.health.call(req));
        }
        if let Some(op) = op_of(req.uri().path()) {
            let authorization = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            if let Err(e) = self.key_check.authorize(op, authorization) {
                api_request(Transport::Grpc, op, Err(e.code));
                return Box::pin(std::future::ready(Ok(status(e).into_http())));
            }
        }
        // Anything else, unknown paths included (the API answers those
        // UNIMPLEMENTED itself).
        let call = self.api.call(req);
        Box::pin(async move {
            let mut response = call.await?;
            typed_refusal(response.headers_mut());
            Ok(response)
        })
    }
}

/// Statuses tonic answers before a call sees its request, made the API's:
/// a message over the decoding limit (OUT_OF_RANGE) is RESOURCE_EXHAUSTED
/// like every other size limit; one that does not decode (INTERNAL, the
/// gRPC libraries' code for an unparsable message) is INVALID_ARGUMENT,
/// the caller's bad request, as HTTP's 400. The API itself answers neither
/// code, so only tonic's refusals are rewritten.
fn typed_refusal(headers: &mut http::HeaderMap) {
    let Some(status) = headers.get("grpc-status") else {
        return;
    };
    let code = match status.to_str().ok().and_then(|s| s.parse::<i32>().ok()) {
        Some(c) if c == tonic::Code::OutOfRange as i32 => ApiCode::TooLarge,
        Some(c) if c == tonic::Code::Internal as i32 => ApiCode::BadRequest,
        _ => return,
    };
    headers.insert(
        "grpc-status",
        http::HeaderValue::from(code.grpc_code() as i32),
    );
    headers.insert(CODE_METADATA, http::HeaderValue::from(code.http_status()));
}

/// A refusal as a gRPC status.
fn status(e: ApiError) -> Status {
    let mut status = Status::new(e.code.grpc_code(), e.message);
    status
        .metadata_mut()
        .insert(CODE_METADATA, MetadataValue::from(e.code.http_status()));
    status
}

/// A call's result as its answer, counted either way.
fn answer<T>(op: Op, result: Result<T, ApiError>) -> Result<Response<T>, Status> {
    api_request(
        Transport::Grpc,
        op,
        result.as_ref().map(|_| ()).map_err(|e| e.code),
    );
    result.map(Response::new).map_err(status)
}

fn publish_fields(p: pb::PublishRequest) -> PublishFields {
    use pb::publish_request::Target;
    let (chat, user) = match p.target {
        Some(Target::Chat(c)) => (Some(c), None),
        Some(Target::User(u)) => (None, Some(u)),
        None => (None, None),
    };
    PublishFields {
        chat,
        user,
        client_msg_id: p.client_msg_id,
        payload: p.payload,
        // proto3 cannot tell an empty string from an absent one.
        sender: Some(p.sender).filter(|s| !s.is_empty()),
    }
}

fn published(stream: &StreamKey, p: &switchboard_router::Published) -> pb::PublishResponse {
    pb::PublishResponse {
        stream: stream.to_string(),
        seq: p.seq,
        timestamp_ms: p.timestamp_ms,
        duplicate: p.duplicate,
    }
}

/// A status from reading a client's stream, as a refusal: a message over
/// the limit is too large, the rest is the caller's bad request.
fn stream_error(s: Status) -> ApiError {
    match s.code() {
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => {
            ApiError::new(ApiCode::TooLarge, s.message())
        }
        _ => ApiError::bad_request(s.message()),
    }
}

struct ApiService {
    api: Arc<Api>,
}

/// The API's calls, each its [`Api`] call. Only behind [`Routes`], which
/// checked the key.
impl ApiService {
    /// Reads the whole batch and checks every message; the first bad one
    /// (or one message too many) refuses the batch.
    async fn read_batch(
        &self,
        mut messages: Streaming<pb::PublishRequest>,
    ) -> Result<Vec<switchboard_router::PublishRequest>, ApiError> {
        let mut checked = Vec::new();
        let mut bytes = 0;
        while let Some(m) = messages.message().await.map_err(stream_error)? {
            if checked.len() == MAX_BATCH_MESSAGES {
                return Err(ApiError::new(
                    ApiCode::TooLarge,
                    format_args!("more than {MAX_BATCH_MESSAGES} messages in one batch"),
                ));
            }
            bytes += m.payload.len();
            if bytes > MAX_BATCH_BYTES {
                return Err(ApiError::new(
                    ApiCode::TooLarge,
                    format_args!("batch payloads over {MAX_BATCH_BYTES} bytes"),
                ));
            }
            let place = format!("messages[{}]", checked.len());
            checked.push(
                self.api
                    .publish_request(publish_fields(m))
                    .map_err(|e| e.at(place))?,
            );
        }
        Ok(checked)
    }
}

#[tonic::async_trait]
impl Switchboard for ApiService {
    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        // A backend's own trace goes on through the publish (ADR 0038).
        let traceparent = switchboard_router::trace::enabled()
            .then(|| {
                request
                    .metadata()
                    .get(switchboard_router::trace::TRACEPARENT)
            })
            .flatten()
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let result = self
            .api
            .publish_from(publish_fields(request.into_inner()), traceparent.as_deref())
            .await
            .map(|(stream, p)| published(&stream, &p));
        answer(Op::Publish, result)
    }

    async fn publish_batch(
        &self,
        request: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<pb::PublishBatchResponse>, Status> {
        let result = match self.read_batch(request.into_inner()).await {
            Ok(checked) => {
                let streams: Vec<StreamKey> = checked.iter().map(|r| r.target.clone()).collect();
                let results = self.api.publish_batch(checked).await;
                let results = streams
                    .iter()
                    .zip(results)
                    .map(|(stream, r)| {
                        use pb::publish_result::Result as R;
                        let result = match r {
                            Ok(p) => R::Published(published(stream, &p)),
                            Err(e) => R::Error(ErrorMessage {
                                code: e.code.error_code() as u32,
                                message: e.message,
                            }),
                        };
                        pb::PublishResult {
                            result: Some(result),
                        }
                    })
                    .collect();
                Ok(pb::PublishBatchResponse { results })
            }
            Err(e) => {
                crate::api::count_refused_publish(&e);
                Err(e)
            }
        };
        answer(Op::Publish, result)
    }

    async fn kick(
        &self,
        request: Request<pb::KickRequest>,
    ) -> Result<Response<pb::KickResponse>, Status> {
        let k = request.into_inner();
        let session = Some(k.session.as_str()).filter(|s| !s.is_empty());
        let result = async {
            let (user, session) = Api::kick_request(&k.user, session)?;
            let revoked_until_ms = match k.revoke_secs {
                0 => 0,
                secs => self.api.revoke(&user, secs).await?,
            };
            let edges = self.api.kick(&user, session).await?;
            Ok(pb::KickResponse {
                edges: edges as u32,
                revoked_until_ms,
            })
        };
        answer(Op::Kick, result.await)
    }

    async fn presence(
        &self,
        request: Request<pb::PresenceRequest>,
    ) -> Result<Response<pb::PresenceResponse>, Status> {
        let users = request.into_inner().users;
        let result = self.api.presence(&users).await.map(|statuses| {
            let users = statuses
                .into_iter()
                .map(|s| pb::UserPresence {
                    user: s.user.as_str().to_owned(),
                    online: s.online,
                    devices: s.devices,
                    last_seen_ms: s.last_seen_ms,
                })
                .collect();
            pb::PresenceResponse { users }
        });
        answer(Op::Presence, result)
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        use pb::history_request::Stream;
        let h = request.into_inner();
        let (chat, user) = match h.stream {
            Some(Stream::Chat(c)) => (Some(c), None),
            Some(Stream::User(u)) => (None, Some(u)),
            None => (None, None),
        };
        let fields = HistoryFields {
            chat,
            user,
            after_seq: h.after_seq,
            limit: Some(h.limit).filter(|l| *l != 0),
            epoch: h.epoch,
        };
        let result = self
            .api
            .history(fields)
            .await
            .map(|page| pb::HistoryResponse {
                position: Some(page.position),
                messages: page.messages,
                more: page.more,
            });
        answer(Op::History, result)
    }

    async fn update_members(
        &self,
        request: Request<pb::UpdateMembersRequest>,
    ) -> Result<Response<pb::UpdateMembersResponse>, Status> {
        let r = request.into_inner();
        let result = self
            .api
            .update_members(&r.chat, &r.add, &r.remove)
            .await
            .map(|c| pb::UpdateMembersResponse {
                added: c.added,
                removed: c.removed,
            });
        answer(Op::Members, result)
    }

    async fn count_members(
        &self,
        request: Request<pb::CountMembersRequest>,
    ) -> Result<Response<pb::CountMembersResponse>, Status> {
        let result = self
            .api
            .count_members(&request.into_inner().chat)
            .await
            .map(|members| pb::CountMembersResponse { members });
        answer(Op::Members, result)
    }

    async fn list_chats(
        &self,
        request: Request<pb::ListChatsRequest>,
    ) -> Result<Response<pb::ListChatsResponse>, Status> {
        let r = request.into_inner();
        let after = Some(r.cursor.as_str()).filter(|c| !c.is_empty());
        let limit = Some(r.limit as usize).filter(|l| *l != 0);
        let result = self
            .api
            .list_chats(&r.user, after, limit)
            .await
            .map(|(chats, next)| pb::ListChatsResponse {
                chats: chats.iter().map(|c| c.as_str().to_owned()).collect(),
                next_cursor: next.map(|c| c.as_str().to_owned()).unwrap_or_default(),
            });
        answer(Op::Members, result)
    }

    async fn update_contacts(
        &self,
        request: Request<pb::UpdateContactsRequest>,
    ) -> Result<Response<pb::UpdateContactsResponse>, Status> {
        let r = request.into_inner();
        let result = self
            .api
            .update_contacts(&r.user, &r.add, &r.remove)
            .await
            .map(|c| pb::UpdateContactsResponse {
                added: c.added,
                removed: c.removed,
            });
        answer(Op::Members, result)
    }
}
