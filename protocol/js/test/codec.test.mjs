// The hand-written JSON codec against the protobuf-es types generated from
// the .proto: the same frames must come out of both encodings.
import { test } from "node:test";
import assert from "node:assert/strict";
import { create, fromJson, toBinary, toJson } from "@bufbuild/protobuf";
import { jsonCodec, text, toBytes } from "../dist/index.js";
import { protobufCodec, ClientFrameSchema, ServerFrameSchema } from "../dist/proto.js";

const clientFrames = [
  { id: 1, connect: { token: "t", clientName: "js", clientVersion: "1", userSince: 0, userEpoch: "e" } },
  { id: 2, subscribe: { chat: "room", since: 17, epoch: "9a" } },
  { id: 3, subscribe: { chat: "room", token: "sub-jwt" } },
  { id: 4, publish: { chat: "room", clientMsgId: "m-1", payload: toBytes("héllo ✓") } },
  { id: 5, publish: { user: "bob", clientMsgId: "m-2", payload: new Uint8Array([0, 255, 1]) } },
  { id: 6, receipt: { chat: "room", seq: 21, kind: "RECEIPT_KIND_READ" } },
  { id: 7, receipt: { user: "alice", seq: 8, kind: "RECEIPT_KIND_DELIVERED" } },
  { id: 8, ping: {} },
  { id: 9, refresh: { token: "new" } },
  { id: 10, watchPresence: { users: ["a", "b"] } },
  { id: 11, unwatchPresence: { users: ["a"] } },
  { typing: { chat: "room" } },
  { id: 12, unsubscribe: { chat: "room" } },
];

test("client frames: JSON and protobuf encode the same message", () => {
  for (const f of clientFrames) {
    const fromOurJson = fromJson(ClientFrameSchema, JSON.parse(jsonCodec.encode(f)));
    const fromOurProto = (() => {
      const bytes = protobufCodec.encode(f);
      return toJson(ClientFrameSchema, fromBinaryClient(bytes));
    })();
    assert.deepEqual(toJson(ClientFrameSchema, fromOurJson), fromOurProto, JSON.stringify(f));
  }
});

import { fromBinary } from "@bufbuild/protobuf";
const fromBinaryClient = (b) => fromBinary(ClientFrameSchema, b);

test("optional since 0 survives in both encodings", () => {
  const f = { id: 1, subscribe: { chat: "c", since: 0 } };
  assert.equal(JSON.parse(jsonCodec.encode(f)).subscribe.since, "0");
  assert.equal(fromBinaryClient(protobufCodec.encode(f)).kind.value.since, 0n);
});

const serverJson = [
  { id: 1, connectResult: { sessionId: "edge-a-17", user: "alice", serverTimeMs: "1795490000000", heartbeatIntervalMs: 25000,
    tokenExpiresAtMs: "1795493600000", userStream: { seq: "43", epoch: "5e", recovered: 2 }, node: "edge-a" } },
  { id: 2, subscribeResult: { chat: "team", position: { seq: "20", epoch: "9a", recovered: 3, resyncRequired: true } } },
  { id: 3, ok: {} },
  { id: 4, publishAck: { chat: "team", seq: "21", timestampMs: "1795490001234", duplicate: true } },
  { delivery: { chat: "team", seq: "21", sender: "alice", timestampMs: "1795490001234", payload: "aMOpbGxv", clientMsgId: "m", epoch: "9a" } },
  { delivery: { user: "bob", seq: "1", payload: "" } },
  { receipt: { chat: "team", from: "bob", seq: "21", kind: "RECEIPT_KIND_READ", timestampMs: "5" } },
  { presence: { user: "bob", online: true, lastSeenMs: "5", devices: 2 } },
  { presence: { user: "carol", lastSeenMs: "1795480000000" } },
  { id: 5, pong: { serverTimeMs: "7" } },
  { id: 6, refreshResult: { tokenExpiresAtMs: "9" } },
  { id: 7, error: { code: 503, message: "no router answered" } },
  { disconnect: { code: 4000, reason: "shutdown", reconnect: true, reconnectDelayMs: 1234 } },
  { tokenExpiring: { tokenExpiresAtMs: "99" } },
  { typing: { chat: "team", user: "bob" } },
  { unsubscribed: { chat: "team", reason: "removed" } },
];

test("server frames: JSON and protobuf decode to the same frame", () => {
  for (const j of serverJson) {
    const msg = fromJson(ServerFrameSchema, j);
    const viaJson = jsonCodec.decode(JSON.stringify(j));
    const viaProto = protobufCodec.decode(toBinary(ServerFrameSchema, msg));
    assert.deepEqual(viaProto, viaJson, JSON.stringify(j));
    // Every field the .proto defines is present, defaults filled in.
    const kind = Object.keys(viaJson).find((k) => k !== "id");
    assert.ok(kind, JSON.stringify(j));
  }
  const d = jsonCodec.decode(JSON.stringify(serverJson[4])).delivery;
  assert.equal(text(d.payload), "héllo");
  assert.equal(d.seq, 21);
  const c = jsonCodec.decode(JSON.stringify(serverJson[0])).connectResult;
  assert.deepEqual(c.userStream, { seq: 43, epoch: "5e", recovered: 2, resyncRequired: false });
});

test("unknown fields and kinds are skipped", () => {
  const f = jsonCodec.decode('{"id":3,"someFutureKind":{"x":1},"ok":{},"extra":true}');
  assert.deepEqual(f, { id: 3, ok: {} });
  const g = jsonCodec.decode('{"someFutureKind":{}}');
  assert.deepEqual(g, { id: 0 });
});

test("64-bit integers are read from numbers too", () => {
  const f = jsonCodec.decode('{"delivery":{"chat":"c","seq":5,"timestampMs":6}}');
  assert.equal(f.delivery.seq, 5);
  assert.equal(f.delivery.timestampMs, 6);
});

test("an undecodable frame throws", () => {
  assert.throws(() => jsonCodec.decode("{not json"));
  assert.throws(() => protobufCodec.decode(new Uint8Array([0xff, 0xff, 0xff])));
  assert.throws(() => protobufCodec.decode("text"));
  void create;
});
