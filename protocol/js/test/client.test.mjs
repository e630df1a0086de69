// The client against a scripted server: requests, de-dup, resume,
// reconnect advice, Retry-After, token refresh, publish retries.
import { test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { Client, text } from "../dist/index.js";
import { FakeServer, once } from "./fake-server.mjs";

const b64 = (s) => Buffer.from(s).toString("base64");
const options = (server, extra = {}) => ({ url: server.url, token: "t1", WebSocket, backoffBaseMs: 1, backoffMaxMs: 20, requestTimeoutMs: 2000, ...extra });

async function withServer(fn) {
  const server = await FakeServer.start();
  try {
    await fn(server);
  } finally {
    await server.stop();
  }
}

test("connects, answers requests, de-duplicates deliveries", () => withServer(async (server) => {
  const connecting = Client.connect(options(server));
  const { peer, connect } = await server.session();
  assert.equal(connect.connect.token, "t1");
  assert.equal(connect.connect.clientName, "switchboard-js");
  const client = await connecting;
  assert.equal(client.state, "live");
  const seen = [];
  client.on("delivery", (d) => seen.push([d.seq, text(d.payload)]));
  const sub = client.subscribe("room");
  const s = await peer.next();
  assert.deepEqual(s.subscribe, { chat: "room" });
  peer.reply(s, { subscribeResult: { chat: "room", position: { seq: "4", epoch: "e" } } });
  assert.equal((await sub).position.seq, 4);
  for (const seq of [4, 5, 5, 6, 3]) peer.send({ delivery: { chat: "room", seq: String(seq), epoch: "e", payload: b64("m" + seq) } });
  const pub = client.publish({ chat: "room" }, "hi", { clientMsgId: "c1" });
  const p = await peer.next();
  assert.deepEqual(p.publish, { chat: "room", clientMsgId: "c1", payload: b64("hi") });
  peer.reply(p, { publishAck: { chat: "room", seq: "7" } });
  assert.equal((await pub).seq, 7);
  assert.deepEqual(seen, [[5, "m5"], [6, "m6"]]);
  const err = client.typing("nope");
  peer.reply(await peer.next(), { error: { code: 403, message: "no" } });
  await assert.rejects(err, (e) => e.kind === "server" && e.code === 403);
  const ping = client.ping();
  peer.reply(await peer.next(), { pong: { serverTimeMs: "12" } });
  assert.equal((await ping).serverTimeMs, 12);
  await client.close();
  assert.equal(client.state, "closed");
}));

test("reconnects after the advised delay and resumes every stream from its last seq", () => withServer(async (server) => {
  const connecting = Client.connect(options(server));
  let { peer } = await server.session({ userStream: { seq: "2", epoch: "pe" } });
  const client = await connecting;
  const sub = client.subscribe("room");
  peer.reply(await peer.next(), { subscribeResult: { chat: "room", position: { seq: "10", epoch: "e" } } });
  await sub;
  peer.send({ delivery: { chat: "room", seq: "11", epoch: "e" } });
  peer.send({ delivery: { user: "u", seq: "3", epoch: "pe" } });
  const disconnected = once(client, "disconnected");
  const started = Date.now();
  peer.send({ disconnect: { code: 4000, reason: "shutdown", reconnect: true, reconnectDelayMs: 150 } });
  peer.ws.close(4000, "shutdown");
  assert.deepEqual(await disconnected, { code: 4000, reason: "shutdown", reconnect: true });
  const reconnected = once(client, "reconnected");
  const next = await server.session({ userStream: { seq: "3", epoch: "pe" } });
  assert.ok(Date.now() - started >= 140, "waited the advised delay");
  assert.equal(next.connect.connect.userSince, "3");
  assert.equal(next.connect.connect.userEpoch, "pe");
  peer = next.peer;
  const rs = await peer.next();
  assert.deepEqual(rs.subscribe, { chat: "room", since: "11", epoch: "e" });
  peer.reply(rs, { subscribeResult: { chat: "room", position: { seq: "12", epoch: "e", recovered: 1 } } });
  const seen = [];
  client.on("delivery", (d) => seen.push(d.seq));
  peer.send({ delivery: { chat: "room", seq: "11", epoch: "e" } });
  peer.send({ delivery: { chat: "room", seq: "12", epoch: "e" } });
  const r = await reconnected;
  assert.deepEqual(r.resubscribed.map(([c]) => c), ["room"]);
  await new Promise((res) => setTimeout(res, 50));
  assert.deepEqual(seen, [12]);
  await client.close();
}));

test("a hole in the window is a resync event; delivery goes on", () => withServer(async (server) => {
  const connecting = Client.connect(options(server));
  const { peer } = await server.session();
  const client = await connecting;
  const resync = once(client, "resyncRequired");
  const sub = client.subscribe("room", { since: 2, epoch: "e" });
  peer.reply(await peer.next(), { subscribeResult: { chat: "room", position: { seq: "10", epoch: "e", recovered: 3, resyncRequired: true } } });
  await sub;
  assert.deepEqual(await resync, { stream: { chat: "room" }, lastSeen: 2 });
  await client.close();
}));

test("HTTP 503 with Retry-After is honoured (Node shows it)", () => withServer(async (server) => {
  const connecting = Client.connect(options(server));
  const { peer } = await server.session();
  const client = await connecting;
  server.refusals.push([503, "1"]);
  const started = Date.now();
  peer.ws.terminate();
  await server.session();
  const waited = Date.now() - started;
  assert.ok(waited >= 1000 && waited < 2500, `waited ${waited} ms`);
  await client.close();
}));

test("the first connect is not retried and says why", () => withServer(async (server) => {
  server.refusals.push([503, "3"]);
  await assert.rejects(Client.connect(options(server)), (e) => e.kind === "http" && e.code === 503 && e.retryAfterMs === 3000);
  const connecting = Client.connect(options(server));
  const peer = await server.accept();
  peer.reply(await peer.next(), { error: { code: 401, message: "bad token" } });
  await assert.rejects(connecting, (e) => e.kind === "server" && e.code === 401);
}));

test("fallback URLs are dialled in turn", () => withServer(async (server) => {
  const dead = "ws://127.0.0.1:9/ws";
  const connecting = Client.connect(options(server, { url: server.url, fallbackUrls: [dead] }));
  const { peer } = await server.session();
  const client = await connecting;
  peer.ws.terminate();
  // The next dial goes to the dead URL, the one after back to the server.
  await server.session();
  assert.equal(client.state === "live" || client.state === "reconnecting", true);
  await client.close();
}));

test("a terminal close stops the client", () => withServer(async (server) => {
  const connecting = Client.connect(options(server));
  const { peer } = await server.session();
  const client = await connecting;
  const d = once(client, "disconnected");
  peer.send({ disconnect: { code: 4503, reason: "kicked" } });
  assert.deepEqual(await d, { code: 4503, reason: "kicked", reconnect: false });
  assert.equal(client.state, "closed");
  await assert.rejects(client.ping(), (e) => e.kind === "clientClosed");
}));

test("getToken: refreshes in-band before expiry, and reconnects after a refused token", () => withServer(async (server) => {
  let n = 1;
  const asked = [];
  const connecting = Client.connect(options(server, { getToken: (why) => { asked.push(why); return "t" + ++n; } }));
  const { peer } = await server.session();
  const client = await connecting;
  peer.send({ tokenExpiring: { tokenExpiresAtMs: "5" } });
  const r = await peer.next();
  assert.deepEqual(r.refresh, { token: "t2" });
  peer.reply(r, { refreshResult: { tokenExpiresAtMs: "99" } });
  // Now the server closes for an expired token: the client gets another and reconnects with it.
  const rejected = once(client, "tokenRejected");
  peer.send({ disconnect: { code: 4005, reason: "token_expired", reconnect: true, reconnectDelayMs: 100 } });
  assert.equal((await rejected).code, 440);
  const next = await server.session();
  assert.equal(next.connect.connect.token, "t3");
  assert.deepEqual(asked, ["expiring", "rejected"]);
  await client.close();
}));

test("without getToken the client parks until refreshToken", () => withServer(async (server) => {
  const connecting = Client.connect(options(server));
  const { peer } = await server.session();
  const client = await connecting;
  peer.ws.terminate();
  const p2 = await server.accept();
  p2.reply(await p2.next(), { error: { code: 440, message: "expired" } });
  await once(client, "tokenRejected");
  assert.equal(client.state, "waitingForToken");
  const refreshed = client.refreshToken("fresh");
  const { peer: p3, connect } = await server.session();
  assert.equal(connect.connect.token, "fresh");
  const r = await p3.next();
  p3.reply(r, { refreshResult: { tokenExpiresAtMs: "1" } });
  assert.equal((await refreshed).tokenExpiresAtMs, 1);
  await client.close();
}));

test("publish retries a 503 and a dropped connection with the same client message id", () => withServer(async (server) => {
  const connecting = Client.connect(options(server));
  let { peer } = await server.session();
  const client = await connecting;
  const pub = client.publish({ user: "bob" }, "x");
  const first = await peer.next();
  peer.reply(first, { error: { code: 503, message: "no router answered" } });
  const second = await peer.next();
  assert.equal(second.publish.clientMsgId, first.publish.clientMsgId);
  peer.ws.terminate();
  ({ peer } = await server.session());
  const third = await peer.next();
  assert.equal(third.publish.clientMsgId, first.publish.clientMsgId);
  peer.reply(third, { publishAck: { user: "bob", seq: "1", duplicate: true } });
  assert.equal((await pub).duplicate, true);
  await client.close();
}));

test("a server silent past its heartbeat is given up on", () => withServer(async (server) => {
  const connecting = Client.connect(options(server));
  const { peer } = await server.session({ heartbeatIntervalMs: 100 });
  const client = await connecting;
  // The client pings a quiet server; this one never answers.
  const ping = await peer.next();
  assert.ok(ping.ping);
  const d = await once(client, "disconnected");
  assert.equal(d.reconnect, true);
  await server.session();
  await client.close();
}));

test("publishes to one stream go out one at a time, in call order", () => withServer(async (server) => {
  const connecting = Client.connect(options(server));
  const { peer } = await server.session();
  const client = await connecting;
  const first = client.publish({ chat: "room" }, "1");
  const second = client.publish({ chat: "room" }, "2");
  const other = client.publish({ chat: "elsewhere" }, "x");
  const f1 = await peer.next();
  const fx = await peer.next();
  assert.equal(f1.publish.payload, b64("1"));
  assert.equal(fx.publish.chat, "elsewhere", "another stream does not wait");
  // The second waits for the first's ack.
  await assert.rejects(peer.next(200));
  peer.reply(f1, { publishAck: { chat: "room", seq: "1" } });
  const f2 = await peer.next();
  assert.equal(f2.publish.payload, b64("2"));
  peer.reply(f2, { publishAck: { chat: "room", seq: "2" } });
  peer.reply(fx, { publishAck: { chat: "elsewhere", seq: "1" } });
  assert.deepEqual([(await first).seq, (await second).seq, (await other).seq], [1, 2, 1]);
  await client.close();
}));
