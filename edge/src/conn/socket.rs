//! A served socket's two halves.
//!
//! The upgrade hands back hyper's `Upgraded`: a boxed stream behind a
//! buffer of bytes read past the request. Split with `tokio::io::split`,
//! every write from the fan-out went through the split's lock and two
//! more pointers (the split's shared half and the box) before reaching
//! the `TcpStream`, each a cache miss on a socket that was idle since the
//! last post. A plain TCP socket is taken back out of the upgrade and
//! split into tokio's owned halves instead: a write is the stream's own
//! readiness check and the syscall (ADR 0042). TLS keeps the generic
//! split.
use std::{
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

pub(crate) enum SocketRead {
    Tcp(OwnedReadHalf),
    /// A client that sent frames right behind its upgrade request: hyper
    /// had read them already (rare; boxed to keep the common case small).
    Prefixed(Box<(Bytes, OwnedReadHalf)>),
    Other(ReadHalf<Upgraded>),
}

pub(crate) enum SocketWrite {
    Tcp(OwnedWriteHalf),
    Other(WriteHalf<Upgraded>),
}

/// Splits an upgraded connection, into tokio's owned TCP halves when it
/// is plain TCP.
pub(crate) fn split(io: Upgraded) -> (SocketRead, SocketWrite) {
    match io.into_inner().downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let (r, w) = parts.io.into_inner().into_split();
            let r = if parts.read_buf.is_empty() {
                SocketRead::Tcp(r)
            } else {
                SocketRead::Prefixed(Box::new((parts.read_buf, r)))
            };
            (r, SocketWrite::Tcp(w))
        }
        Err(other) => {
            let (r, w) = tokio::io::split(TokioIo::new(other));
            (SocketRead::Other(r), SocketWrite::Other(w))
        }
    }
}

/// Sets what a socket needs before it is dropped, on its TCP stream.
pub(crate) fn before_close(
    rd: SocketRead,
    wr: SocketWrite,
    set: impl FnOnce(&TcpStream) -> io::Result<()>,
) -> io::Result<()> {
    match wr {
        SocketWrite::Tcp(w) => {
            let r = set(w.as_ref());
            // Dropping the owned write half would shut the write side
            // down (a FIN) before the close: the socket closes as a whole
            // once the read half goes, as a split one did.
            w.forget();
            drop(rd);
            r
        }
        SocketWrite::Other(w) => {
            let SocketRead::Other(r) = rd else {
                return Err(io::ErrorKind::Unsupported.into());
            };
            let io = r.unsplit(w).into_inner();
            match io.downcast::<TokioIo<tokio_rustls::server::TlsStream<TcpStream>>>() {
                Ok(tls) => set(tls.io.inner().get_ref().0),
                Err(_) => Err(io::ErrorKind::Unsupported.into()),
            }
        }
    }
}

impl AsyncRead for SocketRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SocketRead::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            SocketRead::Prefixed(p) => {
                let (prefix, r) = &mut **p;
                if prefix.is_empty() {
                    return Pin::new(r).poll_read(cx, buf);
                }
                let n = prefix.len().min(buf.remaining());
                buf.put_slice(&prefix[..n]);
                prefix.advance(n);
                Poll::Ready(Ok(()))
            }
            SocketRead::Other(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for SocketWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SocketWrite::Tcp(w) => Pin::new(w).poll_write(cx, buf),
            SocketWrite::Other(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SocketWrite::Tcp(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            SocketWrite::Other(w) => Pin::new(w).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            SocketWrite::Tcp(w) => w.is_write_vectored(),
            SocketWrite::Other(w) => w.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SocketWrite::Tcp(w) => Pin::new(w).poll_flush(cx),
            SocketWrite::Other(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SocketWrite::Tcp(w) => Pin::new(w).poll_shutdown(cx),
            SocketWrite::Other(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}
