//! The socket: dialing, one encoded frame per WebSocket message, decoding
//! at the edge of the actor, and what a close code advises.
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        self, Message, Utf8Bytes,
        client::IntoClientRequest,
        error::UrlError,
        http::{
            HeaderValue,
            header::{SEC_WEBSOCKET_EXTENSIONS, SEC_WEBSOCKET_PROTOCOL},
        },
        protocol::frame::{
            Frame,
            coding::{Data, OpCode},
        },
    },
};

use super::{
    ClientError, DeflateStream,
    tls::{self, Io},
};
use crate::{
    CloseReason, DecodeError, Encoding, deflate,
    v1::{ClientFrame, ServerFrame},
};

/// An open socket.
pub(super) struct Ws {
    stream: WebSocketStream<DeflateStream<Io>>,
    /// permessage-deflate was agreed and lets us compress what we send.
    compress: bool,
}

/// How long a close handshake may take before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Largest message accepted from the server, inflated or not
/// (tungstenite's own default).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Opens the WebSocket (`ws://`, or `wss://` with `tls`, default the
/// webpki roots), offering the encoding's subprotocol and, with
/// `offer_deflate`, permessage-deflate.
pub(super) async fn dial(
    url: String,
    encoding: Encoding,
    offer_deflate: bool,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
) -> Result<Ws, ClientError> {
    let mut request = url.as_str().into_client_request()?;
    request.headers_mut().insert(
        SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(encoding.subprotocol()),
    );
    if offer_deflate {
        request.headers_mut().insert(
            SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static(deflate::CLIENT_OFFER),
        );
    }
    let uri = request.uri();
    let secure = match uri.scheme_str() {
        Some("ws") => false,
        Some("wss") => true,
        _ => return Err(tungstenite::Error::Url(UrlError::UnsupportedUrlScheme).into()),
    };
    let host = uri
        .host()
        .ok_or(tungstenite::Error::Url(UrlError::NoHostName))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    // Dialed here rather than by `connect_async`, to put the deflate
    // stream under tungstenite (and over TLS).
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(ClientError::Io)?;
    let _ = tcp.set_nodelay(true);
    let tcp = if secure {
        tls::handshake(tcp, host, tls).await?
    } else {
        Io::Plain(tcp)
    };
    let io = if offer_deflate {
        DeflateStream::before_upgrade(tcp, MAX_MESSAGE_BYTES)
    } else {
        DeflateStream::plain(tcp)
    };
    let (stream, response) = tokio_tungstenite::client_async(request, io).await?;
    let answer = response
        .headers()
        .get_all(SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    let agreed =
        deflate::agreed(Some(&answer)).map_err(|e| ClientError::Protocol(e.to_string()))?;
    if agreed.is_some() && !offer_deflate {
        return Err(ClientError::Protocol(
            "the server agreed to permessage-deflate, which was not offered".into(),
        ));
    }
    debug_assert_eq!(agreed.is_some(), stream.get_ref().is_agreed());
    Ok(Ws {
        stream,
        compress: agreed.is_some_and(|a| a.compress_outgoing),
    })
}

/// Encodes and writes one frame, compressed when deflate was agreed and
/// it is long enough.
pub(super) async fn send(
    ws: &mut Ws,
    encoding: Encoding,
    frame: &ClientFrame,
) -> Result<(), ClientError> {
    let bytes = encoding.encode_client(frame);
    let packed = (ws.compress && bytes.len() >= deflate::DEFAULT_MIN_BYTES)
        .then(|| deflate::compress(&bytes))
        .filter(|p| p.len() < bytes.len());
    if let Some(packed) = packed {
        let data = if encoding.is_text() {
            Data::Text
        } else {
            Data::Binary
        };
        // tungstenite writes a prepared frame as it is, RSV1 included.
        let mut frame = Frame::message(packed, OpCode::Data(data), true);
        frame.header_mut().rsv1 = true;
        ws.stream.send(Message::Frame(frame)).await?;
        return Ok(());
    }
    let message = if encoding.is_text() {
        // The JSON encoding always produces UTF-8.
        Message::Text(Utf8Bytes::try_from(bytes).map_err(|e| ClientError::Protocol(e.to_string()))?)
    } else {
        Message::Binary(bytes)
    };
    ws.stream.send(message).await?;
    Ok(())
}

/// What the socket produced.
#[derive(Debug)]
pub(super) enum Inbound {
    /// A decoded frame.
    Frame(ServerFrame),
    /// A data frame that did not decode; the socket is still usable.
    Undecodable(DecodeError),
    /// A ping or pong: the server is alive (tungstenite answers pings).
    Heartbeat,
    /// The peer closed the socket: close code (`None` without a close
    /// frame) and reason.
    Closed { code: Option<u16>, reason: String },
    /// The socket failed.
    Failed(ClientError),
}

/// Reads the next frame. Control frames are handled by tungstenite (pings
/// are answered while we read) and reported as heartbeats. Cancel-safe: nothing is lost when
/// the future is dropped before it completes.
pub(super) async fn recv(ws: &mut Ws, encoding: Encoding) -> Inbound {
    loop {
        let message = match ws.stream.next().await {
            Some(Ok(m)) => m,
            None
            | Some(Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed)) =>
            {
                return Inbound::Closed {
                    code: None,
                    reason: "connection closed".into(),
                };
            }
            Some(Err(e)) => return Inbound::Failed(e.into()),
        };
        let decoded = match message {
            Message::Binary(b) => encoding.decode_server(&b, false),
            Message::Text(t) => encoding.decode_server(t.as_bytes(), true),
            Message::Close(frame) => {
                let (code, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    // 1005: "no status received".
                    .unwrap_or((1005, String::new()));
                return Inbound::Closed {
                    code: Some(code),
                    reason,
                };
            }
            Message::Ping(_) | Message::Pong(_) => return Inbound::Heartbeat,
            Message::Frame(_) => continue,
        };
        return match decoded {
            Ok(frame) => Inbound::Frame(frame),
            Err(e) => Inbound::Undecodable(e),
        };
    }
}

/// Closes the socket (with our close frame, if given) and waits briefly for
/// the peer's; errors do not matter any more.
pub(super) async fn shut(mut ws: Ws, frame: Option<tungstenite::protocol::CloseFrame>) {
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        let _ = ws.stream.close(frame).await;
        while let Some(Ok(_)) = ws.stream.next().await {}
    })
    .await;
}

/// Whether a close code advises reconnecting: ours by their range
/// (4000-4499 yes, 4500-4999 no); standard codes yes, except those saying
/// our frames were wrong, which a new socket would repeat. `None` (no close
/// frame: the network failed) means yes.
pub(super) fn reconnect_advised(code: Option<u16>) -> bool {
    let Some(code) = code else { return true };
    if let Some(reason) = CloseReason::from_code(code) {
        return reason.reconnect();
    }
    !matches!(code, 1002 | 1003 | 1007 | 1008 | 1010 | 4500..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_advise_by_range() {
        assert!(reconnect_advised(None));
        assert!(reconnect_advised(Some(CloseReason::SlowConsumer.code())));
        assert!(reconnect_advised(Some(CloseReason::Shutdown.code())));
        assert!(reconnect_advised(Some(4499)));
        assert!(!reconnect_advised(Some(CloseReason::Unauthorized.code())));
        assert!(!reconnect_advised(Some(4999)));
        assert!(reconnect_advised(Some(1001)));
        assert!(reconnect_advised(Some(1006)));
        assert!(reconnect_advised(Some(1011)));
        assert!(!reconnect_advised(Some(1008)));
    }
}
