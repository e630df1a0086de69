//! One Redis connection for every deployment mode, chosen by URL, so the
//! History, Members and Presence backends run unchanged on a single Redis,
//! a Redis Cluster or a Sentinel-managed primary:
//!
//! - `redis://[user:pass@]host:port[/db]` and `redis+unix:///path`: one
//!   server (a [`ConnectionManager`] that reconnects by itself).
//! - `redis+cluster://[user:pass@]h1:p1,h2:p2,...`: a Redis Cluster; the
//!   listed nodes are only seeds, the client learns the slot map and
//!   follows MOVED/ASK itself. Every script and transaction must stay in
//!   one hash slot; a plain pipeline is split into single commands.
//! - `redis+sentinel://[user:pass@]s1:p1,s2:p2,.../MASTER[/db]`: asks the
//!   sentinels for the current primary of `MASTER`, and asks again after
//!   a connection error or a `READONLY` answer (a failover happened).
//!   The credentials are the data nodes'; sentinels are asked without.
use std::{sync::Arc, time::Duration};

use redis::{
    Cmd, ConnectionAddr, Pipeline, RedisError, RedisFuture, Value,
    aio::{ConnectionLike, ConnectionManager, MultiplexedConnection},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
    sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType},
};

/// Connect and per-command timeouts of every mode.
const TIMEOUT: Duration = Duration::from_secs(2);

/// A cheap-to-clone Redis connection in any of the three modes; clones
/// share the underlying connections.
#[derive(Clone)]
pub struct RedisConn(Mode);

#[derive(Clone)]
enum Mode {
    Single(ConnectionManager),
    Cluster(Arc<Cluster>),
    Sentinel(Arc<Sentinel>),
}

impl From<ConnectionManager> for RedisConn {
    fn from(c: ConnectionManager) -> Self {
        RedisConn(Mode::Single(c))
    }
}

impl RedisConn {
    /// Whether this is a Redis Cluster (pipelines must stay in one slot
    /// to go out as one).
    pub fn is_cluster(&self) -> bool {
        matches!(self.0, Mode::Cluster(_))
    }
}

/// Opens a connection for `url` (see the module docs for the schemes).
pub async fn connect_redis(url: &str) -> Result<RedisConn, RedisError> {
    if let Some(rest) = url.strip_prefix("redis+cluster://") {
        let (auth, hosts, _) = split_url(rest, 6379)?;
        let mut b = ClusterClient::builder(hosts.iter().map(|(h, p)| format!("redis://{h}:{p}")))
            .connection_timeout(TIMEOUT)
            .response_timeout(TIMEOUT);
        if let Some(u) = &auth.user {
            b = b.username(u);
        }
        if let Some(p) = &auth.password {
            b = b.password(p);
        }
        let client = b.build()?;
        let conn = client.get_async_connection().await?;
        return Ok(RedisConn(Mode::Cluster(Arc::new(Cluster {
            client,
            conn: std::sync::RwLock::new(conn),
            rebuilding: std::sync::atomic::AtomicBool::new(false),
            last_rebuild: std::sync::Mutex::new(None),
        }))));
    }
    if let Some(rest) = url.strip_prefix("redis+sentinel://") {
        let (auth, hosts, path) = split_url(rest, 26379)?;
        let mut parts = path.split('/').filter(|s| !s.is_empty());
        let master = parts
            .next()
            .ok_or_else(|| invalid("redis+sentinel:// needs /MASTER_NAME after the hosts"))?;
        let db: i64 = match parts.next() {
            Some(d) => d
                .parse()
                .map_err(|_| invalid("redis+sentinel:// database is not a number"))?,
            None => 0,
        };
        let mut b = SentinelClientBuilder::new(
            hosts.into_iter().map(|(h, p)| ConnectionAddr::Tcp(h, p)),
            master,
            SentinelServerType::Master,
        )?
        .set_client_to_redis_db(db);
        if let Some(u) = &auth.user {
            b = b.set_client_to_redis_username(u);
        }
        if let Some(p) = &auth.password {
            b = b.set_client_to_redis_password(p);
        }
        let s = Sentinel {
            client: tokio::sync::Mutex::new(b.build()?),
            current: std::sync::Mutex::new(None),
            db,
        };
        // Fail at startup, not at the first command, when nothing answers.
        s.connection().await?;
        return Ok(RedisConn(Mode::Sentinel(Arc::new(s))));
    }
    let client = redis::Client::open(url)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT))
        .set_number_of_retries(2);
    Ok(ConnectionManager::new_with_config(client, config)
        .await?
        .into())
}

fn invalid(msg: &'static str) -> RedisError {
    RedisError::from((redis::ErrorKind::InvalidClientConfig, msg))
}

#[derive(Default)]
struct Auth {
    user: Option<String>,
    password: Option<String>,
}

/// `(host, port)` pairs.
type Hosts = Vec<(String, u16)>;

/// Splits `[user:pass@]h1:p1,h2:p2[/path]` into credentials, hosts (with
/// `default_port` where none is given) and the path after the first `/`.
fn split_url(rest: &str, default_port: u16) -> Result<(Auth, Hosts, &str), RedisError> {
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut auth = Auth::default();
    let hosts = match authority.rsplit_once('@') {
        Some((info, hosts)) => {
            let (user, pass) = info.split_once(':').unwrap_or(("", info));
            auth.user = (!user.is_empty()).then(|| user.to_owned());
            auth.password = (!pass.is_empty()).then(|| pass.to_owned());
            hosts
        }
        None => authority,
    };
    let hosts = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| match h.rsplit_once(':') {
            Some((host, port)) => port
                .parse()
                .map(|p| (host.to_owned(), p))
                .map_err(|_| invalid("a Redis host's port is not a number")),
            None => Ok((h.to_owned(), default_port)),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if hosts.is_empty() {
        return Err(invalid("a Redis URL without hosts"));
    }
    Ok((auth, hosts, path))
}

/// The primary a sentinel named last, until it fails.
struct Sentinel {
    client: tokio::sync::Mutex<SentinelClient>,
    current: std::sync::Mutex<Option<MultiplexedConnection>>,
    db: i64,
}

impl Sentinel {
    async fn connection(&self) -> Result<MultiplexedConnection, RedisError> {
        if let Some(c) = self.lock().clone() {
            return Ok(c);
        }
        // One discovery at a time; whoever waited finds it done.
        let mut client = self.client.lock().await;
        if let Some(c) = self.lock().clone() {
            return Ok(c);
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT));
        let conn = client.get_async_connection_with_config(&config).await?;
        *self.lock() = Some(conn.clone());
        Ok(conn)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<MultiplexedConnection>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After a failover the old connection is dead, or its server came
    /// back as a replica: ask the sentinels again on the next command.
    fn check(&self, e: &RedisError) {
        let read_only = e.code() == Some("READONLY");
        if read_only
            || e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
        {
            *self.lock() = None;
        }
    }
}

/// Times a cluster transaction is sent again after a redirection.
const TRANSACTION_RETRIES: u32 = 12;

/// The cluster client follows MOVED and ASK for commands and plain
/// pipelines, but not inside MULTI/EXEC: there the EXEC comes back aborted
/// with the redirections, and the client's slot map stays stale, so after
/// a reshard or a failover every transaction on the moved slot would fail.
/// On MOVED, one single-key read of the transaction's first key takes the
/// redirection (the client then learns the new map) and the transaction
/// goes again; on ASK or TRYAGAIN (the slot is being migrated) it waits a
/// little and goes again, for about two seconds at most.
async fn cluster_transaction(
    mut c: ClusterConnection,
    pipeline: &Pipeline,
    offset: usize,
    count: usize,
) -> Result<Vec<Value>, RedisError> {
    use redis::ServerErrorKind as K;
    let mut wait = Duration::from_millis(10);
    let mut tries = 0;
    loop {
        let e = match c.req_packed_commands(pipeline, offset, count).await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let kinds: Vec<K> = e
            .clone()
            .into_server_errors()
            .map(|errs| errs.iter().filter_map(|(_, s)| s.kind()).collect())
            .unwrap_or_default();
        let moved = kinds.contains(&K::Moved);
        let migrating = kinds.iter().any(|k| matches!(k, K::Ask | K::TryAgain));
        tries += 1;
        if !(moved || migrating) || tries > TRANSACTION_RETRIES {
            return Err(e);
        }
        metrics::counter!("switchboard_redis_transaction_redirects_total").increment(1);
        if moved {
            let key = pipeline
                .cmd_iter()
                .next()
                .and_then(|cmd| cmd.args_iter().nth(1))
                .and_then(|a| match a {
                    redis::Arg::Simple(k) => Some(k.to_vec()),
                    _ => None,
                });
            if let Some(key) = key {
                let _ = c.req_packed_command(redis::cmd("EXISTS").arg(key)).await;
            }
        } else {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(250));
        }
    }
}

fn is_moved(e: &redis::ServerError) -> bool {
    matches!(e.kind(), Some(redis::ServerErrorKind::Moved))
}

/// Whether every call of a one-slot plain pipeline (the batched appends,
/// errors kept per call) was redirected, so none ran.
fn all_moved(answer: &Result<Vec<Value>, RedisError>) -> bool {
    match answer {
        Err(e) => e
            .clone()
            .into_server_errors()
            .is_some_and(|errs| !errs.is_empty() && errs.iter().all(|(_, e)| is_moved(e))),
        Ok(values) => {
            !values.is_empty()
                && values
                    .iter()
                    .all(|v| matches!(v, Value::ServerError(e) if is_moved(e)))
        }
    }
}

/// The key of a pipeline's first command (`EVALSHA sha n KEY…` or
/// `CMD KEY…`).
fn first_key(pipeline: &Pipeline) -> Option<Vec<u8>> {
    let cmd = pipeline.cmd_iter().next()?;
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .filter_map(|a| match a {
            redis::Arg::Simple(b) => Some(b),
            _ => None,
        })
        .collect();
    let name = args.first()?.to_ascii_uppercase();
    let at = if name == b"EVALSHA" || name == b"EVAL" {
        3
    } else {
        1
    };
    args.get(at).map(|k| k.to_vec())
}

/// A Redis Cluster connection that starts over from the seed nodes after
/// a connection error. The crate learns a new slot map from MOVED, but a
/// master that died answers nothing: its slots stay routed to the dead
/// address after its replica was promoted (seen under load: chats of the
/// failed master refused for the rest of the run). A fresh connection
/// asks the live nodes for the slot map.
struct Cluster {
    client: ClusterClient,
    conn: std::sync::RwLock<ClusterConnection>,
    rebuilding: std::sync::atomic::AtomicBool,
    last_rebuild: std::sync::Mutex<Option<std::time::Instant>>,
}

/// At most one rebuild of a cluster connection per this interval.
const CLUSTER_REBUILD_EVERY: Duration = Duration::from_millis(500);

impl Cluster {
    fn conn(&self) -> ClusterConnection {
        self.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// After a connection error, a fresh connection in the background (at
    /// most one at a time, one per interval); callers keep the answer
    /// they got, and their retries go to the fresh one.
    fn check(self: &Arc<Self>, e: &RedisError) {
        use std::sync::atomic::Ordering;
        let lost = e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.kind() == redis::ErrorKind::ClusterConnectionNotFound;
        if !lost {
            return;
        }
        {
            let last = self.last_rebuild.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < CLUSTER_REBUILD_EVERY) {
                return;
            }
        }
        if self.rebuilding.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let fresh = tokio::time::timeout(TIMEOUT * 2, me.client.get_async_connection()).await;
            match fresh {
                Ok(Ok(c)) => {
                    *me.conn.write().unwrap_or_else(|p| p.into_inner()) = c;
                    metrics::counter!("switchboard_redis_cluster_reconnects_total").increment(1);
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "redis cluster: reconnecting failed"),
                Err(_) => tracing::warn!("redis cluster: reconnecting timed out"),
            }
            *me.last_rebuild.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(std::time::Instant::now());
            me.rebuilding.store(false, Ordering::Release);
        });
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.0 {
            Mode::Single(c) => c.req_packed_command(cmd),
            Mode::Cluster(cl) => {
                let cl = cl.clone();
                Box::pin(async move {
                    cl.conn()
                        .req_packed_command(cmd)
                        .await
                        .inspect_err(|e| cl.check(e))
                })
            }
            Mode::Sentinel(s) => Box::pin(async move {
                let mut conn = s.connection().await.inspect_err(|e| s.check(e))?;
                conn.req_packed_command(cmd)
                    .await
                    .inspect_err(|e| s.check(e))
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.0 {
            Mode::Single(c) => c.req_packed_commands(pipeline, offset, count),
            // A cluster refuses a pipeline that spans slots (presence and
            // members batch many users; the client refuses it before
            // sending): its commands then go one by one, concurrently, each
            // to its slot's node. No caller needs an order between
            // different keys. One-slot pipelines and transactions go whole.
            Mode::Cluster(cl) if pipeline.is_transaction() => {
                let cl = cl.clone();
                Box::pin(async move {
                    cluster_transaction(cl.conn(), pipeline, offset, count)
                        .await
                        .inspect_err(|e| cl.check(e))
                })
            }
            Mode::Cluster(cl) => {
                let cl = cl.clone();
                let c = cl.conn();
                Box::pin(async move {
                    let mut whole = c.clone();
                    let mut answer = whole.req_packed_commands(pipeline, offset, count).await;
                    if all_moved(&answer) {
                        // The slot moved (a failover): every call came back
                        // MOVED, so none ran. One read of the pipeline's key
                        // teaches the client the new master; send it again.
                        if let Some(key) = first_key(pipeline) {
                            let _ = c
                                .clone()
                                .req_packed_command(redis::cmd("EXISTS").arg(key))
                                .await;
                            answer = whole.req_packed_commands(pipeline, offset, count).await;
                        }
                    }
                    match answer {
                        Err(e)
                            if !pipeline.is_transaction()
                                && e.kind()
                                    == redis::ErrorKind::Server(
                                        redis::ServerErrorKind::CrossSlot,
                                    ) =>
                        {
                            let sends = pipeline.cmd_iter().skip(offset).take(count).map(|cmd| {
                                let mut c = c.clone();
                                async move { c.req_packed_command(cmd).await }
                            });
                            futures_util::future::try_join_all(sends).await
                        }
                        other => other,
                    }
                    .inspect_err(|e| cl.check(e))
                })
            }
            Mode::Sentinel(s) => Box::pin(async move {
                let mut conn = s.connection().await.inspect_err(|e| s.check(e))?;
                conn.req_packed_commands(pipeline, offset, count)
                    .await
                    .inspect_err(|e| s.check(e))
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Mode::Single(c) => c.get_db(),
            Mode::Cluster(_) => 0,
            Mode::Sentinel(s) => s.db,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split_url;

    #[test]
    fn urls_split_into_credentials_hosts_and_path() {
        let (a, h, p) = split_url(":pw@h1:7000,h2/sbmaster/2", 26379).unwrap();
        assert_eq!((a.user, a.password.as_deref()), (None, Some("pw")));
        assert_eq!(h, [("h1".into(), 7000), ("h2".into(), 26379)]);
        assert_eq!(p, "sbmaster/2");
        let (a, h, p) = split_url("u:p@a:1", 6379).unwrap();
        assert_eq!(
            (a.user.as_deref(), a.password.as_deref()),
            (Some("u"), Some("p"))
        );
        assert_eq!((h.len(), p), (1, ""));
        assert!(split_url("", 6379).is_err());
        assert!(split_url("h:x", 6379).is_err());
    }
}
