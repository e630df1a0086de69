// Two headless Chromium pages chat through the dev-mode demo page.
// Usage: node chat.mjs http://127.0.0.1:PORT
// Exit 0 when both pages negotiated permessage-deflate (Chromium offers it
// by default) and page 2 shows the messages page 1 sent, a short one and
// one long enough to travel compressed; 1 otherwise.
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const base = (process.argv[2] || "").replace(/\/+$/, "");
if (!base) {
  console.error("usage: node chat.mjs <base-url>");
  process.exit(2);
}
// Never hang: the whole run gets one minute.
const watchdog = setTimeout(() => {
  console.error("browser test timed out");
  process.exit(1);
}, 60_000);

const profile = mkdtempSync(join(tmpdir(), "sb-chromium-"));
const tag = Math.random().toString(36).slice(2, 8);
const errors = [];
let browser;
let failed = false;
try {
  browser = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  const open = async (user) => {
    const page = await browser.newPage();
    page.on("console", (m) => { if (m.type() === "error") errors.push(`${user}: ${m.text()}`); });
    page.on("pageerror", (e) => errors.push(`${user}: ${e.message}`));
    await page.goto(base + "/");
    await page.fill("#user", user);
    await page.fill("#chat", "room-" + tag);
    await page.click("#connect");
    await page.waitForFunction(() => document.querySelector("#status").textContent === "connected", null, { timeout: 10_000 });
    return page;
  };
  const alice = await open("alice-" + tag);
  const bob = await open("bob-" + tag);
  for (const page of [alice, bob]) {
    // The demo page's socket (a top-level `let` of its script).
    const extensions = await page.evaluate(() => ws && ws.extensions);
    if (!String(extensions).startsWith("permessage-deflate")) {
      throw new Error(`permessage-deflate not negotiated: extensions ${JSON.stringify(extensions)}`);
    }
  }
  const short = "hello from alice ✓ " + tag;
  // Over the edge's 256-byte threshold once framed: sent compressed.
  const long = "a longer one, ünïcödé included, " + tag + ": " + "the quick brown fox jumps over the lazy dog ".repeat(20);
  for (const text of [short, long]) {
    await alice.fill("#text", text);
    await alice.click("#send");
    const shown = (page) => page.waitForFunction(
      (t) => [...document.querySelectorAll("#messages li.message")].some((li) => li.textContent.includes(t)),
      text,
      { timeout: 10_000 },
    );
    await shown(bob);
    await shown(alice);
    // Exactly once on each page, despite at-least-once delivery.
    for (const page of [alice, bob]) {
      const count = await page.$$eval("#messages li.message", (lis, t) => lis.filter((li) => li.textContent.includes(t)).length, text);
      if (count !== 1) throw new Error(`message shown ${count} times`);
    }
  }
  console.log("ok: permessage-deflate negotiated; bob's page shows alice's messages");
} catch (e) {
  failed = true;
  console.error("browser test failed:", e.message);
  for (const err of errors) console.error("page error:", err);
} finally {
  if (browser) await browser.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
  clearTimeout(watchdog);
}
process.exit(failed ? 1 : 0);
