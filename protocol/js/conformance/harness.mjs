// The conformance suite's side of the server: real edge and router
// processes (the binaries cargo built for the system tests), nats-server
// and redis-server on free ports, HS256 tokens, the backend API, and a
// WebSocket proxy that injects faults the edge does not produce on demand
// (duplicate deliveries, a dropped connection, a 503 storm).
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer, request } from "node:http";
import { request as tlsRequest } from "node:https";
import { connect as tcpConnect, createServer as tcpServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import WebSocket, { WebSocketServer } from "ws";

export const SECRET = "conformance-secret";
/** The system tests' test CA and its localhost certificate (edge/system/tests/fixtures). */
const FIXTURES = join(dirname(fileURLToPath(import.meta.url)), "../../../edge/system/tests/fixtures");
export const TEST_CA_FILE = join(FIXTURES, "tls_ca_a.pem");
export const API_KEY = "conformance-key";

const b64url = (b) => Buffer.from(b).toString("base64url");

/** An HS256 token for `user`, valid `ttlSecs` (default one hour). */
export function mint(user, ttlSecs = 3600) {
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify({ sub: user, exp: Math.floor(Date.now() / 1000) + ttlSecs }));
  const sig = createHmac("sha256", SECRET).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A port nobody listens on right now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = tcpServer();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

async function waitListening(port, what, ms = 20_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const ok = await new Promise((r) => {
      const c = tcpConnect(port, "127.0.0.1");
      c.on("connect", () => { c.destroy(); r(true); });
      c.on("error", () => r(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`${what} did not listen on ${port}`);
    await sleep(30);
  }
}

/** Every process the run started, killed at exit whatever happens. */
const children = new Set();
process.on("exit", () => { for (const c of children) try { c.kill("SIGKILL"); } catch { /* gone */ } });

class Proc {
  constructor(name, cmd, args, env) {
    this.name = name;
    this.cmd = cmd;
    this.args = args;
    this.env = env;
    this.log = "";
    this.start();
  }

  start() {
    const child = spawn(this.cmd, this.args, { env: { ...process.env, ...this.env }, stdio: ["ignore", "pipe", "pipe"] });
    children.add(child);
    const keep = (d) => { this.log = (this.log + d).slice(-20_000); };
    child.stdout.on("data", keep);
    child.stderr.on("data", keep);
    this.exited = new Promise((r) => child.on("exit", (code, sig) => { children.delete(child); r(code ?? sig); }));
    this.child = child;
  }

  /** Sends a signal and waits (at most `ms`) for the exit. */
  async kill(signal = "SIGKILL", ms = 15_000) {
    this.child.kill(signal);
    const t = sleep(ms).then(() => "timeout");
    return Promise.race([this.exited, t]);
  }
}

/** An edge process: standalone, or in a cluster when `cluster` is given. */
export class Edge {
  static async start({ env = {}, cluster, node = "edge", port, tls = false } = {}) {
    const e = new Edge();
    e.tls = tls;
    e.port = port ?? (await freePort());
    e.node = node;
    e.env = {
      SWITCHBOARD_LISTEN: `127.0.0.1:${e.port}`,
      SWITCHBOARD_JWT_SECRET: SECRET,
      SWITCHBOARD_API_KEY: API_KEY,
      SWITCHBOARD_CHAT_AUTH: "open",
      SWITCHBOARD_NODE_ID: node,
      SWITCHBOARD_RECONNECT_JITTER_MAX_MS: "300",
      SWITCHBOARD_SHUTDOWN_GRACE_MS: "3000",
      SWITCHBOARD_RATE_PUBLISH_PER_SEC: "10000",
      SWITCHBOARD_RATE_PUBLISH_BURST: "10000",
      SWITCHBOARD_PRESENCE_TTL_MS: "1500",
      ...(tls ? { SWITCHBOARD_TLS_CERT_FILE: join(FIXTURES, "tls_cert_a.pem"), SWITCHBOARD_TLS_KEY_FILE: join(FIXTURES, "tls_key_a.pem") } : {}),
      ...(cluster ? { SWITCHBOARD_NATS_URL: cluster.nats.url, SWITCHBOARD_REDIS_URL: cluster.redis.url } : {}),
      ...env,
    };
    await e.start();
    return e;
  }

  async start() {
    this.proc = new Proc(this.node, process.env.EDGE_BIN, [], this.env);
    await waitListening(this.port, this.node);
  }

  /** wss:// names `localhost`, the name the test certificate carries. */
  get url() { return this.tls ? `wss://localhost:${this.port}/ws` : `ws://127.0.0.1:${this.port}/ws`; }
  get addr() { return `127.0.0.1:${this.port}`; }

  /** SIGTERM: the edge drains (Disconnect 4000 with advice) and exits. */
  terminate() { return this.proc.kill("SIGTERM"); }
  /** SIGKILL: gone without a word. */
  kill() { return this.proc.kill("SIGKILL"); }
  /** Starts it again on the same port. */
  restart() { return this.start(); }

  /** The backend API with the key: [status, body]. */
  api(path, body) { return httpJson(this.port, path, body, this.tls); }

  /** A backend publish (`{chat|user, client_msg_id, text}`), retried while the edge answers 503. */
  async publish(body, tries = 50) {
    for (let i = 0; ; i++) {
      const [status, json] = await this.api("/api/publish", body).catch((e) => [0, String(e)]);
      if (status === 200) return json;
      if (i >= tries) throw new Error(`publish failed: ${status} ${JSON.stringify(json)}`);
      await sleep(100);
    }
  }

  /** One series of /metrics, summed over its labels matching `filter`. */
  async metric(name, filter = "") {
    const [, text] = await httpGet(this.port, "/metrics", this.tls);
    let sum = 0;
    for (const line of text.split("\n")) {
      if (line.startsWith(name) && line.includes(filter) && (line[name.length] === " " || line[name.length] === "{")) {
        sum += Number(line.slice(line.lastIndexOf(" ") + 1));
      }
    }
    return sum;
  }
}

function httpJson(port, path, body, tls = false) {
  return new Promise((resolve, reject) => {
    const data = JSON.stringify(body);
    const req = (tls ? tlsRequest : request)({ host: "127.0.0.1", port, path, method: "POST", ...tlsOptions(tls), headers: { "content-type": "application/json", authorization: `Bearer ${API_KEY}`, "content-length": Buffer.byteLength(data) } }, (res) => {
      let out = "";
      res.on("data", (d) => (out += d));
      res.on("end", () => { let j; try { j = JSON.parse(out); } catch { j = out; } resolve([res.statusCode, j]); });
    });
    req.on("error", reject);
    req.end(data);
  });
}

const tlsOptions = (tls) => (tls ? { ca: readFileSync(TEST_CA_FILE), servername: "localhost" } : {});

function httpGet(port, path, tls = false) {
  return new Promise((resolve, reject) => {
    (tls ? tlsRequest : request)({ host: "127.0.0.1", port, path, ...tlsOptions(tls) }, (res) => {
      let out = "";
      res.on("data", (d) => (out += d));
      res.on("end", () => resolve([res.statusCode, out]));
    }).on("error", reject).end();
  });
}

/** nats-server, redis-server and a router process: a cluster for edges to join. */
export class Cluster {
  static async start() {
    const c = new Cluster();
    c.dir = mkdtempSync(join(tmpdir(), "sb-conformance-"));
    c.natsPort = await freePort();
    c.nats = { url: `nats://127.0.0.1:${c.natsPort}` };
    await c.startNats();
    const redisPort = await freePort();
    c.redis = { url: `redis://127.0.0.1:${redisPort}` };
    c.redisProc = new Proc("redis", "redis-server", ["--port", String(redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", c.dir], {});
    await waitListening(redisPort, "redis-server");
    const routerPort = await freePort();
    c.router = new Proc("router", process.env.ROUTER_BIN, [], {
      SWITCHBOARD_ROUTER_LISTEN: `127.0.0.1:${routerPort}`,
      SWITCHBOARD_NATS_URL: c.nats.url,
      SWITCHBOARD_REDIS_URL: c.redis.url,
      SWITCHBOARD_API_KEY: API_KEY,
      SWITCHBOARD_NODE_ID: "router-0",
      SWITCHBOARD_PRESENCE_TTL_MS: "1500",
    });
    await waitListening(routerPort, "router");
    return c;
  }

  async startNats() {
    this.natsProc = new Proc("nats", "nats-server", ["-a", "127.0.0.1", "-p", String(this.natsPort), "-js", "-sd", join(this.dir, "js")], {});
    await waitListening(this.natsPort, "nats-server");
  }

  /** Kills nats-server and starts it again on the same port after `downMs`. */
  async restartNats(downMs = 500) {
    await this.natsProc.kill("SIGKILL");
    await sleep(downMs);
    await this.startNats();
  }

  async stop() {
    for (const p of [this.router, this.natsProc, this.redisProc]) await p?.kill("SIGKILL", 3000);
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/**
 * A WebSocket proxy in front of an edge that injects faults: `duplicate`
 * sends every delivery twice and then the one before it again; `drop()`
 * resets every connection; `refuse(n, retryAfter)` answers the next n
 * upgrades with HTTP 503 and Retry-After.
 */
export class FaultProxy {
  static async start(target, decode) {
    const p = new FaultProxy();
    p.target = target;
    p.decode = decode; // (data, isBinary) => server frame, to spot deliveries
    p.duplicate = false;
    p.refusals = [];
    p.refused = 0;
    p.upgrades = 0;
    p.conns = new Set();
    p.http = createServer();
    p.wss = new WebSocketServer({ noServer: true, handleProtocols: (ps) => [...ps][0] ?? false, perMessageDeflate: false });
    p.http.on("upgrade", (req, socket, head) => {
      p.upgrades++;
      const retryAfter = p.refusals.shift();
      if (retryAfter !== undefined) {
        p.refused++;
        socket.end(`HTTP/1.1 503 Service Unavailable\r\nRetry-After: ${retryAfter}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`);
        return;
      }
      p.wss.handleUpgrade(req, socket, head, (client) => p.pipe(client, req.headers["sec-websocket-protocol"]));
    });
    await new Promise((r) => p.http.listen(0, "127.0.0.1", r));
    p.port = p.http.address().port;
    return p;
  }

  /** wss:// names `localhost`, the name the test certificate carries. */
  get url() { return this.tls ? `wss://localhost:${this.port}/ws` : `ws://127.0.0.1:${this.port}/ws`; }

  pipe(client, protocol) {
    const upstream = new WebSocket(this.target(), protocol ? protocol.split(",").map((s) => s.trim()) : undefined, { perMessageDeflate: false });
    const conn = { client, upstream };
    this.conns.add(conn);
    const queue = [];
    let last;
    upstream.on("open", () => { for (const [d, b] of queue.splice(0)) upstream.send(d, { binary: b }); });
    client.on("message", (d, b) => (upstream.readyState === 1 ? upstream.send(d, { binary: b }) : queue.push([d, b])));
    upstream.on("message", (d, b) => {
      client.send(d, { binary: b });
      if (!this.duplicate) return;
      let isDelivery = false;
      try { isDelivery = !!this.decode(d, b).delivery; } catch { /* not a frame */ }
      if (!isDelivery) return;
      client.send(d, { binary: b });
      if (last) client.send(last[0], { binary: last[1] });
      last = [d, b];
    });
    const end = (ws, code, reason) => { if (ws.readyState <= 1) (code >= 1000 && code !== 1005 && code !== 1006 ? ws.close(code, reason) : ws.terminate()); };
    upstream.on("close", (code, reason) => { this.conns.delete(conn); end(client, code, reason); });
    client.on("close", (code, reason) => { this.conns.delete(conn); end(upstream, code, reason); });
    upstream.on("error", () => client.terminate());
    client.on("error", () => upstream.terminate());
  }

  /** Resets every proxied connection (no close frame), as a network failure would. */
  drop() {
    for (const { client, upstream } of this.conns) { client.terminate(); upstream.terminate(); }
    this.conns.clear();
  }

  /** Stops reading from the edge for `ms` (the edge sees a client that stopped reading), then reads again. */
  stall(ms = 3000) {
    const paused = [...this.conns].map(({ upstream }) => upstream);
    for (const u of paused) u.pause();
    setTimeout(() => { for (const u of paused) if (u.readyState <= 1) u.resume(); }, ms);
  }

  refuse(n, retryAfterSecs) { for (let i = 0; i < n; i++) this.refusals.push(retryAfterSecs); }

  async stop() {
    this.drop();
    this.wss.close();
    await new Promise((r) => this.http.close(r));
  }
}
