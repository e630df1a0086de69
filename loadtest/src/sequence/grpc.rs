//! The sequence scenario's publishers over the routers' gRPC API
//! (`switchboard.api.v1.Switchboard`, ADR 0033): `Publish` one message a
//! call, or `PublishBatch` carrying the next message of each of a group's
//! chats in one client-streaming call.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use anyhow::Context;
use bytes::Bytes;
use switchboard_protocol::api::v1::{
    PublishRequest, PublishResponse, publish_request, publish_result,
    switchboard_client::SwitchboardClient,
};
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

use super::REQUEST_TIMEOUT;
use crate::{
    recorder::{Batch, Counters, Recorder},
    report::now_us,
};

/// The metadata a router's refusal carries: the HTTP API's status for it.
const CODE_METADATA: &str = "switchboard-code";

/// Adds the API key to every call, as `authorization: Bearer <key>`.
#[derive(Clone)]
struct Bearer(MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Client = SwitchboardClient<InterceptedService<Channel, Bearer>>;

/// One HTTP/2 connection to a router's gRPC listener, as the HTTP
/// publishers hold one keep-alive connection each.
async fn connect(addr: SocketAddr, key: &MetadataValue<Ascii>) -> anyhow::Result<Client> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(REQUEST_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    Ok(SwitchboardClient::with_interceptor(
        channel,
        Bearer(key.clone()),
    ))
}

/// The `authorization` metadata for `api_key`.
pub(super) fn bearer(api_key: &str) -> anyhow::Result<MetadataValue<Ascii>> {
    MetadataValue::try_from(format!("Bearer {api_key}"))
        .context("the API key is not ASCII metadata")
}

/// Counts what one message's answer came to.
fn answered(rec: &Recorder, samples: &mut Batch, sent: u64, ack: &PublishResponse) {
    if ack.duplicate {
        // Every client message id is new: a duplicate means a retry the
        // scenario never made was sequenced before.
        rec.add_counter("duplicated", 1);
        return;
    }
    Counters::add(&rec.kind(0).received, 1);
    samples.latency(0, sent, now_us());
}

/// A call that failed as a whole, for `n` messages: refused by the router
/// (its status carries the HTTP API's status code, counted as HTTP's
/// refusals are), or no answer (the connection is then dropped).
fn failed(rec: &Recorder, status: &Status, n: u64) -> bool {
    match status
        .metadata()
        .get(CODE_METADATA)
        .and_then(|v| v.to_str().ok())
    {
        Some(code) => {
            rec.add_counter(&format!("refused_{code}"), n);
            true
        }
        None => {
            rec.add_counter("unanswered", n);
            false
        }
    }
}

/// Publishes into `chats` until `until` over one connection to `addr`,
/// reconnecting after a call goes unanswered. One chat and `batch` false:
/// unary `Publish`; otherwise one `PublishBatch` call per round with the
/// next message of every chat (chats side by side on the router).
pub(super) async fn publisher(
    rec: Arc<Recorder>,
    addr: SocketAddr,
    key: MetadataValue<Ascii>,
    chats: Vec<String>,
    batch: bool,
    payload: Bytes,
    until: Instant,
) {
    let mut samples = rec.samples();
    let mut client = None;
    let mut n = 0u64;
    while Instant::now() < until {
        if client.is_none() {
            match connect(addr, &key).await {
                Ok(c) => client = Some(c),
                Err(_) => {
                    rec.add_counter("connect_errors", 1);
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let Some(c) = client.as_mut() else { continue };
        n += 1;
        let messages: Vec<PublishRequest> = chats
            .iter()
            .map(|chat| PublishRequest {
                target: Some(publish_request::Target::Chat(chat.clone())),
                client_msg_id: format!("{chat}-{n}"),
                payload: payload.clone(),
                // As the HTTP publishers: shown as "backend".
                sender: String::new(),
            })
            .collect();
        let count = messages.len() as u64;
        let sent = now_us();
        Counters::add(&rec.kind(0).sent, count);
        rec.add_counter("calls", 1);
        let kept = if batch {
            let call = c.publish_batch(futures_util::stream::iter(messages));
            match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
                Ok(Ok(resp)) => {
                    let results = resp.into_inner().results;
                    if results.len() as u64 != count {
                        rec.add_counter("bad_replies", count);
                    } else {
                        for r in results {
                            match r.result {
                                Some(publish_result::Result::Published(ack)) => {
                                    answered(&rec, &mut samples, sent, &ack)
                                }
                                // The protocol's error code, as NATS refusals are counted.
                                Some(publish_result::Result::Error(e)) => {
                                    rec.add_counter(&format!("refused_code_{}", e.code), 1)
                                }
                                None => rec.add_counter("bad_replies", 1),
                            }
                        }
                    }
                    true
                }
                Ok(Err(status)) => failed(&rec, &status, count),
                Err(_) => {
                    rec.add_counter("unanswered", count);
                    false
                }
            }
        } else {
            let Some(message) = messages.into_iter().next() else {
                return;
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, c.publish(message)).await {
                Ok(Ok(resp)) => {
                    answered(&rec, &mut samples, sent, resp.get_ref());
                    true
                }
                Ok(Err(status)) => failed(&rec, &status, 1),
                Err(_) => {
                    rec.add_counter("unanswered", 1);
                    false
                }
            }
        };
        if !kept {
            client = None;
        }
    }
}
