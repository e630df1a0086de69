// Runs the conformance suite against one client.
// Usage: node conformance/run.mjs --client ts-node|ts-node-proto|ts-browser|rust
//          [--only id,id] [--out results.json]
// Needs EDGE_BIN and ROUTER_BIN (the system tests' binaries), AGENT_BIN for
// rust, nats-server and redis-server on PATH, and for ts-browser Debian's
// chromium ($CHROMIUM). edge/system/tests/conformance.rs runs it for every
// client and checks the table in docs/clients.md.
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { Cluster, Edge, FaultProxy, mint } from "./harness.mjs";
import { scenarios } from "./scenarios.mjs";
import { Handle } from "./drivers/handle.mjs";
import { nodeDriver } from "./drivers/node.mjs";
import { jsonCodec } from "../dist/index.js";
import { protobufCodec } from "../dist/proto.js";

const here = dirname(fileURLToPath(import.meta.url));
export const SCENARIOS_FILE = join(here, "../../conformance/scenarios.json");

const { values } = parseArgs({ options: { client: { type: "string" }, only: { type: "string" }, out: { type: "string" } } });
const CLIENTS = {
  "ts-node": { driver: nodeDriver, encoding: "json" },
  "ts-node-proto": { driver: nodeDriver, encoding: "proto" },
  "ts-browser": { driver: async () => (await import("./drivers/browser.mjs")).browserDriver(), encoding: "json" },
  "rust": { driver: async () => (await import("./drivers/rust.mjs")).rustDriver(), encoding: "proto" },
};
const client = CLIENTS[values.client];
if (!client) {
  console.error(`--client must be one of ${Object.keys(CLIENTS).join(", ")}`);
  process.exit(2);
}
const list = JSON.parse(readFileSync(SCENARIOS_FILE, "utf8")).scenarios;
const only = values.only ? new Set(values.only.split(",")) : undefined;
const SCENARIO_TIMEOUT_MS = 60_000;

const driver = await client.driver();
const results = [];
let run = 0;
for (const s of list) {
  if (only && !only.has(s.id)) continue;
  if (s.skip?.[values.client]) {
    results.push({ id: s.id, status: "skipped", why: s.skip[values.client] });
    continue;
  }
  const impl = scenarios[s.id];
  const cleanup = [];
  const tag = `${++run}${Math.random().toString(36).slice(2, 7)}`;
  const codec = client.encoding === "proto" ? protobufCodec : jsonCodec;
  const h = {
    tag,
    caps: driver.caps,
    user: (name) => `${name}-${tag}`,
    chat: (name) => `${name}-${tag}`,
    async edge(env = {}, cluster, node = "edge", more = {}) {
      const e = await Edge.start({ env, cluster, node, ...more });
      cleanup.push(() => e.kill());
      return e;
    },
    async cluster() {
      const c = await Cluster.start();
      cleanup.push(() => c.stop());
      return c;
    },
    async proxy(target) {
      const p = await FaultProxy.start(target, (d, binary) => codec.decode(binary ? new Uint8Array(d) : d.toString()));
      cleanup.push(() => p.stop());
      return p;
    },
    async tryConnect(name, o) {
      const user = h.user(name);
      // Tokens the client asks for later live refreshTtlSecs (default: as the first).
      const backend = await driver.open((u, _why) => mint(u, o.refreshTtlSecs ?? o.ttlSecs ?? 3600));
      const r = await backend.connect({ user, token: mint(user, o.ttlSecs ?? 3600), encoding: client.encoding, ...o });
      if (r.ok) {
        const handle = new Handle(backend, user);
        handle.session = r.ok;
        cleanup.unshift(() => handle.close().catch(() => {}));
        return { ok: handle };
      }
      return r;
    },
    async client(name, o) {
      const r = await h.tryConnect(name, o);
      if (r.err) throw new Error(`connect failed: ${JSON.stringify(r.err)}`);
      return r.ok;
    },
  };
  const started = Date.now();
  let status = "passed";
  let error;
  try {
    if (!impl) throw new Error("no implementation in conformance/scenarios.mjs");
    let timer;
    await Promise.race([impl(h), new Promise((_, rej) => { timer = setTimeout(() => rej(new Error("scenario timed out")), SCENARIO_TIMEOUT_MS); })]);
    clearTimeout(timer);
  } catch (e) {
    status = "failed";
    error = e.stack ?? String(e);
  }
  for (const c of cleanup) await Promise.resolve().then(c).catch(() => {});
  const ms = Date.now() - started;
  results.push({ id: s.id, status, ms, ...(error ? { error } : {}) });
  console.log(`${status === "passed" ? "ok  " : "FAIL"} ${values.client} ${s.id} (${ms} ms)${error ? "\n" + error : ""}`);
}
await driver.stop();
if (driver.errors?.length) console.log(`page errors:\n${driver.errors.join("\n")}`);
if (values.out) writeFileSync(values.out, JSON.stringify({ client: values.client, results }, null, 1));
const failed = results.filter((r) => r.status === "failed").length;
console.log(`${values.client}: ${results.filter((r) => r.status === "passed").length} passed, ${failed} failed, ${results.filter((r) => r.status === "skipped").length} skipped`);
process.exit(failed ? 1 : 0);
