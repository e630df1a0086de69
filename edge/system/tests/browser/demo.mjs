// The dev-mode demo page (edge/assets/demo.html, on the TypeScript SDK) in
// headless Chromium: alice and bob see each other online, exchange group
// messages and DMs, see typing and read ticks; the edge is restarted
// (SIGTERM, then started again on its port) mid-conversation, messages are
// sent while it is down, and afterwards every message is shown exactly
// once, in order, on both pages. Chromium offers permessage-deflate by
// itself: the edge must have negotiated it and compressed a long message.
// Usage: EDGE_BIN=... ROUTER_BIN=... node demo.mjs   (run by browser.rs)
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Cluster, Edge } from "../../../../protocol/js/conformance/harness.mjs";

const watchdog = setTimeout(() => { console.error("demo test timed out"); process.exit(1); }, 120_000);
const tag = Math.random().toString(36).slice(2, 8);
const [alice, bob, room] = [`alice-${tag}`, `bob-${tag}`, `room-${tag}`];
const profile = mkdtempSync(join(tmpdir(), "sb-demo-chromium-"));
const errors = [];
let browser, cluster, edge, failed = false;
const T = { timeout: 15_000 };

const shown = (page, conv) => page.evaluate(async (conv) => {
  document.querySelector(`#conversations li[data-conv="${conv}"]`).click();
  return [...document.querySelectorAll("#messages li.message .text")].map((e) => e.textContent);
}, conv);

async function waitShown(page, conv, texts) {
  await page.locator(`#conversations li[data-conv="${conv}"]`).click();
  await page.waitForFunction((n) => document.querySelectorAll("#messages li.message").length >= n, texts.length, T)
    .catch(() => {});
  const got = await shown(page, conv);
  if (JSON.stringify(got) !== JSON.stringify(texts)) throw new Error(`${conv}: shown ${JSON.stringify(got)}, want ${JSON.stringify(texts)}`);
}

async function say(page, conv, text) {
  await page.locator(`#conversations li[data-conv="${conv}"]`).click();
  await page.fill("#text", text);
  await page.click("#send");
}

const live = (page) => page.waitForSelector('#status[data-state="live"]', T);

try {
  cluster = await Cluster.start();
  edge = await Edge.start({ cluster, node: "edge-1", env: { SWITCHBOARD_DEV: "true" } });
  const base = `http://127.0.0.1:${edge.port}`;
  browser = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const open = async (user, peer) => {
    const page = await browser.newPage();
    // Dials refused while the edge is down are expected; other console errors are not.
    page.on("console", (m) => { if (m.type() === "error" && !m.text().startsWith("WebSocket connection to")) errors.push(`${user}: ${m.text()}`); });
    page.on("pageerror", (e) => errors.push(`${user}: ${e.message}`));
    await page.goto(base + "/");
    await page.fill("#user", user);
    await page.click("#connect");
    await live(page);
    await page.fill("#contact", peer);
    await page.click("#add-contact");
    return page;
  };
  const a = await open(alice, bob);
  const b = await open(bob, alice);
  // Online: each sees the other.
  await a.waitForSelector(`#conversations li[data-conv="dm:${bob}"] .dot.online`, T);
  await b.waitForSelector(`#conversations li[data-conv="dm:${alice}"] .dot.online`, T);
  for (const page of [a, b]) {
    await page.fill("#group", room);
    await page.click("#join-group");
  }
  // Typing, in the group both have open.
  await a.locator("#text").press("h");
  await b.waitForFunction((u) => document.querySelector("#typing").textContent.includes(u), alice, T);
  await a.fill("#text", "");
  const long = "a longer one, ünïcödé included, " + "the quick brown fox jumps over the lazy dog ".repeat(20);
  await say(a, `chat:${room}`, "g1");
  await waitShown(b, `chat:${room}`, ["g1"]);
  await say(b, `chat:${room}`, long);
  await waitShown(a, `chat:${room}`, ["g1", long]);
  // Read ticks: bob has the group open, so alice's g1 turns read.
  await a.waitForSelector('#messages li.message.mine .ticks[data-ticks="read"]', T);
  // DMs, each with the other's conversation open.
  await say(a, `dm:${bob}`, "d1");
  await b.locator(`#conversations li[data-conv="dm:${alice}"]`).click();
  await waitShown(b, `dm:${alice}`, ["d1"]);
  await a.locator(`#conversations li[data-conv="dm:${bob}"]`).click();
  await a.waitForSelector('#messages li.message.mine .ticks[data-ticks="read"]', T);
  // Permessage-deflate: both pages negotiated it, the long message went out compressed.
  if ((await edge.metric("switchboard_edge_deflate_negotiated_total")) < 2) throw new Error("permessage-deflate not negotiated");
  if ((await edge.metric("switchboard_edge_deflate_compressed_frames_total", 'kind="shared"')) < 1) throw new Error("no compressed broadcast");
  if ((await edge.metric("switchboard_edge_deflate_inflated_frames_total")) < 1) throw new Error("Chromium sent nothing compressed");

  // The edge restarts mid-conversation; alice writes while it is down.
  const stopped = edge.terminate();
  await a.waitForSelector('#status[data-state="reconnecting"]', T);
  await b.waitForSelector('#status[data-state="reconnecting"]', T);
  await stopped;
  await say(a, `dm:${bob}`, "d2");
  await say(a, `dm:${bob}`, "d3");
  await say(a, `chat:${room}`, "g3");
  await edge.restart();
  await live(a);
  await live(b);
  await say(b, `dm:${alice}`, "d4");
  await say(b, `chat:${room}`, "g4");
  // Every message exactly once, in order, on both pages.
  for (const page of [a, b]) {
    await waitShown(page, `dm:${page === a ? bob : alice}`, ["d1", "d2", "d3", "d4"]);
    await waitShown(page, `chat:${room}`, ["g1", long, "g3", "g4"]);
  }
  // Alice's DMs are all read; presence came back after the restart.
  await a.locator(`#conversations li[data-conv="dm:${bob}"]`).click();
  await b.locator(`#conversations li[data-conv="dm:${alice}"]`).click();
  await a.waitForFunction(() => [...document.querySelectorAll("#messages li.message.mine .ticks")].every((t) => t.dataset.ticks === "read"), null, T);
  await a.waitForSelector(`#conversations li[data-conv="dm:${bob}"] .dot.online`, T);
  if (errors.length) throw new Error("page errors");
  console.log("ok: presence, typing, group and direct messages, read ticks, and an edge restart with every message shown once, in order");
} catch (e) {
  failed = true;
  console.error("demo test failed:", e.message);
  for (const err of errors) console.error("page error:", err);
  if (edge) console.error("edge log tail:", edge.proc.log.slice(-3000));
} finally {
  clearTimeout(watchdog);
  await browser?.close().catch(() => {});
  await edge?.kill().catch(() => {});
  await cluster?.stop().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
