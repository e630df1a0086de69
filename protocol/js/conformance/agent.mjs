// The TypeScript SDK behind the conformance suite's uniform client API:
// connect, call(method, args), drain() of recorded events, all with plain
// JSON values so that the same API crosses into a browser page
// (drivers/browser.mjs) or a Rust process (drivers/rust.mjs speaks the same
// ops to the Rust agent, edge/system/src/bin/system-client-agent.rs).
import { Client, jsonCodec, text } from "../dist/index.js";
import { protobufCodec } from "../dist/proto.js";

/** Events as the suite compares them, whichever client produced them. */
export function normalize(type, v) {
  switch (type) {
    case "delivery":
      return { chat: v.chat, user: v.user, seq: v.seq, sender: v.sender, text: text(v.payload), clientMsgId: v.clientMsgId, epoch: v.epoch };
    case "receipt":
      return { chat: v.chat, from: v.from, seq: v.seq, kind: v.kind };
    case "presence":
      return { user: v.user, online: v.online, devices: v.devices };
    case "typing":
      return { chat: v.chat, user: v.user };
    case "resyncRequired":
      return { stream: v.stream.chat !== undefined ? `chat:${v.stream.chat}` : "personal", lastSeen: v.lastSeen };
    case "disconnected":
      return { code: v.code ?? null, reconnect: v.reconnect };
    case "reconnected":
      return { resubscribed: v.resubscribed.map(([c]) => c).sort(), failed: v.failed.map((f) => f.chat) };
    case "tokenRejected":
      return { code: v.code };
    case "unsubscribed":
      return { chat: v.chat, reason: v.reason };
    default:
      return {};
  }
}

const EVENTS = ["delivery", "receipt", "presence", "typing", "resyncRequired", "disconnected", "reconnected", "tokenExpiring", "tokenRejected", "unsubscribed"];

export function errorJson(e) {
  return { kind: e?.kind ?? "other", code: e?.code ?? null, retryAfterMs: e?.retryAfterMs ?? null, message: String(e?.message ?? e) };
}

/**
 * One client. `getToken(user, why)` returns a fresh token (the suite mints
 * them); opts.refresh says when the client may ask: "always", "rejected"
 * (not before expiry: the token must run out) or "never".
 */
export function makeAgent(WebSocket, getToken, withCa) {
  let ops;
  const events = [];
  return {
    async connect(o) {
      const refresh = o.refresh ?? "never";
      const client = new Client({
          url: o.urls[0],
          fallbackUrls: o.urls.slice(1),
          token: o.token,
          // A driver that can trust a custom CA wraps its WebSocket (Node's `ws` takes `ca`).
          WebSocket: o.caFile && withCa ? withCa(WebSocket, o.caFile) : WebSocket,
          codec: o.encoding === "proto" ? protobufCodec : jsonCodec,
          backoffBaseMs: o.backoffBaseMs ?? 100,
          backoffMaxMs: o.backoffMaxMs ?? 2000,
          requestTimeoutMs: o.requestTimeoutMs ?? 5000,
          userSince: o.userSince,
          userEpoch: o.userEpoch,
          getToken: refresh === "never" ? undefined : async (why) => {
            if (refresh === "rejected" && why !== "rejected") throw new Error("not yet");
            return getToken(o.user, why);
          },
      });
      for (const type of EVENTS) client.on(type, (v) => events.push({ type, ...normalize(type, v) }));
      try {
        await client.connect();
      } catch (e) {
        return { err: errorJson(e) };
      }
      ops = opsFor(client);
      return { ok: { user: client.session.user, node: client.session.node } };
    },
    drain() {
      return events.splice(0);
    },
    async call(method, a = {}) {
      try {
        return { ok: (await ops[method](a)) ?? null };
      } catch (e) {
        return { err: errorJson(e) };
      }
    },
  };
}

const target = (a) => (a.chat !== undefined ? { chat: a.chat } : { user: a.user });

/** The ops, bound to a client (kept apart so the table is easy to read). */
export function opsFor(client) {
  return {
    subscribe: async (a) => {
      const r = await client.subscribe(a.chat, { since: a.since, epoch: a.epoch });
      return r.position;
    },
    unsubscribe: (a) => client.unsubscribe(a.chat),
    publish: async (a) => {
      const ack = await client.publish(target(a), a.text, { clientMsgId: a.clientMsgId });
      return { seq: ack.seq, duplicate: ack.duplicate };
    },
    receipt: (a) => client.receipt(target(a), a.seq, a.kind),
    typing: (a) => client.typing(a.chat),
    watchPresence: (a) => client.watchPresence(a.users),
    ping: async () => ({ rttMs: (await client.ping()).rttMs }),
    refreshToken: async (a) => { await client.refreshToken(a.token); return {}; },
    positions: async () => client.positions(),
    state: async () => client.state,
    close: () => client.close(),
  };
}
