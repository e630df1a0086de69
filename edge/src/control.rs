//! The control runtime: a thread of its own for the HTTP requests that are
//! not sockets (the backend API, the admin API and the probes: `/api/*`,
//! `/admin/*`, `/metrics`, `/healthz`, `/readyz`).
//!
//! A publish is acked before its fan-out (ADR 0027), but on the runtime
//! that runs the sockets a request still waits for its turn behind every
//! runnable socket task, and a fan-out backlog makes thousands of them
//! runnable at once: the ack would wait for the fan-out after all, just
//! further down the queue. On a thread of its own the request gets a turn
//! from the OS scheduler within its slice, whatever the sockets' backlog;
//! so do the probes and the scrape, which must answer under load. The
//! listener routes a plain connection here by peeking at its first
//! request line; TLS connections, and anything else, stay on the main
//! runtime.
use std::thread::JoinHandle;

use tokio::{runtime::Handle, sync::oneshot};

/// Request lines served on the control runtime.
pub(crate) const CONTROL_REQUESTS: [&[u8]; 6] = [
    b"POST /api/",
    b"GET /admin/",
    b"POST /admin/",
    b"GET /metrics",
    b"GET /healthz",
    b"GET /readyz",
];

/// The control runtime's thread; stopped (and its requests dropped) when
/// this is dropped.
pub(crate) struct Control {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Control {
    pub(crate) fn start() -> std::io::Result<Control> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("sb-control".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(Control {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub(crate) fn handle(&self) -> Handle {
        self.handle.clone()
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // The thread only drops its runtime now: not worth blocking for.
        drop(self.thread.take());
    }
}

/// Whether a connection's first bytes are a request the control runtime
/// serves. A request line split before the prefix is complete is not
/// recognised: it is served on the main runtime, as before.
pub(crate) fn is_control_request(first: &[u8]) -> bool {
    CONTROL_REQUESTS.iter().any(|p| first.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_and_probes_go_to_the_control_runtime_and_sockets_do_not() {
        for line in [
            &b"POST /api/publish HTTP/1.1"[..],
            b"POST /api/kick HTTP/1.1",
            b"GET /admin/edges HTTP/1.1",
            b"POST /admin/kick HTTP/1.1",
            b"GET /metrics HTTP/1.1",
            b"GET /healthz HTTP/1.1",
            b"GET /readyz HTTP/1.1",
        ] {
            assert!(
                is_control_request(line),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        for line in [
            &b"GET /ws HTTP/1.1"[..],
            b"GET / HTTP/1.1",
            b"GET /dev/token?user=a HTTP/1.1",
            b"POST /ap",
            b"",
        ] {
            assert!(
                !is_control_request(line),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }
}
