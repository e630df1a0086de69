// k6 chat scenario against a Switchboard edge, JSON encoding
// (docs/protocol.md). Each VU gets a dev token, opens a socket, joins a
// chat shared by pairs of VUs, publishes, and checks acks and deliveries.
//
// Run with (against an edge started with --dev):
//   k6 run -e BASE_URL=http://127.0.0.1:8080 --vus 20 --duration 30s loadtest/k6/chat.js
// Against a cluster without --dev, mint tokens yourself and pass one per
// VU with -e TOKENS=tok1,tok2,...
//
// Thresholds (k6 exits non-zero when one fails): every check passes, no
// error frame, every acked publish comes back to its sender's socket
// (`switchboard_delivered`, waiting up to DELIVERY_TIMEOUT_MS after the
// session for a late one), deliveries were received at all, and the
// publish-to-receive latency meets the product's bar: p95 <= LATENCY_P95_MS
// (default 100) and p99 <= LATENCY_P99_MS (default 200).
import http from "k6/http";
import ws from "k6/ws";
import { check } from "k6";
import { Counter, Rate, Trend } from "k6/metrics";
import encoding from "k6/encoding";

const BASE = __ENV.BASE_URL || "http://127.0.0.1:8080";
const WS = BASE.replace(/^http/, "ws") + "/ws";
const TOKENS = (__ENV.TOKENS || "").split(",").filter((t) => t);
const SESSION_MS = parseInt(__ENV.SESSION_MS || "2000", 10);
const DELIVERY_TIMEOUT_MS = parseInt(__ENV.DELIVERY_TIMEOUT_MS || "5000", 10);
const P95 = parseInt(__ENV.LATENCY_P95_MS || "100", 10);
const P99 = parseInt(__ENV.LATENCY_P99_MS || "200", 10);

const latency = new Trend("switchboard_publish_to_receive_ms", true);
const acks = new Counter("switchboard_acks");
const deliveries = new Counter("switchboard_deliveries");
const delivered = new Rate("switchboard_delivered");
const errors = new Counter("switchboard_errors");

export const options = {
  thresholds: {
    checks: ["rate==1.0"],
    switchboard_errors: ["count==0"],
    // Received, not only published: each acked publish reached its sender.
    switchboard_delivered: ["rate==1.0"],
    switchboard_deliveries: ["count>0"],
    switchboard_publish_to_receive_ms: [`p(95)<=${P95}`, `p(99)<=${P99}`],
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
  const msgId = `${user}-1`;
  let nextId = 1;
  const pending = {};
  let acked = false;
  let ownDelivered = false;
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
        if (f.delivery.clientMsgId === msgId && f.delivery.sender === user) ownDelivered = true;
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
          request("publish", { chat, clientMsgId: msgId, payload: body }, (a) => {
            const ok = check(a, { "publish acked with a seq": (x) => x.publishAck && Number(x.publishAck.seq) > 0 });
            if (ok) {
              acks.add(1);
              acked = true;
            }
          });
        });
      });
      // Close after the session, or once an acked publish came back (or
      // DELIVERY_TIMEOUT_MS later, counting it lost).
      const deadline = Date.now() + SESSION_MS + DELIVERY_TIMEOUT_MS;
      const finish = () => {
        if (acked && !ownDelivered && Date.now() < deadline) {
          socket.setTimeout(finish, 50);
          return;
        }
        if (acked) delivered.add(ownDelivered);
        socket.close();
      };
      socket.setTimeout(finish, SESSION_MS);
    });
  });
  check(res, { "upgraded (101)": (r) => r && r.status === 101 });
}
