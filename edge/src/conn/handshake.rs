//! The Connect handshake of an upgraded socket: its first data frame,
//! under the deadline set at accept, must be a Connect with a valid token
//! (or none, after a valid `Authorization` header); otherwise the socket
//! gets an Error, a Disconnect and a close.
use std::time::Duration;

use fastwebsockets::{Frame, OpCode, WebSocketError};
use switchboard_protocol::{
    CloseReason, Encoding, deflate,
    v1::{
        ClientFrame, Connect, Error as ErrorFrame, ErrorCode, ServerFrame, client_frame,
        server_frame,
    },
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::Instant,
};

use crate::{
    admission::Permit,
    auth::{AuthError, Identity},
    conn::{
        inbound::Inbound,
        reader::{inflate_failure, read_failure},
        writer::reconnect_delay_ms,
    },
    metrics,
    state::SessionContext,
    wire::BatchWriter,
};

/// Everything known about a socket before its Connect frame.
pub(crate) struct Accepted {
    pub(crate) encoding: Encoding,
    /// permessage-deflate was agreed in the 101.
    pub(crate) deflate: bool,
    /// Identity from an `Authorization: Bearer` header, if one was sent.
    pub(crate) header_identity: Option<Identity>,
    pub(crate) deadline: Instant,
    pub(crate) permit: Permit,
    /// Held until connectResult (`--max-handshakes`).
    pub(crate) handshake: tokio::sync::OwnedSemaphorePermit,
}

/// Waits for Connect and verifies its token. On failure, answers with an
/// Error, a Disconnect and a close, and returns None.
pub(super) async fn handshake<R, W>(
    ctx: &SessionContext,
    rd: &mut Inbound<R>,
    ws: &mut BatchWriter<W>,
    accepted: &Accepted,
) -> Option<(Identity, u32, Box<Connect>)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let enc = accepted.encoding;
    let (frame, compressed) =
        match tokio::time::timeout_at(accepted.deadline, first_frame(rd, ws)).await {
            Err(_) => {
                close_early(ctx, ws, enc, 0, None, CloseReason::ConnectTimeout).await;
                return None;
            }
            Ok(Err(e)) => {
                let v = read_failure(&e, ctx.settings.max_frame_bytes)?;
                close_early(ctx, ws, enc, 0, Some((v.code, v.message)), v.reason).await;
                return None;
            }
            Ok(Ok(f)) => f,
        };
    metrics::frame_in(&ctx.metrics, frame.payload.len());
    if !matches!(frame.opcode, OpCode::Text | OpCode::Binary) || !frame.fin {
        close_early(
            ctx,
            ws,
            enc,
            0,
            Some((ErrorCode::BadRequest, "expected a Connect frame".into())),
            CloseReason::BadRequest,
        )
        .await;
        return None;
    }
    // Browsers compress every message once permessage-deflate is agreed.
    let inflated;
    let payload: &[u8] = if compressed {
        inflated = match deflate::inflate(&frame.payload, ctx.settings.max_frame_bytes) {
            Ok(p) => p,
            Err(e) => {
                let v = inflate_failure(e);
                close_early(ctx, ws, enc, 0, Some((v.code, v.message)), v.reason).await;
                return None;
            }
        };
        ctx.metrics.deflate.inflated.increment(1);
        &inflated
    } else {
        &frame.payload
    };
    let parsed = enc.decode_client(payload, frame.opcode == OpCode::Text);
    let (id, connect) = match parsed {
        Ok(ClientFrame {
            id,
            kind: Some(client_frame::Kind::Connect(c)),
        }) => (id, c),
        Ok(ClientFrame { id, .. }) => {
            let err = (
                ErrorCode::BadRequest,
                "the first frame must be connect".to_string(),
            );
            close_early(ctx, ws, enc, id, Some(err), CloseReason::BadRequest).await;
            return None;
        }
        Err(e) => {
            close_early(
                ctx,
                ws,
                enc,
                0,
                Some((ErrorCode::BadRequest, e.to_string())),
                CloseReason::BadRequest,
            )
            .await;
            return None;
        }
    };
    let verified = if connect.token.is_empty() {
        accepted.header_identity.clone().ok_or(AuthError::Missing)
    } else {
        ctx.auth.verify(&connect.token)
    };
    match verified {
        Ok(identity) => Some((identity, id, Box::new(connect))),
        Err(e) => {
            metrics::auth_failure(e.label());
            tracing::debug!(error = %e, "token refused");
            close_early(
                ctx,
                ws,
                enc,
                id,
                Some((e.code(), e.to_string())),
                CloseReason::Unauthorized,
            )
            .await;
            None
        }
    }
}

/// The first data frame, answering pings before it and echoing a close.
async fn first_frame<R, W>(
    rd: &mut Inbound<R>,
    ws: &mut BatchWriter<W>,
) -> Result<(Frame<'static>, bool), WebSocketError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut echo = None;
    loop {
        let mut keep = |f: Frame<'static>| {
            echo = Some(f.payload.to_vec());
            std::future::ready(Ok::<(), &'static str>(()))
        };
        let (frame, compressed) = rd.read_frame(&mut keep).await?;
        match frame.opcode {
            OpCode::Ping => {
                ws.push(OpCode::Pong, &frame.payload);
                ws.flush().await?;
            }
            OpCode::Pong => {}
            OpCode::Close => {
                let payload = echo.take().unwrap_or_default();
                ws.push(OpCode::Close, &payload);
                ws.flush().await?;
                return Err(WebSocketError::ConnectionClosed);
            }
            _ => return Ok((frame, compressed)),
        }
    }
}

async fn close_early<W: AsyncWrite + Unpin>(
    ctx: &SessionContext,
    ws: &mut BatchWriter<W>,
    enc: Encoding,
    id: u32,
    error: Option<(ErrorCode, String)>,
    reason: CloseReason,
) {
    metrics::disconnect(reason.as_str());
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        if let Some((code, message)) = error {
            let frame = ServerFrame {
                id,
                kind: Some(server_frame::Kind::Error(ErrorFrame {
                    code: code as u32,
                    message,
                })),
            };
            write_encoded(ws, enc, &frame);
        }
        let delay = reconnect_delay_ms(reason, &ctx.settings);
        write_encoded(ws, enc, &reason.disconnect_frame(delay));
        ws.push_close(reason.code(), reason.as_str().as_bytes());
        ws.flush().await
    })
    .await;
}

fn write_encoded<W: AsyncWrite + Unpin>(
    ws: &mut BatchWriter<W>,
    enc: Encoding,
    frame: &ServerFrame,
) {
    let bytes = enc.encode_server(frame);
    let opcode = if enc.is_text() {
        OpCode::Text
    } else {
        OpCode::Binary
    };
    ws.push(opcode, &bytes);
}
