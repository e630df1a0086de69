//! `switchboard-ctl`, the operator's command line over the admin API
//! (`admin`, ADR 0037): one node's address (a router's, in a cluster)
//! reaches the whole fleet. Human tables by default, `--json` for
//! scripts (one JSON object per line). A library, so the system tests
//! run the same code as the binary.
use std::{
    io::{IsTerminal, Write},
    process::ExitCode,
    time::Duration,
};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The command line.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "switchboard-ctl",
    version,
    about = "Operate a Switchboard cluster through its admin API"
)]
pub struct Cli {
    /// A node's HTTP listener: a router's in a cluster (any node answers
    /// for the whole fleet), the edge's standalone. Plain HTTP only.
    #[arg(
        long,
        env = "SWITCHBOARD_CTL_URL",
        default_value = "http://127.0.0.1:8090"
    )]
    pub url: String,

    /// The admin key (the nodes' --admin-key).
    #[arg(long, env = "SWITCHBOARD_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,

    /// JSON output, one object per line, instead of tables.
    #[arg(long, global = true)]
    pub json: bool,

    /// How long one request may take, ms.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// The edges in the node registry: sockets, version, draining.
    Edges,
    /// A user's presence: devices, edges, last seen.
    User {
        /// The user id.
        user: String,
    },
    /// A stream's position and its last messages' metadata (no payloads).
    Stream {
        /// A chat's stream.
        #[arg(long, required_unless_present = "user", conflicts_with = "user")]
        chat: Option<String>,
        /// A user's personal stream.
        #[arg(long)]
        user: Option<String>,
        /// How many of the last messages (1-1000).
        #[arg(long, default_value_t = 10)]
        last: u64,
    },
    /// A chat's or channel's member and online counts.
    Chat {
        /// The chat id.
        chat: String,
    },
    /// Closes a user's sockets (or one session) on every edge (4503).
    Kick {
        /// The user id.
        user: String,
        /// Only this session (`connectResult.sessionId`).
        #[arg(long)]
        session: Option<String>,
    },
    /// Drains one edge as SIGTERM would, without stopping its process.
    Drain {
        /// The edge's node id.
        edge: String,
    },
    /// A live view of sockets and deliveries per edge (their /metrics
    /// counters, as rates between refreshes).
    Top {
        /// Refresh interval, ms.
        #[arg(long, default_value_t = 2000)]
        interval_ms: u64,
        /// Stop after this many refreshes (default: until interrupted).
        #[arg(long)]
        iterations: Option<u64>,
        /// One refresh (counters only, no rates), then exit.
        #[arg(long, conflicts_with = "iterations")]
        once: bool,
    },
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The node refused the request.
    #[error("{status}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The node's reason.
        message: String,
    },
    /// The node could not be reached or answered garbage.
    #[error("{0}")]
    Transport(String),
    /// A bad argument, refused before asking.
    #[error("{0}")]
    Usage(String),
    /// Writing the output failed.
    #[error("output: {0}")]
    Output(#[from] std::io::Error),
}

/// The binary: parses the command line, runs it; exit 1 on failure.
pub fn main() -> ExitCode {
    let cli = <Cli as clap::Parser>::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return crate::fail("switchboard-ctl", &e),
    };
    let clear = std::io::stdout().is_terminal();
    let mut out = std::io::stdout();
    match runtime.block_on(run(cli, &mut out, clear)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchboard-ctl: {e}");
            ExitCode::from(1)
        }
    }
}

/// Runs one command, writing to `out`; `clear`: `top` clears the screen
/// between refreshes (a terminal).
pub async fn run(cli: Cli, out: &mut dyn Write, clear: bool) -> Result<(), CtlError> {
    let client = Client::new(&cli)?;
    match &cli.command {
        Command::Edges => {
            let v = client.get("/admin/edges").await?;
            if cli.json {
                return line(out, &v);
            }
            edges_table(out, &v)
        }
        Command::User { user } => {
            let v = client.get(&format!("/admin/users/{}", id(user)?)).await?;
            if cli.json {
                return line(out, &v);
            }
            let edges: Vec<&str> = list(&v["edges"])
                .iter()
                .filter_map(|e| e.as_str())
                .collect();
            let last_seen = match v["last_seen_ms"].as_i64().unwrap_or(0) {
                0 => "never offline".to_owned(),
                ms => format!("{ms} (unix ms)"),
            };
            writeln!(out, "user       {}", text(&v["user"]))?;
            writeln!(out, "online     {}", v["online"])?;
            writeln!(out, "devices    {}", v["devices"])?;
            writeln!(out, "edges      {}", edges.join(", "))?;
            writeln!(out, "last seen  {last_seen}")?;
            Ok(())
        }
        Command::Stream { chat, user, last } => {
            let path = match (chat, user) {
                (Some(c), _) => format!("/admin/streams/chat/{}?last={last}", id(c)?),
                (None, Some(u)) => format!("/admin/streams/user/{}?last={last}", id(u)?),
                (None, None) => unreachable!("clap requires --chat or --user"),
            };
            let v = client.get(&path).await?;
            if cli.json {
                return line(out, &v);
            }
            writeln!(
                out,
                "stream {}  seq {}  epoch {}",
                text(&v["stream"]),
                v["seq"],
                text(&v["epoch"])
            )?;
            let rows = list(&v["messages"])
                .iter()
                .map(|m| {
                    vec![
                        m["seq"].to_string(),
                        text(&m["sender"]),
                        m["timestamp_ms"].to_string(),
                        text(&m["client_msg_id"]),
                        m["payload_bytes"].to_string(),
                    ]
                })
                .collect();
            table(
                out,
                &["SEQ", "SENDER", "TIMESTAMP_MS", "CLIENT_MSG_ID", "BYTES"],
                rows,
            )
        }
        Command::Chat { chat } => {
            let v = client.get(&format!("/admin/chats/{}", id(chat)?)).await?;
            if cli.json {
                return line(out, &v);
            }
            let online = match v["online"].as_u64() {
                Some(n) => n.to_string(),
                None => "n/a (ask a router)".into(),
            };
            writeln!(out, "chat     {}", text(&v["chat"]))?;
            writeln!(out, "members  {}", v["members"])?;
            writeln!(out, "online   {online}")?;
            Ok(())
        }
        Command::Kick { user, session } => {
            let body = json!({"user": user, "session": session});
            let v = client.post("/admin/kick", &body).await?;
            if cli.json {
                return line(out, &v);
            }
            let which = match session {
                Some(s) => format!("session {s} of user {user}"),
                None => format!("user {user}"),
            };
            writeln!(out, "kicked {which}: {} edges told", v["edges"])?;
            Ok(())
        }
        Command::Drain { edge } => {
            let v = client
                .post(&format!("/admin/edges/{}/drain", id(edge)?), &json!({}))
                .await?;
            if cli.json {
                return line(out, &v);
            }
            writeln!(
                out,
                "edge {} draining: {} sockets being closed in batches",
                text(&v["node"]),
                v["sockets"]
            )?;
            Ok(())
        }
        Command::Top {
            interval_ms,
            iterations,
            once,
        } => {
            let iterations = if *once { Some(1) } else { *iterations };
            top(&client, out, cli.json, clear, *interval_ms, iterations).await
        }
    }
}

/// `text` if it is a valid id (user, chat and node ids share the rules),
/// so it can go into a path as it is.
fn id(text: &str) -> Result<&str, CtlError> {
    switchboard_protocol::UserId::parse(text)
        .map(|_| text)
        .map_err(|e| CtlError::Usage(format!("{text:?}: {e}")))
}

/// Refreshes the per-edge view every `interval_ms`, `iterations` times
/// (or until interrupted): counters, and rates from the previous refresh.
async fn top(
    client: &Client,
    out: &mut dyn Write,
    json_out: bool,
    clear: bool,
    interval_ms: u64,
    iterations: Option<u64>,
) -> Result<(), CtlError> {
    let interval = Duration::from_millis(interval_ms.max(100));
    let mut previous: Option<(tokio::time::Instant, Value)> = None;
    let mut n = 0;
    loop {
        let v = client.get("/admin/edges").await?;
        let at = tokio::time::Instant::now();
        let rate = |node: &Value, field: &str| -> Option<f64> {
            let (then, before) = previous.as_ref()?;
            let old =
                list(&before["edges"]).iter().find(|e| e["node"] == *node)?[field].as_u64()?;
            let secs = at.duration_since(*then).as_secs_f64();
            Some(v_u64(node, field, &v).saturating_sub(old) as f64 / secs.max(1e-3))
        };
        let edges: Vec<Value> = list(&v["edges"])
            .iter()
            .map(|e| {
                json!({
                    "node": e["node"],
                    "reachable": e["reachable"],
                    "draining": e["draining"],
                    "sockets": e["sockets"],
                    "deliveries_total": e["deliveries_total"],
                    "sent_frames_total": e["sent_frames_total"],
                    "deliveries_per_sec": rate(&e["node"], "deliveries_total"),
                    "sent_frames_per_sec": rate(&e["node"], "sent_frames_total"),
                })
            })
            .collect();
        if json_out {
            line(
                out,
                &json!({"at_ms": switchboard_protocol::now_ms(), "edges": edges}),
            )?;
        } else {
            if clear {
                write!(out, "\x1b[2J\x1b[H")?;
            }
            let sockets: u64 = edges.iter().filter_map(|e| e["sockets"].as_u64()).sum();
            writeln!(
                out,
                "switchboard top: {} edges, {sockets} sockets (every {} ms)",
                edges.len(),
                interval.as_millis()
            )?;
            let per_sec = |v: &Value| v.as_f64().map_or("-".into(), |r| format!("{r:.1}"));
            let rows = edges
                .iter()
                .map(|e| {
                    vec![
                        text(&e["node"]),
                        e["sockets"].as_u64().map_or("?".into(), |n| n.to_string()),
                        per_sec(&e["deliveries_per_sec"]),
                        per_sec(&e["sent_frames_per_sec"]),
                        e["deliveries_total"]
                            .as_u64()
                            .map_or("?".into(), |n| n.to_string()),
                        state(e),
                    ]
                })
                .collect();
            table(
                out,
                &[
                    "EDGE",
                    "SOCKETS",
                    "DELIVERIES/S",
                    "FRAMES/S",
                    "DELIVERIES",
                    "STATE",
                ],
                rows,
            )?;
        }
        out.flush()?;
        n += 1;
        if iterations.is_some_and(|max| n >= max) {
            return Ok(());
        }
        previous = Some((at, v));
        tokio::time::sleep(interval).await;
    }
}

fn v_u64(node: &Value, field: &str, v: &Value) -> u64 {
    list(&v["edges"])
        .iter()
        .find(|e| e["node"] == *node)
        .and_then(|e| e[field].as_u64())
        .unwrap_or(0)
}

/// An edge's state in a table: serving, draining or unreachable.
fn state(e: &Value) -> String {
    if e["reachable"] == json!(false) {
        "unreachable".into()
    } else if e["draining"] == json!(true) {
        "draining".into()
    } else {
        "serving".into()
    }
}

fn edges_table(out: &mut dyn Write, v: &Value) -> Result<(), CtlError> {
    let rows = list(&v["edges"])
        .iter()
        .map(|e| {
            let n = |f: &str| e[f].as_u64().map_or("?".into(), |n| n.to_string());
            vec![
                text(&e["node"]),
                text(&e["addr"]),
                text(&e["version"]),
                n("sockets"),
                match e["draining"].as_bool() {
                    Some(true) => "yes".into(),
                    Some(false) => "no".into(),
                    None => "?".into(),
                },
                n("deliveries_total"),
                state(e),
            ]
        })
        .collect();
    table(
        out,
        &[
            "EDGE",
            "ADDR",
            "VERSION",
            "SOCKETS",
            "DRAINING",
            "DELIVERIES",
            "STATE",
        ],
        rows,
    )
}

/// The array `v`, or none.
fn list(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// A string value as text ("-" when absent or empty).
fn text(v: &Value) -> String {
    match v {
        Value::String(s) if !s.is_empty() => s.clone(),
        Value::String(_) | Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// One JSON object on a line.
fn line(out: &mut dyn Write, v: &Value) -> Result<(), CtlError> {
    writeln!(out, "{v}")?;
    Ok(())
}

/// Columns padded to their widest cell.
fn table(out: &mut dyn Write, headers: &[&str], rows: Vec<Vec<String>>) -> Result<(), CtlError> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let print = |out: &mut dyn Write, cells: &[&str]| -> std::io::Result<()> {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        writeln!(out, "{}", s.trim_end())
    };
    print(out, headers)?;
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        print(out, &cells)?;
    }
    Ok(())
}

/// A minimal HTTP/1.1 client for the admin API: one request per
/// connection, the admin key as a bearer token.
struct Client {
    /// `host:port`.
    authority: String,
    key: String,
    timeout: Duration,
}

impl Client {
    fn new(cli: &Cli) -> Result<Client, CtlError> {
        let rest = cli.url.strip_prefix("http://").ok_or_else(|| {
            CtlError::Transport(format!(
                "--url {:?}: give http://host:port (plain HTTP)",
                cli.url
            ))
        })?;
        let authority = rest.trim_end_matches('/').to_owned();
        if authority.is_empty() || authority.contains('/') {
            return Err(CtlError::Transport(format!(
                "--url {:?}: give http://host:port",
                cli.url
            )));
        }
        let authority = if authority.contains(':') {
            authority
        } else {
            format!("{authority}:80")
        };
        Ok(Client {
            authority,
            key: cli.admin_key.clone().unwrap_or_default(),
            timeout: Duration::from_millis(cli.timeout_ms.max(1)),
        })
    }

    async fn get(&self, path: &str) -> Result<Value, CtlError> {
        self.request("GET", path, None).await
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value, CtlError> {
        self.request("POST", path, Some(body.to_string())).await
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<Value, CtlError> {
        let exchange = async {
            let mut s = tokio::net::TcpStream::connect(&self.authority).await?;
            let body = body.unwrap_or_default();
            let head = format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                self.authority,
                self.key,
                body.len()
            );
            s.write_all(head.as_bytes()).await?;
            s.write_all(body.as_bytes()).await?;
            let mut answer = Vec::new();
            s.read_to_end(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        let answer = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| {
                CtlError::Transport(format!(
                    "{}: no answer within {} ms",
                    self.authority,
                    self.timeout.as_millis()
                ))
            })?
            .map_err(|e| CtlError::Transport(format!("{}: {e}", self.authority)))?;
        parse_answer(&answer)
    }
}

/// Status and JSON body of an HTTP/1.1 answer with a `Content-Length`
/// body (as the nodes answer); a refusal's `{"error": {"message"}}` as
/// [`CtlError::Refused`].
fn parse_answer(answer: &[u8]) -> Result<Value, CtlError> {
    let bad = |why: &str| CtlError::Transport(format!("bad answer: {why}"));
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let head = std::str::from_utf8(&answer[..split]).map_err(|_| bad("header not UTF-8"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let body = &answer[split + 4..];
    let value: Option<Value> = serde_json::from_slice(body).ok();
    if status == 200 {
        return value.ok_or_else(|| bad("body not JSON"));
    }
    let message = value
        .as_ref()
        .and_then(|v| v["error"]["message"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
    Err(CtlError::Refused { status, message })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_and_refusals_carry_the_reason() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\n{\"a\":1}\n";
        assert_eq!(parse_answer(ok).unwrap(), json!({"a": 1}));
        let refused = b"HTTP/1.1 401 Unauthorized\r\n\r\n{\"error\":{\"code\":401,\"message\":\"missing or wrong API key\"}}";
        match parse_answer(refused) {
            Err(CtlError::Refused { status, message }) => {
                assert_eq!(status, 401);
                assert_eq!(message, "missing or wrong API key");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_answer(b"garbage"),
            Err(CtlError::Transport(_))
        ));
    }

    #[test]
    fn ids_are_checked_before_they_go_into_a_path() {
        assert_eq!(id("alice").unwrap(), "alice");
        for bad in ["a b", "a/b", "", "a.b"] {
            assert!(matches!(id(bad), Err(CtlError::Usage(_))), "{bad:?}");
        }
    }

    #[test]
    fn tables_pad_columns() {
        let mut out = Vec::new();
        table(
            &mut out,
            &["A", "BB"],
            vec![vec!["long".into(), "x".into()]],
        )
        .unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "A     BB\nlong  x\n");
    }
}
