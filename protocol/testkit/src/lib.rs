//! Dev-only test harness: real `nats-server` and `redis-server` processes
//! on ephemeral ports, each in its own temp dir, killed on drop. A test can
//! stop and restart a server to inject faults; when a server fails to
//! start, its log is in the panic message.
//!
//! [`RedisCluster`] starts a real Redis Cluster (three masters, three
//! replicas) and [`RedisSentinel`] a primary, a replica and three sentinels,
//! so the state tier's contracts run against every deployment mode.
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
    /// A `--cluster-enabled` node (its `nodes.conf` stays in its dir, so a
    /// restart rejoins the cluster).
    ClusterNode,
    /// A replica of the primary on this port.
    Replica(u16),
    /// A sentinel monitoring the primary on this port as [`SENTINEL_MASTER`].
    Sentinel(u16),
}

/// The master name the sentinels of [`RedisSentinel`] monitor.
pub const SENTINEL_MASTER: &str = "sbmaster";

const REDIS_ARGS: [&str; 8] = [
    "--bind",
    "127.0.0.1",
    "--save",
    "",
    "--appendonly",
    "no",
    "--loglevel",
    "notice",
];

/// Runs `redis-cli -p PORT ARGS...` and returns its output.
fn cli(port: u16, args: &[&str]) -> Result<String, String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run redis-cli: {e}"))?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Polls `check` until it holds or `secs` pass.
fn wait_until(secs: u64, what: &str, mut check: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if check() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{what} not reached after {secs} s"))
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
            Kind::Redis | Kind::ClusterNode | Kind::Replica(_) => {
                let mut c = Command::new("redis-server");
                c.args(["--port", &port])
                    .args(REDIS_ARGS)
                    .arg("--dir")
                    .arg(self.dir.path())
                    .arg("--logfile")
                    .arg(&log);
                match self.kind {
                    Kind::ClusterNode => {
                        c.args([
                            "--cluster-enabled",
                            "yes",
                            "--cluster-config-file",
                            "nodes.conf",
                            "--cluster-node-timeout",
                            "2000",
                        ]);
                    }
                    Kind::Replica(primary) => {
                        c.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
                    }
                    _ => {}
                }
                c
            }
            Kind::Sentinel(primary) => {
                // Sentinels rewrite their config: one writable file each,
                // kept across restarts once written.
                let conf = self.dir.path().join("sentinel.conf");
                if !conf.exists() {
                    let text = format!(
                        "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {log}\n\
                         sentinel monitor {m} 127.0.0.1 {primary} 2\n\
                         sentinel down-after-milliseconds {m} 1000\n\
                         sentinel failover-timeout {m} 3000\n\
                         sentinel parallel-syncs {m} 1\n",
                        dir = self.dir.path().display(),
                        log = log.display(),
                        m = SENTINEL_MASTER,
                    );
                    std::fs::write(&conf, text).map_err(|e| format!("sentinel.conf: {e}"))?;
                }
                let mut c = Command::new("redis-server");
                c.arg(&conf).arg("--sentinel");
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
            _ => format!("redis://127.0.0.1:{}", self.port),
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

/// How many lines of `CLUSTER NODES` carry `flag`.
fn count_flag(nodes: &str, flag: &str) -> usize {
    nodes
        .lines()
        .filter(|l| {
            l.split(' ')
                .nth(2)
                .is_some_and(|f| f.split(',').any(|x| x == flag))
        })
        .count()
}

/// A Redis Cluster of three masters with one replica each, every node a
/// real `redis-server` on a free port, killed on drop.
pub struct RedisCluster {
    nodes: Vec<Server>,
}

impl RedisCluster {
    /// Starts six nodes, creates the cluster and waits until every node
    /// reports `cluster_state:ok`.
    pub fn start() -> RedisCluster {
        let nodes: Vec<Server> = (0..6).map(|_| Server::start(Kind::ClusterNode)).collect();
        let cluster = RedisCluster { nodes };
        if let Err(e) = cluster.create() {
            panic!("redis cluster did not form: {e}\n{}", cluster.logs());
        }
        cluster
    }

    fn create(&self) -> Result<(), String> {
        let addrs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"]);
        cli(self.nodes[0].port, &args)?;
        self.wait_ok()
    }

    /// Waits until every running node says `cluster_state:ok`, knows all
    /// six nodes and sees three of them as replicas.
    pub fn wait_ok(&self) -> Result<(), String> {
        wait_until(30, "cluster_state:ok on every node", || {
            self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                cli(n.port, &["cluster", "info"]).is_ok_and(|i| {
                    i.contains("cluster_state:ok") && i.contains("cluster_known_nodes:6")
                }) && cli(n.port, &["cluster", "nodes"]).is_ok_and(|t| count_flag(&t, "slave") == 3)
            })
        })
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,...` (every node).
    pub fn url(&self) -> String {
        let addrs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", addrs.join(","))
    }

    /// The nodes (their roles change after a failover; ask them).
    pub fn nodes(&mut self) -> &mut [Server] {
        &mut self.nodes
    }

    /// Every node's log, for a failure message.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- node {} ---\n{}", n.port, n.log()))
            .collect()
    }
}

/// One primary, one replica and three sentinels (quorum 2, a primary is
/// declared down after one second), killed on drop.
pub struct RedisSentinel {
    primary: Server,
    replica: Server,
    sentinels: Vec<Server>,
}

impl RedisSentinel {
    /// Starts the servers and waits until every sentinel knows the primary
    /// and its replica, and the replica is in sync.
    pub fn start() -> RedisSentinel {
        let primary = Server::start(Kind::Redis);
        let replica = Server::start(Kind::Replica(primary.port));
        let sentinels = (0..3)
            .map(|_| Server::start(Kind::Sentinel(primary.port)))
            .collect();
        let setup = RedisSentinel {
            primary,
            replica,
            sentinels,
        };
        if let Err(e) = setup.wait_ready() {
            panic!("sentinel setup not ready: {e}\n{}", setup.logs());
        }
        setup
    }

    fn wait_ready(&self) -> Result<(), String> {
        wait_until(30, "replica in sync", || {
            cli(self.replica.port, &["info", "replication"])
                .is_ok_and(|i| i.contains("master_link_status:up"))
        })?;
        wait_until(30, "sentinels see the replica and each other", || {
            self.sentinels.iter().all(|s| {
                cli(s.port, &["sentinel", "master", SENTINEL_MASTER]).is_ok_and(|m| {
                    let field = |name: &str| {
                        let mut lines = m.lines();
                        while let Some(l) = lines.next() {
                            if l == name {
                                return lines.next().unwrap_or("").to_owned();
                            }
                        }
                        String::new()
                    };
                    field("num-slaves") == "1" && field("num-other-sentinels") == "2"
                })
            })
        })
    }

    /// `redis+sentinel://127.0.0.1:S1,127.0.0.1:S2,127.0.0.1:S3/sbmaster`.
    pub fn url(&self) -> String {
        let addrs: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+sentinel://{}/{SENTINEL_MASTER}", addrs.join(","))
    }

    /// The server that was primary at start.
    pub fn primary(&mut self) -> &mut Server {
        &mut self.primary
    }

    /// The server that was replica at start.
    pub fn replica(&mut self) -> &mut Server {
        &mut self.replica
    }

    /// The port of the primary the sentinels name now.
    pub fn current_primary_port(&self) -> Option<u16> {
        let out = cli(
            self.sentinels[0].port,
            &["sentinel", "get-master-addr-by-name", SENTINEL_MASTER],
        )
        .ok()?;
        out.lines().nth(1)?.trim().parse().ok()
    }

    /// Every server's log, for a failure message.
    pub fn logs(&self) -> String {
        std::iter::once(&self.primary)
            .chain(std::iter::once(&self.replica))
            .chain(&self.sentinels)
            .map(|n| format!("--- {:?} {} ---\n{}", n.kind, n.port, n.log()))
            .collect()
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

    #[test]
    fn a_redis_cluster_forms() {
        let c = RedisCluster::start();
        assert!(c.url().starts_with("redis+cluster://127.0.0.1:"));
        let nodes = cli(c.nodes[0].port, &["cluster", "nodes"]).unwrap();
        assert_eq!(count_flag(&nodes, "master"), 3);
    }

    #[test]
    fn a_sentinel_setup_fails_over() {
        let mut s = RedisSentinel::start();
        let first = s.primary().port();
        assert_eq!(s.current_primary_port(), Some(first));
        s.primary().kill();
        let replica = s.replica().port();
        wait_until(30, "failover", || s.current_primary_port() == Some(replica))
            .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    }
}
