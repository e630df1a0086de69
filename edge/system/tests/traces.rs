//! OpenTelemetry traces (ADR 0038; this package's `otel` feature): real
//! edge and router processes export over OTLP/gRPC to a receiver this
//! test serves (the OTLP trace service, with the protocol's own types),
//! and one trace links the publish on one edge, the router's sequencing
//! and delivery, and the fan-out on the other edge. Off, nothing is
//! exported and no NATS message carries a trace header.
use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, any_value},
};
use serde_json::json;
use switchboard_testkit::Server;

use crate::common::{cluster::*, *};

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    node: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: Vec<(String, String)>,
}

impl Span {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// The OTLP trace service, keeping every span it is sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let resource: Vec<(String, String)> = rs
                .resource
                .map(|r| {
                    r.attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(&kv.value)))
                        .collect()
                })
                .unwrap_or_default();
            let of = |key: &str| {
                resource
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Span {
                        service: of("service.name"),
                        node: of("service.instance.id"),
                        name: s.name,
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        attributes: s
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), text(&kv.value)))
                            .collect(),
                    });
                }
            }
        }
        self.spans.lock().unwrap().extend(got);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    /// Serves on a free port; the endpoint for `--otlp-endpoint`.
    async fn start() -> (Receiver, String) {
        let receiver = Receiver::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(async move {
            // One service, so no router (the tree's tonic has none).
            tonic::transport::Server::builder()
                .serve_with_incoming(service, tokio_stream(listener))
                .await
                .unwrap();
        });
        (receiver, format!("http://{addr}"))
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until a span passes `want`, for at most 20 s.
    async fn wait_for(&self, what: &str, want: impl Fn(&Span) -> bool) -> Span {
        for _ in 0..200 {
            if let Some(s) = self.spans().into_iter().find(&want) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no {what} span exported; got {:#?}", self.spans());
    }
}

/// Accepted connections of `listener` as tonic's incoming stream.
fn tokio_stream(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |l| async move {
        let accepted = l.accept().await.map(|(s, _)| s);
        Some((accepted, l))
    })
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Trace settings for a node process: `None` leaves traces off.
fn trace_env(endpoint: Option<&str>) -> Vec<(String, String)> {
    match endpoint {
        None => vec![],
        Some(e) => vec![
            ("SWITCHBOARD_OTLP_ENDPOINT".into(), e.into()),
            ("SWITCHBOARD_TRACE_SAMPLE_RATIO".into(), "1.0".into()),
            // Export within a tenth of a second, not the default 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ],
    }
}

/// A router and two edges (`edge-a`, `edge-b`) as processes.
struct Nodes {
    nats: Server,
    _redis: Server,
    router: SocketAddr,
    router_grpc: SocketAddr,
    edge_a: SocketAddr,
    edge_b: SocketAddr,
    _procs: Vec<Proc>,
}

async fn start_nodes(endpoint: Option<&str>) -> Nodes {
    start_nodes_with(trace_env(endpoint)).await
}

/// [`start_nodes`] with these trace settings on each node.
async fn start_nodes_with(traces: Vec<(String, String)>) -> Nodes {
    let nats = Server::nats();
    let redis = Server::redis();
    let (router_port, grpc_port) = (free_port(), free_port());
    let router = Command::new(ROUTER_BIN)
        .envs([
            (
                "SWITCHBOARD_ROUTER_LISTEN".to_owned(),
                format!("127.0.0.1:{router_port}"),
            ),
            ("SWITCHBOARD_NATS_URL".into(), nats.url()),
            ("SWITCHBOARD_REDIS_URL".into(), redis.url()),
            ("SWITCHBOARD_API_KEY".into(), API_KEY.into()),
            ("SWITCHBOARD_NODE_ID".into(), "router-0".into()),
            (
                "SWITCHBOARD_ROUTER_GRPC_LISTEN".into(),
                format!("127.0.0.1:{grpc_port}"),
            ),
        ])
        .envs(traces.clone())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut procs = vec![Proc(router)];
    let router: SocketAddr = format!("127.0.0.1:{router_port}").parse().unwrap();
    wait_listening(router, "router").await;
    wait_for_routers(&nats).await;
    let mut edges = Vec::new();
    for node in ["edge-a", "edge-b"] {
        let port = free_port();
        let child = Command::new(EDGE_BIN)
            .envs(edge_process_env(&nats, &redis, node, port))
            .envs(traces.clone())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        procs.push(Proc(child));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_listening(addr, node).await;
        edges.push(addr);
    }
    Nodes {
        nats,
        _redis: redis,
        router,
        router_grpc: SocketAddr::from(([127, 0, 0, 1], grpc_port)),
        edge_a: edges[0],
        edge_b: edges[1],
        _procs: procs,
    }
}

/// The `traceparent` headers of the messages on `subject` (`None` for a
/// message without one), as NATS delivers them to a plain subscriber.
async fn spy(nats: &Server, subject: &str) -> Arc<Mutex<Vec<Option<String>>>> {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut sub = client.subscribe(subject.to_owned()).await.unwrap();
    client.flush().await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    tokio::spawn(async move {
        let _client = client;
        while let Some(msg) = sub.next().await {
            let tp = msg
                .headers
                .as_ref()
                .and_then(|h| h.get("traceparent"))
                .map(|v| v.to_string());
            out.lock().unwrap().push(tp);
        }
    });
    seen
}

/// Bob on edge-b subscribed to `room`, alice on edge-a; alice publishes
/// `text` there and bob receives it.
async fn publish_across(nodes: &Nodes, text: &str) -> (Raw, Raw) {
    let mut bob = Raw::connected_addr(nodes.edge_b, "bob").await;
    let r = bob.request(json!({"subscribe": {"chat": "room"}})).await;
    assert!(r.get("subscribeResult").is_some(), "{r}");
    let mut alice = Raw::connected_addr(nodes.edge_a, "alice").await;
    let ack = alice
        .request(json!({"publish": {"chat": "room", "clientMsgId": "m1", "payload": b64(text)}}))
        .await;
    assert!(ack.get("publishAck").is_some(), "{ack}");
    let got = bob.deliveries(1).await;
    assert_eq!(payload_text(&got[0]), text);
    (alice, bob)
}

const SECRET_TEXT: &str = "the-payload-never-traced-5e1f";

#[tokio::test]
async fn one_trace_links_the_publish_the_router_and_the_delivering_edges_fanout() {
    let (receiver, endpoint) = Receiver::start().await;
    let nodes = start_nodes(Some(&endpoint)).await;
    let requests = spy(&nodes.nats, switchboard_protocol::subject::ROUTER_PUBLISH).await;
    let deliveries = spy(&nodes.nats, "sb.chat.room").await;
    let _clients = publish_across(&nodes, SECRET_TEXT).await;

    let publish = receiver
        .wait_for("edge.publish", |s| s.name == "edge.publish")
        .await;
    assert_eq!(
        (publish.service.as_str(), publish.node.as_str()),
        ("switchboard-edge", "edge-a")
    );
    assert_eq!(publish.attr("stream"), Some("chat:room"));
    assert_eq!(publish.attr("seq"), Some("1"));
    let trace = publish.trace_id.clone();
    let in_trace = |name: &'static str| {
        let trace = trace.clone();
        move |s: &Span| s.name == name && s.trace_id == trace
    };
    let sequenced = receiver
        .wait_for("router.publish", in_trace("router.publish"))
        .await;
    assert_eq!(sequenced.service, "switchboard-router");
    assert_eq!(sequenced.parent_span_id, publish.span_id, "{sequenced:?}");
    assert_eq!(sequenced.attr("seq"), Some("1"));
    let delivered = receiver
        .wait_for("router.deliver", in_trace("router.deliver"))
        .await;
    assert_eq!(delivered.parent_span_id, sequenced.span_id);
    let fanout = receiver
        .wait_for("edge.fanout", in_trace("edge.fanout"))
        .await;
    assert_eq!(
        (fanout.service.as_str(), fanout.node.as_str()),
        ("switchboard-edge", "edge-b")
    );
    assert_eq!(fanout.parent_span_id, delivered.span_id, "{fanout:?}");
    assert_eq!(fanout.attr("stream"), Some("chat:room"));
    assert_eq!(fanout.attr("sockets"), Some("1"));
    // One fan-out span per delivery on the edge that has the sockets.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fanouts: Vec<Span> = receiver
        .spans()
        .into_iter()
        .filter(|s| s.name == "edge.fanout")
        .collect();
    assert_eq!(fanouts.len(), 1, "{fanouts:#?}");

    // Both hops over NATS carried this trace's context.
    let header = |seen: &Arc<Mutex<Vec<Option<String>>>>| seen.lock().unwrap().clone();
    let on_request = header(&requests);
    assert_eq!(on_request.len(), 1, "{on_request:?}");
    let tp = on_request[0]
        .clone()
        .expect("the request carries a traceparent");
    assert_eq!(tp, format!("00-{trace}-{}-01", publish.span_id));
    let on_delivery = header(&deliveries);
    assert_eq!(
        on_delivery,
        vec![Some(format!("00-{trace}-{}-01", delivered.span_id))]
    );

    // A backend's own trace goes on through the API.
    let backend_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let backend_span = "00f067aa0ba902b7";
    let (status, _) = post_traced(
        nodes.router,
        &json!({"chat": "room", "client_msg_id": "b1", "text": "from a backend"}),
        &format!("00-{backend_trace}-{backend_span}-01"),
    )
    .await;
    assert_eq!(status, 200);
    let api = receiver
        .wait_for("api.publish", |s| {
            s.name == "api.publish" && s.trace_id == backend_trace
        })
        .await;
    assert_eq!(api.parent_span_id, backend_span);
    assert_eq!(api.service, "switchboard-router");
    let fanout = receiver
        .wait_for("the backend's edge.fanout", |s| {
            s.name == "edge.fanout" && s.trace_id == backend_trace
        })
        .await;
    assert_eq!(fanout.node, "edge-b");

    // And through the gRPC API, from its `traceparent` metadata.
    let grpc_trace = "0af7651916cd43dd8448eb211c80319c";
    grpc_publish_traced(
        nodes.router_grpc,
        &format!("00-{grpc_trace}-{backend_span}-01"),
    )
    .await;
    let api = receiver
        .wait_for("api.publish over gRPC", |s| {
            s.name == "api.publish" && s.trace_id == grpc_trace
        })
        .await;
    assert_eq!(api.parent_span_id, backend_span);
    receiver
        .wait_for("the gRPC publish's edge.fanout", |s| {
            s.name == "edge.fanout" && s.trace_id == grpc_trace
        })
        .await;

    // Ids, counts and sizes only: never a payload or a token.
    let token = token("alice");
    for s in receiver.spans() {
        for (k, v) in &s.attributes {
            assert!(
                !v.contains(SECRET_TEXT) && !v.contains(&token) && !v.contains(API_KEY),
                "{k}={v} in {s:?}"
            );
        }
    }
}

#[tokio::test]
async fn without_an_endpoint_nothing_is_exported_and_no_header_is_sent() {
    let (receiver, _endpoint) = Receiver::start().await;
    let nodes = start_nodes(None).await;
    let requests = spy(&nodes.nats, switchboard_protocol::subject::ROUTER_PUBLISH).await;
    let deliveries = spy(&nodes.nats, "sb.chat.room").await;
    let _clients = publish_across(&nodes, "untraced").await;
    // A backend's traceparent is not passed on either.
    let (status, _) = post_traced(
        nodes.router,
        &json!({"chat": "room", "client_msg_id": "b1", "text": "from a backend"}),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )
    .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(receiver.spans().is_empty(), "{:?}", receiver.spans());
    let requests = requests.lock().unwrap().clone();
    assert_eq!(requests, vec![None], "publish requests");
    let deliveries = deliveries.lock().unwrap().clone();
    assert_eq!(deliveries, vec![None, None], "deliveries");
}

/// `POST /api/publish` with a `traceparent` header; the status and body.
async fn post_traced(
    addr: SocketAddr,
    body: &serde_json::Value,
    traceparent: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.to_string();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST /api/publish HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {API_KEY}\r\ntraceparent: {traceparent}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    (out[9..12].parse().unwrap(), out)
}

#[tokio::test]
async fn at_ratio_zero_nothing_is_exported_and_deliveries_carry_no_header() {
    let (receiver, endpoint) = Receiver::start().await;
    let mut env = trace_env(Some(&endpoint));
    env[1].1 = "0".into();
    let nodes = start_nodes_with(env).await;
    let requests = spy(&nodes.nats, switchboard_protocol::subject::ROUTER_PUBLISH).await;
    let deliveries = spy(&nodes.nats, "sb.chat.room").await;
    let _clients = publish_across(&nodes, "unsampled").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(receiver.spans().is_empty(), "{:?}", receiver.spans());
    // The request says "not sampled", so the router does not sample it
    // afresh; the delivery carries nothing for the edges to look at.
    let requests = requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 1);
    let tp = requests[0].clone().expect("an unsampled context");
    assert!(tp.starts_with("00-") && tp.ends_with("-00"), "{tp}");
    let deliveries = deliveries.lock().unwrap().clone();
    assert_eq!(deliveries, vec![None]);
}

/// Standalone (one edge process, the in-process bus), the router's and
/// the fan-out's spans are in the publish's trace too.
#[tokio::test]
async fn a_standalone_edge_links_its_own_spans() {
    let (receiver, endpoint) = Receiver::start().await;
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let _edge = Proc(
        Command::new(EDGE_BIN)
            .envs([
                ("SWITCHBOARD_LISTEN".to_owned(), addr.to_string()),
                ("SWITCHBOARD_JWT_SECRET".into(), SECRET.into()),
                ("SWITCHBOARD_CHAT_AUTH".into(), "open".into()),
                ("SWITCHBOARD_NODE_ID".into(), "alone".into()),
            ])
            .envs(trace_env(Some(&endpoint)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(addr, "edge").await;
    let mut bob = Raw::connected_addr(addr, "bob").await;
    let r = bob.request(json!({"subscribe": {"chat": "room"}})).await;
    assert!(r.get("subscribeResult").is_some(), "{r}");
    let mut alice = Raw::connected_addr(addr, "alice").await;
    let ack = alice
        .request(json!({"publish": {"chat": "room", "clientMsgId": "m1", "payload": b64("hi")}}))
        .await;
    assert!(ack.get("publishAck").is_some(), "{ack}");
    bob.deliveries(1).await;

    let publish = receiver
        .wait_for("edge.publish", |s| s.name == "edge.publish")
        .await;
    let trace = publish.trace_id.clone();
    let in_trace = |name: &'static str| {
        let trace = trace.clone();
        move |s: &Span| s.name == name && s.trace_id == trace
    };
    let sequenced = receiver
        .wait_for("router.publish", in_trace("router.publish"))
        .await;
    assert_eq!(sequenced.parent_span_id, publish.span_id);
    let delivered = receiver
        .wait_for("router.deliver", in_trace("router.deliver"))
        .await;
    assert_eq!(delivered.parent_span_id, sequenced.span_id);
    let fanout = receiver
        .wait_for("edge.fanout", in_trace("edge.fanout"))
        .await;
    assert_eq!(fanout.parent_span_id, delivered.span_id);
    assert_eq!(fanout.attr("sockets"), Some("1"));
    assert!(
        receiver
            .spans()
            .iter()
            .all(|s| s.service == "switchboard-edge" && s.node == "alone")
    );
}

/// A gRPC `Publish` to `room` with `traceparent` metadata.
async fn grpc_publish_traced(addr: SocketAddr, traceparent: &str) {
    use switchboard_protocol::api::v1::{
        PublishRequest, publish_request, switchboard_client::SwitchboardClient,
    };
    wait_listening(addr, "router gRPC").await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = SwitchboardClient::new(channel);
    let mut request = tonic::Request::new(PublishRequest {
        target: Some(publish_request::Target::Chat("room".into())),
        client_msg_id: "g1".into(),
        payload: bytes::Bytes::from_static(b"over gRPC"),
        sender: String::new(),
    });
    let md = request.metadata_mut();
    md.insert(
        "authorization",
        format!("Bearer {API_KEY}").parse().unwrap(),
    );
    md.insert("traceparent", traceparent.parse().unwrap());
    client.publish(request).await.unwrap();
}
