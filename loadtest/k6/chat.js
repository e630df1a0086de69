// k6 chat scenario against a Switchboard edge, JSON encoding
// (docs/protocol.md). Each VU gets a dev token, opens a socket, joins a
// chat shared by pairs of VUs, publishes, and checks acks and deliveries.
//
// Run with (against an edge started with --dev):
//   k6 run -e BASE_URL=http://127.0.0.1:8080 --vus 20 --duration 30s loadtest/k6/chat.js
// Against a cluster without --dev, mint tokens yourself and pass one per
// VU with -e TOKENS=tok1,tok2,...
import http from "k6/http";
import ws from "k6/ws";
import { check } from "k6";
import { Counter, Trend } from "k6/metrics";
import encoding from "k6/encoding";

const BASE = __ENV.BASE_URL || "http://127.0.0.1:8080";
const WS = BASE.replace(/^http/, "ws") + "/ws";
const TOKENS = (__ENV.TOKENS || "").split(",").filter((t) => t);
const SESSION_MS = parseInt(__ENV.SESSION_MS || "2000", 10);

const latency = new Trend("switchboard_publish_to_receive_ms", true);
const acks = new Counter("switchboard_acks");
const deliveries = new Counter("switchboard_deliveries");
const errors = new Counter("switchboard_errors");

export const options = {
  thresholds: {
    checks: ["rate==1.0"],
    switchboard_errors: ["count==0"],
  },
};

function token(user) {
  if (TOKENS.length) return TOKENS[(__VU - 1) % TOKENS.length];
  const r = http.get(`${BASE}/dev/token?user=${user}`);
  check(r, { "dev token minted": (res) => res.status === 200 });
  return r.json("token");
}

export default function () {
  const user = `k6-${__VU}-${__ITER}`;
  const chat = `k6-room-${Math.floor((__VU - 1) / 2)}`;
  const jwt = token(user);
  let nextId = 1;
  const pending = {};
  const res = ws.connect(WS, { headers: { "Sec-WebSocket-Protocol": "switchboard.v1.json" } }, (socket) => {
    const request = (kind, body, onReply) => {
      const id = nextId++;
      pending[id] = onReply;
      socket.send(JSON.stringify({ id, [kind]: body }));
    };
    socket.on("message", (text) => {
      const f = JSON.parse(text);
      if (f.id && pending[f.id]) {
        const cb = pending[f.id];
        delete pending[f.id];
        if (f.error) {
          errors.add(1);
          console.error(`error ${f.error.code}: ${f.error.message}`);
        }
        cb(f);
        return;
      }
      if (f.delivery) {
        deliveries.add(1);
        const sent = parseInt(encoding.b64decode(f.delivery.payload, "std", "s"), 10);
        if (!isNaN(sent)) latency.add(Date.now() - sent);
      }
      if (f.disconnect && f.disconnect.code !== 4000) errors.add(1);
    });
    socket.on("open", () => {
      request("connect", { token: jwt, clientName: "k6" }, (r) => {
        check(r, { "connected": (x) => x.connectResult !== undefined });
        request("subscribe", { chat }, (s) => {
          check(s, { "subscribed": (x) => x.subscribeResult !== undefined });
          const body = encoding.b64encode(String(Date.now()));
          request("publish", { chat, clientMsgId: `${user}-1`, payload: body }, (a) => {
            const ok = check(a, { "publish acked with a seq": (x) => x.publishAck && Number(x.publishAck.seq) > 0 });
            if (ok) acks.add(1);
          });
        });
      });
      socket.setTimeout(() => socket.close(), SESSION_MS);
    });
  });
  check(res, { "upgraded (101)": (r) => r && r.status === 101 });
}
