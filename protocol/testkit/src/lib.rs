//! Dev-only test harness: real `nats-server` and `redis-server` processes
//! on ephemeral ports, each in its own temp dir, killed on drop. A test can
//! stop and restart a server to inject faults; when a server fails to
//! start, its log is in the panic message.
//!
//! [`RedisCluster`] starts a real Redis Cluster (three masters, three
//! replicas) and [`RedisSentinel`] a primary, a replica and three sentinels,
//! so the state tier's contracts run against every deployment mode.
//! [`NatsCluster`] starts three `nats-server`s joined by routes, with
//! clustered JetStream, so streams can be R3 and a server can be lost.
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

/// Runs `redis-cli -p PORT ARGS...` and returns its output (stdout and
/// stderr), or the same as the error when redis-cli failed.
pub fn cli(port: u16, args: &[&str]) -> Result<String, String> {
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
    /// For a node of a [`NatsCluster`]: its name, cluster (route) port and
    /// every node's route port.
    nats_peer: Option<NatsPeer>,
}

#[derive(Debug, Clone)]
struct NatsPeer {
    name: String,
    cluster_port: u16,
    /// HTTP monitoring port (`/healthz` says when JetStream is current).
    monitor_port: u16,
    routes: Vec<u16>,
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
            nats_peer: None,
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
                if let Some(peer) = &self.nats_peer {
                    let routes: Vec<String> = peer
                        .routes
                        .iter()
                        .map(|p| format!("nats://127.0.0.1:{p}"))
                        .collect();
                    c.args(["--server_name", &peer.name, "--cluster_name", "sb"])
                        .arg("-m")
                        .arg(peer.monitor_port.to_string())
                        .arg("--cluster")
                        .arg(format!("nats://127.0.0.1:{}", peer.cluster_port))
                        .arg("--routes")
                        .arg(routes.join(","));
                }
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
                            // A replica cut off from its master for a while
                            // still takes over (the failover tests stall it).
                            "--cluster-replica-validity-factor",
                            "0",
                            // A stalled replica's backlog stays in the master.
                            "--client-output-buffer-limit",
                            "replica 0 0 0",
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

/// The port of a `CLUSTER NODES` address, `ip:port@cport[,hostname]`.
fn node_port(addr: &str) -> Option<u16> {
    addr.split('@').next()?.rsplit_once(':')?.1.parse().ok()
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
    /// six nodes and sees three of them as replicas, and every running
    /// replica has finished its sync (a replica that has not cannot take
    /// over: a master killed before then leaves its slots down).
    pub fn wait_ok(&self) -> Result<(), String> {
        wait_until(
            30,
            "cluster_state:ok on every node, replicas in sync",
            || {
                self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                    cli(n.port, &["cluster", "info"]).is_ok_and(|i| {
                        i.contains("cluster_state:ok") && i.contains("cluster_known_nodes:6")
                    }) && cli(n.port, &["cluster", "nodes"])
                        .is_ok_and(|t| count_flag(&t, "slave") == 3)
                        && cli(n.port, &["info", "replication"]).is_ok_and(|i| {
                            !i.contains("role:slave") || i.contains("master_link_status:up")
                        })
                })
            },
        )
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

    /// `CLUSTER NODES` as a running node sees it.
    fn cluster_nodes(&self) -> Result<String, String> {
        let mut last = Err("no running node".to_owned());
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            last = cli(n.port, &["cluster", "nodes"]);
            if last.is_ok() {
                break;
            }
        }
        last
    }

    /// Ports of the masters that serve slots now, in slot order.
    pub fn masters(&self) -> Vec<u16> {
        let nodes = self.cluster_nodes().unwrap_or_default();
        let mut masters: Vec<(u16, u16)> = nodes
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                let flags = f.get(2)?;
                if !flags.split(',').any(|x| x == "master") || flags.contains("fail") {
                    return None;
                }
                let first: u16 = f.get(8)?.split('-').next()?.parse().ok()?;
                Some((first, node_port(f[1])?))
            })
            .collect();
        masters.sort();
        masters.into_iter().map(|(_, p)| p).collect()
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`).
    pub fn keyslot(&self, key: &str) -> u16 {
        let port = self.masters()[0];
        cli(port, &["cluster", "keyslot", key])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("cluster keyslot {key} failed"))
    }

    /// The port of the master serving `slot` now.
    pub fn master_of(&self, slot: u16) -> u16 {
        let nodes = self.cluster_nodes().unwrap_or_default();
        for l in nodes.lines() {
            let f: Vec<&str> = l.split(' ').collect();
            if f.len() < 9 || !f[2].split(',').any(|x| x == "master") {
                continue;
            }
            for range in &f[8..] {
                if range.starts_with('[') {
                    continue; // a slot being imported or migrated
                }
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(a), Ok(b)) = (a.parse::<u16>(), b.parse::<u16>())
                    && (a..=b).contains(&slot)
                    && let Some(p) = node_port(f[1])
                {
                    return p;
                }
            }
        }
        panic!("no master serves slot {slot}:\n{nodes}");
    }

    /// Moves `slot` to the master on port `to`, as `redis-cli --cluster
    /// reshard` does: IMPORTING/MIGRATING, MIGRATE its keys in batches of
    /// `batch` (clients get ASK meanwhile), then SETSLOT NODE everywhere.
    /// `between` runs after each batch, so a test can interleave work.
    pub fn migrate_slot(&self, slot: u16, to: u16, batch: usize, mut between: impl FnMut()) {
        let from = self.master_of(slot);
        assert_ne!(from, to, "slot {slot} is already on {to}");
        let id = |port: u16| {
            cli(port, &["cluster", "myid"])
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|e| panic!("cluster myid on {port}: {e}"))
        };
        let (from_id, to_id) = (id(from), id(to));
        let slot_s = slot.to_string();
        let ok = |port: u16, args: &[&str]| {
            let out = cli(port, args).unwrap_or_else(|e| panic!("{args:?} on {port}: {e}"));
            assert!(!out.contains("ERR"), "{args:?} on {port}: {out}");
        };
        ok(to, &["cluster", "setslot", &slot_s, "importing", &from_id]);
        ok(from, &["cluster", "setslot", &slot_s, "migrating", &to_id]);
        let (to_s, batch_s) = (to.to_string(), batch.max(1).to_string());
        loop {
            let keys = cli(from, &["cluster", "getkeysinslot", &slot_s, &batch_s])
                .unwrap_or_else(|e| panic!("getkeysinslot: {e}"));
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["migrate", "127.0.0.1", &to_s, "", "0", "5000", "keys"];
            args.extend(keys);
            ok(from, &args);
            between();
        }
        // The new owner first, then the old one, then everyone else.
        ok(to, &["cluster", "setslot", &slot_s, "node", &to_id]);
        ok(from, &["cluster", "setslot", &slot_s, "node", &to_id]);
        for port in self.masters() {
            if port != from && port != to {
                ok(port, &["cluster", "setslot", &slot_s, "node", &to_id]);
            }
        }
    }

    fn index_of_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port == port)
    }

    /// Index in [`RedisCluster::nodes`] of the master serving `key`'s slot
    /// and of its replica.
    pub fn master_and_replica_of(&self, key: &str) -> Result<(usize, usize), String> {
        let slot = self.keyslot(key);
        let nodes = self.cluster_nodes()?;
        let fields: Vec<Vec<&str>> = nodes
            .lines()
            .map(|l| l.split(' ').collect::<Vec<_>>())
            .filter(|f| f.len() >= 8)
            .collect();
        let master = fields
            .iter()
            .find(|f| {
                f[8..].iter().any(|r| {
                    let (a, b) = r.split_once('-').unwrap_or((r, r));
                    matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a <= slot && slot <= b)
                })
            })
            .ok_or(format!("no master serves slot {slot}"))?;
        let replica = fields
            .iter()
            .find(|f| f[3] == master[0] && !f[2].contains("fail"))
            .ok_or(format!("no replica of {}", master[1]))?;
        let index = |f: &[&str]| {
            node_port(f[1])
                .and_then(|p| self.index_of_port(p))
                .ok_or(format!("unknown node {}", f[1]))
        };
        Ok((index(master)?, index(replica)?))
    }

    /// Makes writes to the master at `master` wait in its memory instead
    /// of reaching its replica at `replica`: freezes the replica (SIGSTOP)
    /// and writes 64 MiB under `key` (a key of the master's slots), which
    /// fills the replication link's socket buffers. Every write after this
    /// one is acknowledged by the master but lost if it dies before
    /// [`Server::resume`] of the replica.
    pub fn stall_replication(&self, master: usize, replica: usize, key: &str) {
        use std::io::Write;
        self.nodes[replica].pause();
        let mut child = Command::new("redis-cli")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.nodes[master].port.to_string(),
            ])
            .args(["-x", "set", key])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("redis-cli");
        let filler = vec![b'x'; 64 << 20];
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&filler)
            .expect("write filler");
        let out = child.wait_with_output().expect("redis-cli");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.trim() == "OK", "filler not written: {text}");
    }

    /// Waits until the replica at `replica` has every write of the master
    /// at `master` so far.
    pub fn wait_replicated(&self, master: usize, replica: usize) -> Result<(), String> {
        let offset = |port: u16, field: &str| -> Option<u64> {
            let info = cli(port, &["info", "replication"]).ok()?;
            info.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
        };
        let target =
            offset(self.nodes[master].port, "master_repl_offset").ok_or("master offset unknown")?;
        wait_until(10, "replica caught up", || {
            offset(self.nodes[replica].port, "slave_repl_offset").is_some_and(|o| o >= target)
        })
    }

    /// Waits until the node at `index` is a master (its master was lost and
    /// it took over) and every running node says `cluster_state:ok`.
    pub fn wait_promoted(&self, index: usize) -> Result<(), String> {
        let port = self.nodes[index].port;
        wait_until(30, "replica promoted and cluster ok", || {
            cli(port, &["info", "replication"]).is_ok_and(|i| i.contains("role:master"))
                && self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                    cli(n.port, &["cluster", "info"]).is_ok_and(|i| i.contains("cluster_state:ok"))
                })
        })
    }

    /// Every node's log, for a failure message.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- node {} ---\n{}", n.port, n.log()))
            .collect()
    }
}

/// `GET path` on 127.0.0.1:`port` over HTTP/1.0: the body, when the
/// status is 200.
fn http_get_ok(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: t\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    (head.split(' ').nth(1) == Some("200")).then(|| body.to_owned())
}

/// Three `nats-server`s in one cluster ("sb"): routes between all of them
/// on free ports, JetStream clustered (each server its own store dir), so
/// streams may have 3 replicas and survive the loss of one server. Killed
/// on drop.
pub struct NatsCluster {
    nodes: Vec<Server>,
}

impl NatsCluster {
    /// Starts three servers and waits until every one reports JetStream
    /// current (a metadata leader elected, `/healthz` ok).
    pub fn start() -> NatsCluster {
        NatsCluster::start_n(3)
    }

    /// Starts `n` servers (3 or 5 make sense: JetStream needs a majority).
    pub fn start_n(n: usize) -> NatsCluster {
        let mut last_err = String::new();
        for _ in 0..5 {
            match NatsCluster::try_start(n) {
                Ok(c) => return c,
                Err(e) => last_err = e,
            }
        }
        panic!("nats cluster did not start: {last_err}");
    }

    fn try_start(n: usize) -> Result<NatsCluster, String> {
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for (i, cluster_port) in routes.iter().enumerate() {
            let mut s = Server {
                kind: Kind::Nats,
                port: free_port(),
                dir: tempfile::tempdir().map_err(|e| e.to_string())?,
                child: None,
                nats_peer: Some(NatsPeer {
                    name: format!("n{i}"),
                    cluster_port: *cluster_port,
                    monitor_port: free_port(),
                    routes: routes.clone(),
                }),
            };
            s.spawn()?;
            nodes.push(s);
        }
        let cluster = NatsCluster { nodes };
        cluster
            .wait_ready()
            .map_err(|e| format!("{e}\n{}", cluster.logs()))?;
        Ok(cluster)
    }

    /// Waits until every running server says JetStream is current
    /// (`/healthz` ok: it knows the metadata leader and has caught up on
    /// every stream it holds), e.g. after a [`Server::restart`].
    pub fn wait_ready(&self) -> Result<(), String> {
        wait_until(30, "every nats server healthy", || {
            self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                let port = n.nats_peer.as_ref().map(|p| p.monitor_port);
                port.and_then(|p| http_get_ok(p, "/healthz"))
                    .is_some_and(|b| b.contains("ok"))
            })
        })
    }

    /// `nats://127.0.0.1:P1,nats://127.0.0.1:P2,...`: every server, as
    /// edges and routers take it.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(Server::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The servers.
    pub fn nodes(&mut self) -> &mut [Server] {
        &mut self.nodes
    }

    /// The name of the JetStream metadata leader now, as the running
    /// servers see it (`/jsz`).
    pub fn meta_leader(&self) -> Option<String> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .filter_map(|n| http_get_ok(n.nats_peer.as_ref()?.monitor_port, "/jsz"))
            .find_map(|body| {
                let at = body.find("\"leader\"")?;
                let rest = body[at + 8..].split_once('"')?.1;
                Some(rest.split_once('"')?.0.to_owned())
            })
    }

    /// Client connections the server at `index` holds now (`/connz`);
    /// 0 when it does not answer.
    pub fn client_connections(&self, index: usize) -> usize {
        let Some(peer) = &self.nodes[index].nats_peer else {
            return 0;
        };
        http_get_ok(peer.monitor_port, "/connz")
            .and_then(|body| {
                let at = body.find("\"num_connections\"")?;
                let rest = body[at + 17..].trim_start_matches([':', ' ']);
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().ok()
            })
            .unwrap_or(0)
    }

    /// `GET path` on the monitoring port of the server at `index` (e.g.
    /// `/jsz?streams=true`): the JSON body, or `None` when it does not
    /// answer 200.
    pub fn monitor(&self, index: usize, path: &str) -> Option<String> {
        http_get_ok(self.nodes[index].nats_peer.as_ref()?.monitor_port, path)
    }

    /// Index of the server named `name` (`n0`, `n1`, ...).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.nats_peer.as_ref().is_some_and(|p| p.name == name))
    }

    /// Every server's log, for a failure message.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- nats {} ---\n{}", n.port, n.log()))
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
    fn a_nats_cluster_forms_loses_a_server_and_takes_it_back() {
        let mut c = NatsCluster::start();
        assert_eq!(c.url().split(',').count(), 3);
        let leader = c.meta_leader().expect("a metadata leader");
        let i = c.index_of(&leader).expect("the leader is one of ours");
        c.nodes()[i].kill();
        // The other two elect a new leader among themselves.
        wait_until(30, "a new leader", || {
            c.meta_leader().is_some_and(|l| l != leader)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
        c.nodes()[i].restart();
        c.wait_ready()
            .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    }

    #[test]
    fn a_redis_cluster_forms() {
        let c = RedisCluster::start();
        assert!(c.url().starts_with("redis+cluster://127.0.0.1:"));
        let nodes = cli(c.nodes[0].port, &["cluster", "nodes"]).unwrap();
        assert_eq!(count_flag(&nodes, "master"), 3);
    }

    #[test]
    fn a_cluster_slot_moves_with_its_keys() {
        let c = RedisCluster::start();
        let slot = c.keyslot("{moving}:a");
        let from = c.master_of(slot);
        for i in 0..10 {
            cli(from, &["set", &format!("{{moving}}:{i}"), "v"]).unwrap();
        }
        let to = *c.masters().iter().find(|p| **p != from).unwrap();
        let mut batches = 0;
        c.migrate_slot(slot, to, 3, || batches += 1);
        assert_eq!(batches, 4);
        assert_eq!(c.master_of(slot), to);
        assert_eq!(cli(to, &["get", "{moving}:9"]).unwrap().trim(), "v");
        assert_eq!(c.masters().len(), 3);
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
