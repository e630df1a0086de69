// The scenarios of protocol/conformance/scenarios.json, written once for
// every client: `h` (run.mjs) starts edges, clusters and fault proxies,
// and opens clients through the driver under test.
import assert from "node:assert/strict";
import { TEST_CA_FILE, mint, sleep } from "./harness.mjs";

/** Each delivery exactly once and in order: seqs 1..n without a repeat. */
function assertExactlyOnce(ds, texts) {
  assert.deepEqual(ds.map((d) => d.text), texts, "each message once, in order");
  for (let i = 1; i < ds.length; i++) assert.ok(ds[i].seq > ds[i - 1].seq, "seqs increase");
}

const texts = (prefix, n, from = 1) => Array.from({ length: n }, (_, i) => `${prefix}-${i + from}`);

async function backendBurst(edge, target, prefix, n, from = 1) {
  for (const t of texts(prefix, n, from)) await edge.publish({ ...target, client_msg_id: t, text: t, sender: "backend" });
}

export const scenarios = {
  async "connect-ping"(h) {
    const edge = await h.edge();
    const a = await h.client("alice", { urls: [edge.url] });
    assert.equal(a.session.user, h.user("alice"));
    const { rttMs } = await a.ping();
    assert.ok(rttMs >= 0 && rttMs < 5000);
    await a.close();
  },

  async "chat-roundtrip"(h) {
    const edge = await h.edge();
    const chat = h.chat("room");
    const a = await h.client("alice", { urls: [edge.url] });
    const b = await h.client("bob", { urls: [edge.url] });
    await a.subscribe(chat);
    await b.subscribe(chat);
    const acks = [];
    for (const t of texts("m", 3)) acks.push(await a.publish({ chat }, t, `${t}-${h.tag}`));
    for (const c of [a, b]) {
      const ds = await c.waitDeliveries({ chat }, 3);
      await sleep(100);
      assertExactlyOnce(c.deliveries({ chat }), texts("m", 3));
      assert.deepEqual(ds.map((d) => d.seq), acks.map((k) => k.seq));
      assert.equal(ds[0].sender, h.user("alice"));
    }
  },

  async "direct-message"(h) {
    const edge = await h.edge();
    const a = await h.client("alice", { urls: [edge.url] });
    const b = await h.client("bob", { urls: [edge.url] });
    const ack = await a.publish({ user: h.user("bob") }, "psst", `dm-${h.tag}`);
    const [d] = await b.waitDeliveries({ personal: true }, 1);
    assert.equal(d.text, "psst");
    assert.equal(d.sender, h.user("alice"));
    assert.equal(d.seq, ack.seq);
  },

  async "duplicate-publish"(h) {
    const edge = await h.edge();
    const chat = h.chat("room");
    const a = await h.client("alice", { urls: [edge.url] });
    const b = await h.client("bob", { urls: [edge.url] });
    await b.subscribe(chat);
    const first = await a.publish({ chat }, "once", `dup-${h.tag}`);
    const again = await a.publish({ chat }, "once", `dup-${h.tag}`);
    assert.equal(first.duplicate, false);
    assert.equal(again.duplicate, true);
    assert.equal(again.seq, first.seq);
    await b.waitDeliveries({ chat }, 1);
    await sleep(300);
    assert.equal(b.deliveries({ chat }).length, 1);
  },

  async receipts(h) {
    const edge = await h.edge();
    const chat = h.chat("room");
    const a = await h.client("alice", { urls: [edge.url] });
    const b = await h.client("bob", { urls: [edge.url] });
    await a.subscribe(chat);
    await b.subscribe(chat);
    const { seq } = await a.publish({ chat }, "read me", `r-${h.tag}`);
    await b.waitDeliveries({ chat }, 1);
    await b.receipt({ chat }, seq, "RECEIPT_KIND_READ");
    const r = await a.waitFor("receipt", (e) => e.from === h.user("bob") && e.chat === chat);
    assert.equal(r.seq, seq);
    assert.equal(r.kind, "RECEIPT_KIND_READ");
    const dm = await a.publish({ user: h.user("bob") }, "dm", `rd-${h.tag}`);
    await b.waitDeliveries({ personal: true }, 1);
    await b.receipt({ user: h.user("alice") }, dm.seq, "RECEIPT_KIND_DELIVERED");
    const r2 = await a.waitFor("receipt", (e) => e.from === h.user("bob") && !e.chat);
    assert.equal(r2.seq, dm.seq);
    assert.equal(r2.kind, "RECEIPT_KIND_DELIVERED");
  },

  async typing(h) {
    const edge = await h.edge();
    const chat = h.chat("room");
    const a = await h.client("alice", { urls: [edge.url] });
    const b = await h.client("bob", { urls: [edge.url] });
    await a.subscribe(chat);
    await b.subscribe(chat);
    await a.typing(chat);
    await b.waitFor("typing", (e) => e.user === h.user("alice") && e.chat === chat);
  },

  async presence(h) {
    const edge = await h.edge();
    const a = await h.client("alice", { urls: [edge.url] });
    await a.watchPresence([h.user("bob")]);
    await a.waitFor("presence", (e) => e.user === h.user("bob") && !e.online);
    const b = await h.client("bob", { urls: [edge.url] });
    await a.waitFor("presence", (e) => e.user === h.user("bob") && e.online);
    const before = a.of("presence").length;
    await b.close();
    await a.until("bob offline", () => a.of("presence").slice(before).find((e) => !e.online));
  },

  async "subscribe-since"(h) {
    const edge = await h.edge();
    const chat = h.chat("room");
    await backendBurst(edge, { chat }, "m", 5);
    const a = await h.client("alice", { urls: [edge.url] });
    const pos = await a.subscribe(chat, { since: 2 });
    assert.equal(pos.seq, 5);
    assert.equal(pos.recovered, 3);
    await a.waitDeliveries({ chat }, 3);
    await backendBurst(edge, { chat }, "m", 1, 6);
    await a.waitDeliveries({ chat }, 4);
    assertExactlyOnce(a.deliveries({ chat }), texts("m", 4, 3));
    assert.equal(a.of("resyncRequired").length, 0);
  },

  async "personal-since"(h) {
    const edge = await h.edge();
    await backendBurst(edge, { user: h.user("alice") }, "p", 3);
    const a = await h.client("alice", { urls: [edge.url], userSince: 1 });
    await a.waitDeliveries({ personal: true }, 2);
    await sleep(100);
    assertExactlyOnce(a.deliveries({ personal: true }), texts("p", 2, 2));
  },

  async unsubscribe(h) {
    const edge = await h.edge();
    const chat = h.chat("room");
    const a = await h.client("alice", { urls: [edge.url] });
    await a.subscribe(chat);
    await backendBurst(edge, { chat }, "m", 1);
    await a.waitDeliveries({ chat }, 1);
    await a.unsubscribe(chat);
    await backendBurst(edge, { chat }, "m", 2, 2);
    await sleep(300);
    assert.equal(a.deliveries({ chat }).length, 1);
    assert.deepEqual(Object.keys((await a.positions()).chats), []);
  },

  async "history-window-resync"(h) {
    const edge = await h.edge({ SWITCHBOARD_HISTORY_MAX_MESSAGES: "5" });
    const chat = h.chat("room");
    await backendBurst(edge, { chat }, "m", 10);
    const a = await h.client("alice", { urls: [edge.url] });
    const pos = await a.subscribe(chat, { since: 1 });
    assert.equal(pos.resyncRequired, true);
    const r = await a.waitFor("resyncRequired");
    assert.deepEqual(r, { type: "resyncRequired", stream: `chat:${chat}`, lastSeen: 1 });
    await a.waitDeliveries({ chat }, 5);
    await backendBurst(edge, { chat }, "m", 1, 11);
    await a.waitDeliveries({ chat }, 6);
    assertExactlyOnce(a.deliveries({ chat }), texts("m", 6, 6));
    assert.equal(a.of("resyncRequired").length, 1);
  },

  async "duplicate-deliveries"(h) {
    const edge = await h.edge();
    const proxy = await h.proxy(() => edge.url);
    proxy.duplicate = true;
    const chat = h.chat("room");
    const a = await h.client("alice", { urls: [proxy.url] });
    await a.subscribe(chat);
    await backendBurst(edge, { chat }, "m", 10);
    await backendBurst(edge, { user: h.user("alice") }, "p", 3);
    await a.waitDeliveries({ chat }, 10);
    await a.waitDeliveries({ personal: true }, 3);
    await sleep(200);
    assertExactlyOnce(a.deliveries({ chat }), texts("m", 10));
    assertExactlyOnce(a.deliveries({ personal: true }), texts("p", 3));
    assert.equal(a.of("resyncRequired").length, 0);
  },

  async "connection-drop-resume"(h) {
    const edge = await h.edge();
    const proxy = await h.proxy(() => edge.url);
    const chat = h.chat("room");
    const a = await h.client("alice", { urls: [proxy.url] });
    await a.subscribe(chat);
    await backendBurst(edge, { chat }, "m", 2);
    await backendBurst(edge, { user: h.user("alice") }, "p", 1);
    await a.waitDeliveries({ chat }, 2);
    await a.waitDeliveries({ personal: true }, 1);
    proxy.refuse(1, 1); // keep it down for a moment: the gap has messages
    proxy.drop();
    await a.waitFor("disconnected");
    await backendBurst(edge, { chat }, "m", 3, 3);
    await backendBurst(edge, { user: h.user("alice") }, "p", 2, 2);
    const re = await a.waitFor("reconnected", () => true, 15_000);
    assert.deepEqual(re.resubscribed, [chat]);
    await backendBurst(edge, { chat }, "m", 1, 6);
    await a.waitDeliveries({ chat }, 6);
    await a.waitDeliveries({ personal: true }, 3);
    await sleep(100);
    assertExactlyOnce(a.deliveries({ chat }), texts("m", 6));
    assertExactlyOnce(a.deliveries({ personal: true }), texts("p", 3));
    const d = a.of("disconnected")[0];
    assert.equal(d.reconnect, true);
  },

  async "resume-many-chats"(h) {
    const edge = await h.edge();
    const proxy = await h.proxy(() => edge.url);
    const chats = [h.chat("a"), h.chat("b"), h.chat("c")];
    const a = await h.client("alice", { urls: [proxy.url] });
    for (const chat of chats) {
      await a.subscribe(chat);
      await backendBurst(edge, { chat }, chat, 1);
    }
    for (const chat of chats) await a.waitDeliveries({ chat }, 1);
    proxy.refuse(1, 1);
    proxy.drop();
    await a.waitFor("disconnected");
    for (const chat of chats) await backendBurst(edge, { chat }, chat, 2, 2);
    const re = await a.waitFor("reconnected", () => true, 15_000);
    assert.deepEqual(re.resubscribed, [...chats].sort());
    for (const chat of chats) {
      await a.waitDeliveries({ chat }, 3);
      assertExactlyOnce(a.deliveries({ chat }), texts(chat, 3));
    }
  },

  async "retry-after-503"(h) {
    const edge = await h.edge();
    const proxy = await h.proxy(() => edge.url);
    const chat = h.chat("room");
    const a = await h.client("alice", { urls: [proxy.url], backoffBaseMs: 50, backoffMaxMs: 200 });
    await a.subscribe(chat);
    proxy.refuse(2, 1);
    const upgrades = proxy.upgrades;
    const dropped = Date.now();
    proxy.drop();
    await backendBurst(edge, { chat }, "m", 2);
    await a.waitFor("reconnected", () => true, 15_000);
    const took = Date.now() - dropped;
    if (h.caps.seesUpgradeStatus) {
      // Two refusals, each waited out (1 s at least): no hammering.
      assert.equal(proxy.upgrades - upgrades, 3, "one dial per Retry-After");
      assert.ok(took >= 2000, `reconnected after ${took} ms, before the two Retry-Afters`);
    } else {
      // A browser cannot see the 503: plain backoff, still back.
      assert.ok(proxy.refused >= 2);
    }
    await a.waitDeliveries({ chat }, 2);
    assertExactlyOnce(a.deliveries({ chat }), texts("m", 2));
  },

  async "admission-503"(h) {
    const edge = await h.edge({ SWITCHBOARD_MAX_CONNECTIONS: "1" });
    const a = await h.client("alice", { urls: [edge.url] });
    const refused = await h.tryConnect("bob", { urls: [edge.url] });
    assert.ok(refused.err, "second socket refused");
    if (h.caps.seesUpgradeStatus) {
      assert.equal(refused.err.kind, "http");
      assert.equal(refused.err.code, 503);
      assert.ok(refused.err.retryAfterMs >= 1000 && refused.err.retryAfterMs <= 5000, JSON.stringify(refused.err));
    } else {
      assert.equal(refused.err.kind, "dial");
    }
    await a.close();
    await sleep(200);
    const b = await h.client("bob", { urls: [edge.url] });
    await b.ping();
  },

  async "slow-consumer"(h) {
    const edge = await h.edge({
      SWITCHBOARD_HEARTBEAT_INTERVAL_MS: "2000",
      SWITCHBOARD_SEND_QUEUE_MAX_FRAMES: "64",
      SWITCHBOARD_SEND_QUEUE_MAX_BYTES: "262144",
    });
    const proxy = await h.proxy(() => edge.url);
    const chat = h.chat("room");
    const a = await h.client("alice", { urls: [proxy.url] });
    await a.subscribe(chat);
    // The socket stops reading; enough is published to fill the kernel's
    // buffers on both sides and then the edge's send queue.
    proxy.stall(4000);
    const big = "x".repeat(16 * 1024);
    const n = 800;
    for (let i = 1; i <= n; i += 25) {
      const batch = [];
      for (let j = i; j < i + 25 && j <= n; j++) batch.push(edge.publish({ chat, client_msg_id: `m-${j}`, text: `m-${j} ${big}` }));
      await Promise.all(batch);
    }
    await a.waitFor("disconnected", () => true, 15_000);
    await a.waitFor("reconnected", () => true, 15_000);
    const ds = await a.waitDeliveries({ chat }, n, 20_000);
    await sleep(100);
    // Published in parallel batches: each once, in seq order.
    const got = a.deliveries({ chat });
    assert.equal(got.length, n);
    assert.deepEqual(new Set(ds.map((d) => d.text.split(" ")[0])), new Set(texts("m", n)));
    assert.deepEqual(got.map((d) => d.seq), Array.from({ length: n }, (_, i) => i + 1));
    assert.ok((await edge.metric("switchboard_edge_disconnects_total", "slow_consumer")) >= 1, "closed as a slow consumer");
  },

  async "edge-sigterm-drain"(h) {
    const cluster = await h.cluster();
    const e1 = await h.edge({}, cluster, "edge-1");
    const e2 = await h.edge({}, cluster, "edge-2");
    const chat = h.chat("room");
    const a = await h.client("alice", { urls: [e1.url, e2.url] });
    assert.equal(a.session.node, "edge-1");
    await a.subscribe(chat);
    await backendBurst(e2, { chat }, "m", 2);
    await a.waitDeliveries({ chat }, 2);
    const exited = e1.terminate();
    const d = await a.waitFor("disconnected");
    assert.equal(d.code, 4000);
    assert.equal(d.reconnect, true);
    await backendBurst(e2, { chat }, "m", 2, 3);
    await a.waitFor("reconnected", () => true, 15_000);
    await backendBurst(e2, { chat }, "m", 1, 5);
    await a.waitDeliveries({ chat }, 5);
    await sleep(100);
    assertExactlyOnce(a.deliveries({ chat }), texts("m", 5));
    assert.equal(await exited, 0, "the edge exits cleanly after its drain");
  },

  async "edge-sigkill-fallback"(h) {
    const cluster = await h.cluster();
    const e1 = await h.edge({}, cluster, "edge-1");
    const e2 = await h.edge({}, cluster, "edge-2");
    const chat = h.chat("room");
    const a = await h.client("alice", { urls: [e1.url, e2.url] });
    await a.subscribe(chat);
    await backendBurst(e2, { chat }, "m", 2);
    await backendBurst(e2, { user: h.user("alice") }, "p", 1);
    await a.waitDeliveries({ chat }, 2);
    await e1.kill();
    await a.waitFor("disconnected");
    await backendBurst(e2, { chat }, "m", 2, 3);
    await backendBurst(e2, { user: h.user("alice") }, "p", 1, 2);
    await a.waitFor("reconnected", () => true, 15_000);
    await a.waitDeliveries({ chat }, 4);
    await a.waitDeliveries({ personal: true }, 2);
    await sleep(100);
    assertExactlyOnce(a.deliveries({ chat }), texts("m", 4));
    assertExactlyOnce(a.deliveries({ personal: true }), texts("p", 2));
    assert.equal(a.of("resyncRequired").length, 0);
  },

  async "edge-restart-epoch"(h) {
    const edge = await h.edge();
    const chat = h.chat("room");
    const a = await h.client("alice", { urls: [edge.url] });
    await a.subscribe(chat);
    await backendBurst(edge, { chat }, "old", 3);
    await a.waitDeliveries({ chat }, 3);
    await edge.kill();
    await edge.restart();
    const r = await a.waitFor("resyncRequired", (e) => e.stream === `chat:${chat}`, 15_000);
    assert.equal(r.lastSeen, 3);
    await a.waitFor("reconnected", () => true, 15_000);
    await backendBurst(edge, { chat }, "new", 2);
    await a.until("new messages", () => a.deliveries({ chat }).filter((d) => d.text.startsWith("new")).length >= 2);
    assert.deepEqual(a.deliveries({ chat }).map((d) => d.text), [...texts("old", 3), ...texts("new", 2)]);
  },

  async "nats-restart"(h) {
    const cluster = await h.cluster();
    const edge = await h.edge({}, cluster, "edge-1");
    const chat = h.chat("room");
    const a = await h.client("alice", { urls: [edge.url] });
    await a.subscribe(chat);
    await backendBurst(edge, { chat }, "m", 2);
    await a.waitDeliveries({ chat }, 2);
    await cluster.restartNats();
    await backendBurst(edge, { chat }, "m", 3, 3);
    await a.waitDeliveries({ chat }, 5, 20_000);
    await sleep(200);
    const ds = a.deliveries({ chat });
    assertExactlyOnce(ds, texts("m", 5));
  },

  async "publish-retry-503"(h) {
    const cluster = await h.cluster();
    const edge = await h.edge({}, cluster, "edge-1");
    const chat = h.chat("room");
    const a = await h.client("alice", { urls: [edge.url], requestTimeoutMs: 8000 });
    const b = await h.client("bob", { urls: [edge.url] });
    await b.subscribe(chat);
    await cluster.router.kill("SIGKILL");
    const publishing = a.publish({ chat }, "eventually", `retry-${h.tag}`);
    await sleep(1500);
    cluster.router.start();
    const ack = await publishing;
    await b.waitDeliveries({ chat }, 1, 15_000);
    await sleep(300);
    assert.equal(b.deliveries({ chat }).length, 1);
    assert.equal(b.deliveries({ chat })[0].seq, ack.seq);
  },

  async "token-refresh-in-band"(h) {
    const edge = await h.edge({ SWITCHBOARD_TOKEN_EXPIRY_WARNING_MS: "2500", SWITCHBOARD_JWT_LEEWAY_SECS: "0" });
    // One refresh, not a chain of 3 s tokens each refreshed within its
    // last 2.5 s: that chain failed once under the full suite's load.
    const a = await h.client("alice", { urls: [edge.url], ttlSecs: 3, refreshTtlSecs: 3600, refresh: "always" });
    await a.waitFor("tokenExpiring", () => true, 5000);
    await sleep(4000); // past the first token's expiry
    await a.ping();
    assert.equal(a.of("disconnected").length, 0, "no disconnect: refreshed in-band");
  },

  async "token-expired-reconnect"(h) {
    const edge = await h.edge({ SWITCHBOARD_TOKEN_EXPIRY_WARNING_MS: "1000", SWITCHBOARD_JWT_LEEWAY_SECS: "0" });
    const chat = h.chat("room");
    const a = await h.client("alice", { urls: [edge.url], ttlSecs: 2, refresh: "rejected" });
    await a.subscribe(chat);
    const d = await a.waitFor("disconnected", () => true, 8000);
    assert.equal(d.code, 4005);
    await a.waitFor("tokenRejected");
    await backendBurst(edge, { chat }, "m", 2);
    await a.waitFor("reconnected", () => true, 10_000);
    await a.waitDeliveries({ chat }, 2);
    assertExactlyOnce(a.deliveries({ chat }), texts("m", 2));
  },

  async "wss-test-ca"(h) {
    const edge = await h.edge({}, undefined, "edge", { tls: true });
    const chat = h.chat("room");
    const a = await h.client("alice", { urls: [edge.url], caFile: TEST_CA_FILE });
    await a.subscribe(chat);
    const ack = await a.publish({ chat }, "over tls", `tls-${h.tag}`);
    const [d] = await a.waitDeliveries({ chat }, 1);
    assert.equal(d.seq, ack.seq);
    assert.equal(d.text, "over tls");
    // Without the test CA (default roots) the certificate is refused.
    const refused = await h.tryConnect("bob", { urls: [edge.url], reconnect: false });
    assert.ok(refused.err, "a client without the CA is refused");
    assert.equal(refused.err.kind, "dial", JSON.stringify(refused.err));
  },

  async "kick-terminal"(h) {
    const edge = await h.edge();
    const a = await h.client("alice", { urls: [edge.url] });
    const [status] = await edge.api("/api/kick", { user: h.user("alice") });
    assert.equal(status, 200);
    const d = await a.waitFor("disconnected");
    assert.deepEqual(d, { type: "disconnected", code: 4503, reconnect: false });
    await sleep(500);
    assert.equal(a.of("reconnected").length, 0);
    await assert.rejects(a.ping());
  },
};

export { mint };
