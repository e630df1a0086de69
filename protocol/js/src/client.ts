// The connection: one object owns the socket, the pending requests and the
// stream cursors. Its link goes dialing -> open(connecting -> resuming ->
// live); when the socket is lost it waits (backoff, the server's advice, or
// Retry-After) and dials the next URL, or waits for a new token (parked),
// or stops. The rules are the Rust client's (protocol/src/client); the
// conformance suite (protocol/conformance) checks both against a real edge.
import { afterRetryAfter, fullJitter, reconnectAdvised, retryableCode } from "./backoff.js";
import { jsonCodec, toBytes } from "./codec.js";
import { Cursors, type Cursor, type StreamId } from "./cursors.js";
import { SwitchboardError } from "./errors.js";
import type {
  ClientFrame, Codec, ConnectResult, Delivery, Disconnect, PresenceEvent, PublishAck, ReceiptEvent,
  ReceiptKind, RefreshResult, ServerFrame, StreamPosition, SubscribeResult, TypingEvent,
} from "./frames.js";

/** The part of the WebSocket API the client uses (browsers, Node's `ws`, undici). */
export interface WebSocketLike {
  readonly readyState: number;
  binaryType: string;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: string | Uint8Array): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface ClientOptions {
  /** WebSocket URL of the edge: `wss://host/ws` (or `ws://` in development). */
  url: string;
  /** More edges to try when there is no load balancer: each dial takes the next of `url` and these, in turn. */
  fallbackUrls?: string[];
  /** JWT sent in Connect. */
  token: string;
  /**
   * Gets a new token from the app's auth service. Called when the server says
   * the token expires soon (the client then refreshes in-band, without
   * reconnecting) and when a token is refused (the client then reconnects
   * with the new one). Without it, the app reacts to `tokenExpiring` and
   * `tokenRejected` events by calling `refreshToken`.
   */
  getToken?: (why: "expiring" | "rejected") => Promise<string> | string;
  /** Wire encoding: `jsonCodec` (default) or `protobufCodec` from "@switchboard/client/proto". */
  codec?: Codec;
  /** WebSocket implementation; default `globalThis.WebSocket` (Node 20 users pass `ws`). */
  WebSocket?: WebSocketConstructor;
  /** Sent in Connect. Default "switchboard-js". */
  clientName?: string;
  /** Sent in Connect. Default the SDK version. */
  clientVersion?: string;
  /** Reconnect and resume by itself. Default true. */
  reconnect?: boolean;
  /** First backoff step, ms; a delay is uniform in [0, step] and the step doubles per failed attempt. Default 100. */
  backoffBaseMs?: number;
  /** Largest backoff step, ms. Default 10000. */
  backoffMaxMs?: number;
  /** How long a request waits for its reply, and dialing plus Connect may take, ms. Default 10000. */
  requestTimeoutMs?: number;
  /** Resume the personal stream after this seq on the first connect (an app that stored its position). */
  userSince?: number;
  /** Epoch `userSince` belongs to. */
  userEpoch?: string;
  /** How often `publish` retries a retryable failure with the same client message id. Default 5. */
  publishRetries?: number;
  /** Random source in [0, 1), for tests. Default Math.random. */
  random?: () => number;
}

/** A chat the client could not re-subscribe after a reconnect; it is no longer followed. */
export interface ResubscribeFailure { chat: string; code: number; message: string }

/** Everything the client reports, by event name. */
export interface ClientEvents {
  /** A message the app has not seen before: each (stream, seq) once, in order. */
  delivery: Delivery;
  receipt: ReceiptEvent;
  presence: PresenceEvent;
  typing: TypingEvent;
  /** The server ended a subscription (removed from the chat); not re-subscribed. */
  unsubscribed: { chat: string; reason: string };
  /** The token expires soon (with `getToken` the client refreshes it by itself). */
  tokenExpiring: { expiresAtMs: number };
  /** Messages of a stream were lost: fetch what came after `lastSeen` from the backend. Delivery goes on. */
  resyncRequired: { stream: StreamId; lastSeen: number };
  /** The connection dropped. With `reconnect` false the client has stopped. */
  disconnected: { code?: number; reason: string; reconnect: boolean };
  /** Reconnected, resumed the personal stream and re-subscribed the chats. */
  reconnected: { userStream: StreamPosition; resubscribed: [string, StreamPosition][]; failed: ResubscribeFailure[] };
  /** The token is no longer accepted; without `getToken` call `refreshToken` to reconnect. */
  tokenRejected: { code: number; message: string };
  /** A server frame did not decode and was skipped. */
  malformed: { error: string };
  /** The link changed: for a connection indicator. */
  state: ClientState;
}

export type ClientState = "connecting" | "live" | "reconnecting" | "waitingForToken" | "closed";

/** What the client must remember about a request until its reply. */
type Meta =
  | { t: "subscribe"; chat: string; since?: number; token: string }
  | { t: "resubscribe"; chat: string; since: number }
  | { t: "unsubscribe"; chat: string }
  | { t: "refresh"; token: string }
  | { t: "connect"; since?: number }
  | { t: "other" };

interface Pending {
  meta: Meta;
  resolve?: (f: ServerFrame) => void;
  reject?: (e: SwitchboardError) => void;
}

interface Stashed { frame: ClientFrame; meta: Meta; resolve: (f: ServerFrame) => void; reject: (e: SwitchboardError) => void; done: () => boolean }

/** Why the link went down, and what to do next. */
interface Lost {
  error: SwitchboardError;
  code?: number;
  reason: string;
  next: { t: "backoff" } | { t: "exactly"; ms: number } | { t: "retryAfter"; ms: number } | { t: "token"; code: number; message: string } | { t: "stop" };
}

const VERSION = "0.1.0";
/** A session that lasted this long (or backoffMax, if longer) resets the backoff. */
const STABLE_SESSION_MS = 1000;
const OPEN = 1;

type Listener<T> = (value: T) => void;

export class Client {
  private readonly opts: Required<Omit<ClientOptions, "getToken" | "userSince" | "userEpoch" | "fallbackUrls">> & ClientOptions;
  private readonly codec: Codec;
  private readonly listeners = new Map<keyof ClientEvents, Set<Listener<never>>>();
  private readonly cursors: Cursors;
  private readonly subTokens = new Map<string, string>();
  private readonly pending = new Map<number, Pending>();
  private stash: Stashed[] = [];
  /** The last publish queued per stream ("chat:<id>", "user:<id>"): the next one waits for it. */
  private readonly publishing = new Map<string, Promise<void>>();
  private ws: WebSocketLike | undefined;
  private phase: "dialing" | "connecting" | "resuming" | "live" | "idle" | "parked" | "stopped" = "stopped";
  private timer: ReturnType<typeof setTimeout> | undefined;
  private heartbeat: ReturnType<typeof setInterval> | undefined;
  private lastHeard = 0;
  private silenceMs = 0;
  private httpRefusal: { status: number; retryAfterMs?: number } | undefined;
  private resume: { outstanding: number; userStream: StreamPosition; resubscribed: [string, StreamPosition][]; failed: ResubscribeFailure[] } | undefined;
  private nextId = 1;
  private attempt = 0;
  private dials = 0;
  private liveSince: number | undefined;
  private ready: { resolve: () => void; reject: (e: SwitchboardError) => void } | undefined;
  private closers: (() => void)[] = [];
  private fetchingToken = false;
  private sessionValue: ConnectResult | undefined;
  private stateValue: ClientState = "connecting";

  /**
   * A client that has not dialled yet: register listeners with `on`, then
   * call `connect`, so that the deliveries recovered right after Connect
   * reach them.
   */
  constructor(options: ClientOptions) {
    const WS = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WS) throw new TypeError("no WebSocket implementation: pass options.WebSocket (e.g. the `ws` package on Node 20)");
    this.opts = {
      clientName: "switchboard-js",
      clientVersion: VERSION,
      reconnect: true,
      backoffBaseMs: 100,
      backoffMaxMs: 10_000,
      requestTimeoutMs: 10_000,
      publishRetries: 5,
      random: Math.random,
      codec: jsonCodec,
      ...options,
      WebSocket: WS,
    };
    this.codec = this.opts.codec;
    this.cursors = new Cursors({ seq: options.userSince ?? 0, epoch: options.userEpoch ?? "" });
  }

  /**
   * Dials, sends Connect and resolves once the ConnectResult arrives. This
   * first attempt is not retried: a refused token rejects with kind
   * "server" (401, 440), an overloaded edge with kind "http" (503) in Node
   * or "dial" in browsers.
   */
  connect(): Promise<void> {
    if (this.ready || this.phase !== "stopped" || this.sessionValue) return Promise.reject(new SwitchboardError("protocol", "connect() called twice"));
    return new Promise((resolve, reject) => {
      this.ready = { resolve, reject };
      this.dial();
    });
  }

  /** `new Client(options)` and `connect()` in one, for apps that attach listeners afterwards (they miss nothing only when `userSince` is unset). */
  static async connect(options: ClientOptions): Promise<Client> {
    const client = new Client(options);
    await client.connect();
    return client;
  }

  // ---- public API ----

  /** Registers a listener; returns a function that removes it. */
  on<K extends keyof ClientEvents>(name: K, fn: Listener<ClientEvents[K]>): () => void {
    let set = this.listeners.get(name);
    if (!set) this.listeners.set(name, (set = new Set()));
    set.add(fn as Listener<never>);
    return () => set.delete(fn as Listener<never>);
  }

  /** The latest ConnectResult (user, session id, node, token expiry); changes after each reconnect. */
  get session(): ConnectResult | undefined {
    return this.sessionValue;
  }

  get state(): ClientState {
    return this.stateValue;
  }

  /** The last seq seen in the personal stream and each followed chat: where the client resumes from. */
  positions(): { personal: Cursor; chats: Record<string, Cursor> } {
    return this.cursors.snapshot();
  }

  /**
   * Subscribes to a chat and follows it from now on (de-duplicated,
   * re-subscribed after reconnects). With `since` (and its `epoch`) the
   * messages after it are recovered first; with `token` a subscription
   * token from the backend grants the chat.
   */
  async subscribe(chat: string, opts: { since?: number; epoch?: string; token?: string } = {}): Promise<SubscribeResult> {
    const f = await this.request(
      { subscribe: { chat, since: opts.since, epoch: opts.epoch, token: opts.token } },
      { t: "subscribe", chat, since: opts.since, token: opts.token ?? "" },
    );
    return this.expect(f, "subscribeResult");
  }

  /** Leaves a chat; the client stops following it. */
  async unsubscribe(chat: string): Promise<void> {
    this.expect(await this.request({ unsubscribe: { chat } }, { t: "unsubscribe", chat }), "ok");
  }

  /**
   * Publishes to a chat (`{chat}`) or a user's personal stream (`{user}`).
   * A retryable failure (dropped connection, timeout, 429/500/503) is
   * retried with the same client message id, which the server
   * de-duplicates, up to `publishRetries` times with full-jitter backoff.
   * Publishes to one stream go out one at a time, in call order: the
   * server sequences concurrent publishes in any order, and a sender's
   * messages must keep theirs.
   */
  publish(
    target: { chat: string } | { user: string },
    payload: Uint8Array | string,
    opts: { clientMsgId?: string } = {},
  ): Promise<PublishAck> {
    const key = "chat" in target ? `chat:${target.chat}` : `user:${target.user}`;
    const before = this.publishing.get(key) ?? Promise.resolve();
    const run = before.then(() => this.publishNow(target, payload, opts));
    const tail = run.then(() => {}, () => {});
    this.publishing.set(key, tail);
    void tail.then(() => {
      if (this.publishing.get(key) === tail) this.publishing.delete(key);
    });
    return run;
  }

  private async publishNow(
    target: { chat: string } | { user: string },
    payload: Uint8Array | string,
    opts: { clientMsgId?: string },
  ): Promise<PublishAck> {
    const clientMsgId = opts.clientMsgId ?? newMessageId(this.opts.random);
    const frame: ClientFrame = { publish: { ...target, clientMsgId, payload: toBytes(payload) } };
    for (let attempt = 0; ; attempt++) {
      try {
        return this.expect(await this.request(frame, { t: "other" }), "publishAck");
      } catch (e) {
        if (!(e instanceof SwitchboardError) || !e.retryable || attempt >= this.opts.publishRetries) throw e;
        await sleep(Math.max(10, fullJitter(this.opts.backoffBaseMs, this.opts.backoffMaxMs, attempt + 1, this.opts.random)));
      }
    }
  }

  /** "Delivered/read up to seq": to a chat's subscribers, or to `user`, the sender of personal messages. */
  async receipt(target: { chat: string } | { user: string }, seq: number, kind: ReceiptKind): Promise<void> {
    this.expect(await this.request({ receipt: { ...target, seq, kind } }, { t: "other" }), "ok");
  }

  /** Says "typing" in a chat. */
  async typing(chat: string): Promise<void> {
    this.expect(await this.request({ typing: { chat } }, { t: "other" }), "ok");
  }

  /** Watches users' presence; changes arrive as `presence` events (one right away per user). */
  async watchPresence(users: string[]): Promise<void> {
    this.expect(await this.request({ watchPresence: { users } }, { t: "other" }), "ok");
  }

  async unwatchPresence(users: string[]): Promise<void> {
    this.expect(await this.request({ unwatchPresence: { users } }, { t: "other" }), "ok");
  }

  /** A round trip to the server: its clock and the time it took. */
  async ping(): Promise<{ rttMs: number; serverTimeMs: number }> {
    const start = Date.now();
    const pong = this.expect(await this.request({ ping: {} }, { t: "other" }), "pong");
    return { rttMs: Date.now() - start, serverTimeMs: pong.serverTimeMs };
  }

  /**
   * Replaces the token of the session (in-band) and of later reconnects.
   * While disconnected it is used for the next Connect at once, and a
   * client waiting after `tokenRejected` reconnects with it.
   */
  async refreshToken(token: string): Promise<RefreshResult> {
    return this.expect(await this.request({ refresh: { token } }, { t: "refresh", token }), "refreshResult");
  }

  /** Closes the socket with 1000 and stops (no reconnect); resolves once closed. */
  close(): Promise<void> {
    if (this.phase === "stopped" && !this.ws) return Promise.resolve();
    return new Promise((resolve) => {
      this.closers.push(resolve);
      this.stop(1000, "closed by client");
    });
  }

  // ---- requests ----

  private expect<K extends keyof ServerFrame>(f: ServerFrame, kind: K): NonNullable<ServerFrame[K]> {
    const v = f[kind];
    if (v === undefined) throw new SwitchboardError("protocol", `unexpected reply: ${JSON.stringify(Object.keys(f))}`);
    return v as NonNullable<ServerFrame[K]>;
  }

  private usable(): boolean {
    return this.phase === "resuming" || this.phase === "live";
  }

  private request(frame: ClientFrame, meta: Meta): Promise<ServerFrame> {
    return new Promise((resolve, reject) => {
      let done = false;
      const timer = setTimeout(() => {
        done = true;
        reject(new SwitchboardError("timeout", "timed out"));
      }, this.opts.requestTimeoutMs);
      const settle = { resolve: (f: ServerFrame) => { if (done) return; done = true; clearTimeout(timer); resolve(f); },
        reject: (e: SwitchboardError) => { if (done) return; done = true; clearTimeout(timer); reject(e); } };
      if (this.phase === "stopped") return settle.reject(new SwitchboardError("clientClosed", "client closed"));
      if (this.usable()) return this.write(frame, { meta, ...settle });
      if (meta.t === "refresh") {
        // The next Connect carries the new token; the refresh itself goes out once connected.
        this.opts.token = meta.token;
        if (this.phase === "parked") this.dial();
      }
      this.stash.push({ frame, meta, ...settle, done: () => done });
    });
  }

  private write(frame: ClientFrame, pending: Pending): void {
    const id = this.takeId();
    this.pending.set(id, pending);
    this.send({ ...frame, id });
  }

  private send(frame: ClientFrame): void {
    try {
      this.ws?.send(this.codec.encode(frame));
    } catch (e) {
      // The close event follows; the pending request fails with it.
      void e;
    }
  }

  private takeId(): number {
    for (;;) {
      const id = this.nextId;
      this.nextId = this.nextId >= 0xffff_ffff ? 1 : this.nextId + 1;
      if (!this.pending.has(id)) return id;
    }
  }

  private flushStash(): void {
    while (this.usable() && this.stash.length) {
      const s = this.stash.shift()!;
      if (!s.done()) this.write(s.frame, { meta: s.meta, resolve: s.resolve, reject: s.reject });
    }
  }

  // ---- events ----

  private emit<K extends keyof ClientEvents>(name: K, value: ClientEvents[K]): void {
    for (const fn of this.listeners.get(name) ?? []) {
      try {
        (fn as Listener<ClientEvents[K]>)(value);
      } catch (e) {
        queueMicrotask(() => { throw e; });
      }
    }
  }

  private setState(s: ClientState): void {
    if (s !== this.stateValue) {
      this.stateValue = s;
      this.emit("state", s);
    }
  }

  // ---- the link ----

  private url(): string {
    const all = [this.opts.url, ...(this.opts.fallbackUrls ?? [])];
    return all[this.dials++ % all.length]!;
  }

  private dial(): void {
    clearTimeout(this.timer);
    this.phase = "dialing";
    this.httpRefusal = undefined;
    let ws: WebSocketLike;
    try {
      ws = new this.opts.WebSocket(this.url(), this.codec.subprotocol);
    } catch (e) {
      return this.onLost(lostFailed(new SwitchboardError("dial", `cannot open socket: ${String(e)}`)));
    }
    this.ws = ws;
    ws.binaryType = "arraybuffer";
    // Node's `ws` shows the refused upgrade (status, Retry-After); browsers do not.
    const node = ws as unknown as { on?: (ev: string, fn: (...a: unknown[]) => void) => void; terminate?: () => void };
    if (typeof node.on === "function") {
      node.on("unexpected-response", (_req: unknown, res: unknown) => {
        const r = res as { statusCode: number; headers: Record<string, string | undefined> };
        const ra = Number(r.headers["retry-after"]);
        this.httpRefusal = { status: r.statusCode, retryAfterMs: Number.isFinite(ra) && ra >= 0 ? ra * 1000 : undefined };
        node.terminate?.();
      });
      node.on("ping", () => { if (ws === this.ws) this.lastHeard = Date.now(); });
    }
    ws.onopen = () => ws === this.ws && this.onOpen();
    ws.onmessage = (ev) => ws === this.ws && this.onMessage(ev.data);
    ws.onclose = (ev) => ws === this.ws && this.onClose(ev.code, ev.reason);
    ws.onerror = () => {}; // the close event follows
    this.timer = setTimeout(() => ws === this.ws && this.onLost(lostFailed(new SwitchboardError("timeout", "dial timed out"))), this.opts.requestTimeoutMs);
  }

  private onOpen(): void {
    clearTimeout(this.timer);
    const first = this.ready !== undefined;
    const since = first ? this.opts.userSince : this.cursors.personal.cursor.seq;
    const epoch = first ? this.opts.userEpoch : this.cursors.personal.cursor.epoch;
    this.phase = "connecting";
    this.lastHeard = Date.now();
    const id = this.takeId();
    this.pending.set(id, { meta: { t: "connect", since } });
    this.send({
      id,
      connect: { token: this.opts.token, clientName: this.opts.clientName, clientVersion: this.opts.clientVersion, userSince: since, userEpoch: epoch },
    });
    this.timer = setTimeout(() => this.onLost(lostFailed(new SwitchboardError("timeout", "no reply to Connect"))), this.opts.requestTimeoutMs);
  }

  private onClose(code: number, reason: string): void {
    if (this.phase === "dialing") {
      const h = this.httpRefusal;
      const error = h
        ? new SwitchboardError("http", `HTTP ${h.status} on upgrade`, h.status, h.retryAfterMs)
        : new SwitchboardError("dial", `socket failed to open (close ${code})`, code);
      return this.onLost(lostDial(error));
    }
    // 1005/1006: no close frame (the network failed, or a reset).
    const c = code === 1005 || code === 1006 ? undefined : code;
    this.onLost(lostClosed(c, reason || (c === undefined ? "connection closed" : "")));
  }

  private onMessage(data: unknown): void {
    this.lastHeard = Date.now();
    let frame: ServerFrame;
    try {
      if (typeof data === "string" ? this.codec.binary : !this.codec.binary) throw new Error("frame of the wrong type for the subprotocol");
      frame = this.codec.decode(data as string | ArrayBuffer);
    } catch (e) {
      const error = `undecodable server frame: ${(e as Error).message}`;
      if (this.usable()) return this.emit("malformed", { error });
      return this.onLost(lostFailed(new SwitchboardError("protocol", error)));
    }
    if (!frame.id) return this.onPush(frame);
    const p = this.pending.get(frame.id);
    if (!p) return; // reply to nothing pending (timed out long ago)
    this.pending.delete(frame.id);
    this.onReply(p, frame);
  }

  private onPush(f: ServerFrame): void {
    if (f.delivery) {
      const d = f.delivery;
      const v = this.cursors.onDelivery(d);
      if (v.duplicate) return;
      if (v.hole !== undefined) this.emit("resyncRequired", { stream: d.chat ? { chat: d.chat } : { personal: true }, lastSeen: v.hole });
      return this.emit("delivery", d);
    }
    if (f.receipt) return this.emit("receipt", f.receipt);
    if (f.presence) return this.emit("presence", f.presence);
    if (f.typing) return this.emit("typing", f.typing);
    if (f.unsubscribed) {
      this.cursors.forget(f.unsubscribed.chat);
      this.subTokens.delete(f.unsubscribed.chat);
      return this.emit("unsubscribed", f.unsubscribed);
    }
    if (f.tokenExpiring) {
      this.emit("tokenExpiring", { expiresAtMs: f.tokenExpiring.tokenExpiresAtMs });
      return this.fetchToken("expiring");
    }
    if (f.disconnect) return this.onLost(lostDisconnect(f.disconnect));
  }

  private onReply(p: Pending, f: ServerFrame): void {
    const m = p.meta;
    if (m.t === "connect") return this.onConnectReply(m.since, f);
    if (m.t === "resubscribe") return this.onResubscribed(m.chat, m.since, f);
    if (f.error) {
      if (m.t === "unsubscribe" && f.error.code === 404) this.cursors.forget(m.chat);
      return p.reject?.(new SwitchboardError("server", `server error ${f.error.code}: ${f.error.message}`, f.error.code));
    }
    if (m.t === "subscribe" && f.subscribeResult) {
      if (m.token) this.subTokens.set(m.chat, m.token);
      else this.subTokens.delete(m.chat);
      const hole = this.cursors.onPosition(m.chat, m.since, f.subscribeResult.position);
      // Resolve first: the app learns of the subscription before its events.
      p.resolve?.(f);
      if (hole !== undefined) this.emit("resyncRequired", { stream: { chat: m.chat }, lastSeen: hole });
      return;
    }
    if (m.t === "unsubscribe" && f.ok) {
      this.cursors.forget(m.chat);
      this.subTokens.delete(m.chat);
    }
    if (m.t === "refresh" && f.refreshResult) this.opts.token = m.token;
    p.resolve?.(f);
  }

  private onConnectReply(since: number | undefined, f: ServerFrame): void {
    clearTimeout(this.timer);
    if (f.error) return this.onLost(lostRefused(f.error.code, f.error.message));
    const r = f.connectResult;
    if (!r) return this.onLost(lostFailed(new SwitchboardError("protocol", "unexpected reply to Connect")));
    this.sessionValue = r;
    this.silenceMs = r.heartbeatIntervalMs > 0 ? (r.heartbeatIntervalMs * 5) / 2 : 0;
    this.startHeartbeat(r.heartbeatIntervalMs);
    const hole = this.cursors.onPosition(undefined, since, r.userStream);
    if (hole !== undefined) this.emit("resyncRequired", { stream: { personal: true }, lastSeen: hole });
    if (this.ready) {
      const ready = this.ready;
      this.ready = undefined;
      this.goLive();
      ready.resolve();
      this.flushStash();
      return;
    }
    const chats = [...this.cursors.chats.entries()].map(([c, e]) => [c, { ...e.cursor }] as const);
    this.phase = "resuming";
    this.resume = { outstanding: chats.length, userStream: r.userStream, resubscribed: [], failed: [] };
    this.timer = setTimeout(() => this.onLost(lostFailed(new SwitchboardError("timeout", "re-subscribe timed out"))), this.opts.requestTimeoutMs);
    // Pipelined: every Subscribe goes out before the first reply.
    for (const [chat, cursor] of chats) {
      this.write(
        { subscribe: { chat, since: cursor.seq, epoch: cursor.epoch, token: this.subTokens.get(chat) } },
        { meta: { t: "resubscribe", chat, since: cursor.seq } },
      );
    }
    this.resumedOne();
    this.flushStash();
  }

  private onResubscribed(chat: string, since: number, f: ServerFrame): void {
    if (f.subscribeResult) {
      const pos = f.subscribeResult.position;
      const hole = this.cursors.onPosition(chat, since, pos);
      if (hole !== undefined) this.emit("resyncRequired", { stream: { chat }, lastSeen: hole });
      this.resume?.resubscribed.push([chat, pos]);
    } else if (f.error && retryableCode(f.error.code)) {
      // Try the whole resume again rather than lose the chat.
      return this.onLost(lostFailed(new SwitchboardError("server", f.error.message, f.error.code)));
    } else if (f.error) {
      this.cursors.forget(chat);
      this.resume?.failed.push({ chat, code: f.error.code, message: f.error.message });
    } else {
      return this.onLost(lostFailed(new SwitchboardError("protocol", "unexpected reply to Subscribe")));
    }
    if (this.resume) this.resume.outstanding--;
    this.resumedOne();
  }

  private resumedOne(): void {
    const r = this.resume;
    if (this.phase !== "resuming" || !r || r.outstanding > 0) return;
    clearTimeout(this.timer);
    this.resume = undefined;
    this.goLive();
    this.emit("reconnected", { userStream: r.userStream, resubscribed: r.resubscribed, failed: r.failed });
  }

  private goLive(): void {
    this.phase = "live";
    this.liveSince = Date.now();
    this.setState("live");
  }

  /**
   * Browsers do not show WebSocket pings, so the client listens for any
   * frame: after a quiet heartbeat interval it sends a `ping`, and a server
   * silent for 2.5 intervals counts as gone (the server closes a socket
   * silent for two).
   */
  private startHeartbeat(intervalMs: number): void {
    clearInterval(this.heartbeat);
    if (intervalMs <= 0) return;
    const ws = this.ws;
    this.heartbeat = setInterval(() => {
      if (ws !== this.ws || !this.usable()) return;
      const quiet = Date.now() - this.lastHeard;
      if (quiet >= this.silenceMs) {
        this.onLost(lostFailed(new SwitchboardError("timeout", "server silent past its heartbeat interval")));
      } else if (quiet >= intervalMs) {
        this.write({ ping: {} }, { meta: { t: "other" } });
      }
    }, Math.max(50, intervalMs / 2));
  }

  private fetchToken(why: "expiring" | "rejected"): void {
    const get = this.opts.getToken;
    if (!get || this.fetchingToken) return;
    this.fetchingToken = true;
    Promise.resolve()
      .then(() => get(why))
      .then(
        (token) => {
          this.fetchingToken = false;
          if (this.phase === "stopped") return;
          if (this.phase === "parked") {
            // Not straight back: a token refused again must not loop tightly.
            this.opts.token = token;
            this.phase = "idle";
            this.setState("reconnecting");
            this.timer = setTimeout(() => this.dial(), fullJitter(this.opts.backoffBaseMs, this.opts.backoffMaxMs, this.attempt, this.opts.random));
            return;
          }
          this.refreshToken(token).catch(() => {});
        },
        () => {
          this.fetchingToken = false;
        },
      );
  }

  private failInFlight(error: () => SwitchboardError): void {
    for (const [, p] of this.pending) {
      if (p.meta.t === "unsubscribe") this.cursors.forget(p.meta.chat);
      if (p.meta.t === "refresh") this.opts.token = p.meta.token;
      p.reject?.(error());
    }
    this.pending.clear();
  }

  private detach(): WebSocketLike | undefined {
    const ws = this.ws;
    this.ws = undefined;
    clearTimeout(this.timer);
    clearInterval(this.heartbeat);
    return ws;
  }

  private onLost(lost: Lost): void {
    const ws = this.detach();
    if (ws && ws.readyState <= OPEN) {
      try {
        ws.close();
      } catch {
        /* already failing */
      }
    }
    this.resume = undefined;
    this.failInFlight(() => new SwitchboardError("disconnected", "disconnected while the request was in flight"));
    if (this.ready) {
      // The first attempt: connect() reports it; no retries.
      const ready = this.ready;
      this.ready = undefined;
      this.phase = "stopped";
      this.setState("closed");
      this.failStash();
      return ready.reject(lost.error);
    }
    const next = this.opts.reconnect ? lost.next : { t: "stop" as const };
    let wasLive = false;
    if (this.liveSince !== undefined) {
      if (Date.now() - this.liveSince >= Math.max(STABLE_SESSION_MS, this.opts.backoffMaxMs)) this.attempt = 0;
      this.liveSince = undefined;
      wasLive = true;
    }
    const { code, reason } = lost;
    if (next.t === "stop") {
      this.phase = "stopped";
      this.emit("disconnected", { code, reason, reconnect: false });
      this.setState("closed");
      this.failStash();
      return;
    }
    if (wasLive) this.emit("disconnected", { code, reason, reconnect: true });
    if (next.t === "token") {
      this.phase = "parked";
      this.setState("waitingForToken");
      this.emit("tokenRejected", { code: next.code, message: next.message });
      return this.fetchToken("rejected");
    }
    const { backoffBaseMs: base, backoffMaxMs: max, random } = this.opts;
    const wait = next.t === "exactly" ? next.ms : next.t === "retryAfter" ? afterRetryAfter(next.ms, max, random) : fullJitter(base, max, this.attempt, random);
    this.attempt++;
    this.phase = "idle";
    this.setState("reconnecting");
    this.timer = setTimeout(() => this.dial(), wait);
  }

  private failStash(): void {
    for (const s of this.stash) s.reject(new SwitchboardError("clientClosed", "client closed"));
    this.stash = [];
  }

  private stop(code: number, reason: string): void {
    const ws = this.detach();
    const wasStopped = this.phase === "stopped";
    this.phase = "stopped";
    this.failInFlight(() => new SwitchboardError("clientClosed", "client closed"));
    this.failStash();
    if (this.ready) {
      this.ready.reject(new SwitchboardError("clientClosed", "client closed"));
      this.ready = undefined;
    }
    if (!wasStopped) this.emit("disconnected", { code, reason, reconnect: false });
    this.setState("closed");
    const finish = () => {
      for (const c of this.closers.splice(0)) c();
    };
    if (ws && ws.readyState <= OPEN) {
      const t = setTimeout(finish, 1000);
      ws.onclose = () => {
        clearTimeout(t);
        finish();
      };
      try {
        ws.close(code, reason);
      } catch {
        finish();
      }
    } else finish();
  }
}

function lostFailed(error: SwitchboardError): Lost {
  return { error, reason: error.message, next: { t: "backoff" } };
}

function lostDial(error: SwitchboardError): Lost {
  let next: Lost["next"] = { t: "backoff" };
  if (error.kind === "http") {
    if (!error.retryable) next = { t: "stop" };
    else if (error.retryAfterMs !== undefined) next = { t: "retryAfter", ms: error.retryAfterMs };
  }
  return { error, reason: error.message, next };
}

function lostClosed(code: number | undefined, reason: string): Lost {
  const error = new SwitchboardError("closed", `closed by server: ${code ?? 1006} ${reason}`, code ?? 1006);
  let next: Lost["next"];
  if (code === 4005) next = { t: "token", code: 440, message: reason || "token expired" };
  else next = reconnectAdvised(code) ? { t: "backoff" } : { t: "stop" };
  return { error, code, reason, next };
}

function lostDisconnect(d: Disconnect): Lost {
  const error = new SwitchboardError("closed", `closed by server: ${d.code} ${d.reason}`, d.code);
  let next: Lost["next"];
  if (d.code === 4005) next = { t: "token", code: 440, message: d.reason || "token expired" };
  else if (!d.reconnect) next = { t: "stop" };
  else if (d.reconnectDelayMs > 0) next = { t: "exactly", ms: d.reconnectDelayMs };
  else next = { t: "backoff" };
  return { error, code: d.code, reason: d.reason, next };
}

function lostRefused(code: number, message: string): Lost {
  const error = new SwitchboardError("server", `server error ${code}: ${message}`, code);
  let next: Lost["next"];
  if (code === 401 || code === 440) next = { t: "token", code, message };
  else next = retryableCode(code) ? { t: "backoff" } : { t: "stop" };
  return { error, reason: `connect refused: ${code} ${message}`, next };
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** A client message id: 16 characters of the id alphabet, random. */
export function newMessageId(random: () => number = Math.random): string {
  const abc = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
  let s = "m-";
  const bytes = new Uint8Array(16);
  const c = (globalThis as { crypto?: { getRandomValues?: (a: Uint8Array) => Uint8Array } }).crypto;
  if (c?.getRandomValues) c.getRandomValues(bytes);
  else for (let i = 0; i < 16; i++) bytes[i] = Math.floor(random() * 256);
  for (const b of bytes) s += abc[b % abc.length];
  return s;
}
