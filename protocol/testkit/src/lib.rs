//! Dev-only test harness: real `nats-server` and `redis-server` processes
//! on ephemeral ports, each in its own temp dir, killed on drop. A test can
//! stop and restart a server to inject faults; when a server fails to
//! start, its log is in the panic message.
//!
//! Depends on nothing of ours, so any crate can dev-depend on it.
#![warn(missing_docs)]

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A port nobody listens on right now (the OS picks it; a tiny race with
/// other processes remains, and `start` retries on a clash).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

fn wait_for_port(port: u16, child: &mut Child, log: &PathBuf) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "exited with {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!(
        "not listening after 10 s: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    ))
}

/// Which server.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Nats,
    Redis,
}

/// A running server process.
pub struct Server {
    kind: Kind,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Server {
    /// Starts `nats-server` with JetStream on a free port.
    pub fn nats() -> Server {
        Server::start(Kind::Nats)
    }

    /// Starts `redis-server` (no persistence) on a free port.
    pub fn redis() -> Server {
        Server::start(Kind::Redis)
    }

    fn start(kind: Kind) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = Server {
            kind,
            port: 0,
            dir,
            child: None,
        };
        let mut last_err = String::new();
        for _ in 0..5 {
            server.port = free_port();
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last_err = e,
            }
        }
        panic!("{kind:?} server did not start: {last_err}");
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = self.log_path();
        let port = self.port.to_string();
        let mut cmd = match self.kind {
            Kind::Nats => {
                let mut c = Command::new("nats-server");
                let store = self.dir.path().join("js");
                c.args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd"])
                    .arg(&store)
                    .arg("-l")
                    .arg(&log);
                c
            }
            Kind::Redis => {
                let mut c = Command::new("redis-server");
                c.args([
                    "--port",
                    &port,
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                ])
                .arg(self.dir.path())
                .arg("--logfile")
                .arg(&log);
                c
            }
        };
        // Output goes to the log file: a pipe nobody reads would block or
        // kill the server.
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run {:?} (install it, or run scripts/test): {e}",
                    self.kind
                )
            })?;
        match wait_for_port(self.port, &mut child, &log) {
            Ok(()) => {
                self.child = Some(child);
                Ok(())
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// `nats://127.0.0.1:PORT` or `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        match self.kind {
            Kind::Nats => format!("nats://127.0.0.1:{}", self.port),
            Kind::Redis => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (SIGKILL), keeping its port for `restart`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the server (SIGSTOP): its socket stays open but nothing is
    /// answered, as with an overloaded or hung server. Undo with `resume`.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let Some(c) = &self.child else { return };
        let ok = std::process::Command::new("kill")
            .args([sig, &c.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {} failed", c.id());
    }

    /// Starts the server again on the same port (after `kill`).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                // The old socket may linger for a moment.
                Err(e) if Instant::now() > deadline => {
                    panic!("{:?} restart failed: {e}", self.kind)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- {:?} log ({}) ---\n{}",
                self.kind,
                self.url(),
                self.log()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_start_restart_and_stop() {
        for mut s in [Server::nats(), Server::redis()] {
            let addr = SocketAddr::from(([127, 0, 0, 1], s.port()));
            assert!(TcpStream::connect(addr).is_ok());
            s.kill();
            assert!(TcpStream::connect(addr).is_err());
            s.restart();
            assert!(TcpStream::connect(addr).is_ok());
        }
    }
}
