// The TypeScript SDK in headless Chromium (playwright-core, Debian's
// chromium): the SDK and agent.mjs bundled by esbuild into one script,
// injected into a blank page; every call crosses with page.evaluate. The
// page's WebSocket is the browser's own: it cannot see a refused
// upgrade's status or headers.
import { build } from "esbuild";
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));

export async function browserDriver() {
  const bundle = await build({
    stdin: {
      contents: `import { makeAgent } from "../agent.mjs";
        const agents = []; 
        window.__sb = {
          open() { agents.push(makeAgent(WebSocket, (user, why) => window.__sbToken(user, why))); return agents.length - 1; },
          connect(i, o) { return agents[i].connect(o); },
          call(i, m, a) { return agents[i].call(m, a); },
          drain(i) { return agents[i].drain(); },
        };`,
      resolveDir: join(here), loader: "js",
    },
    bundle: true, format: "iife", platform: "browser", target: "es2022", write: false,
  });
  const code = bundle.outputFiles[0].text;
  const profile = mkdtempSync(join(tmpdir(), "sb-conformance-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  let tokenFn = () => "";
  const errors = [];
  const page = await context.newPage();
  page.on("pageerror", (e) => errors.push(e.message));
  await page.exposeFunction("__sbToken", (user, why) => tokenFn(user, why));
  await page.setContent("<!doctype html><title>conformance</title>");
  await page.addScriptTag({ content: code });
  return {
    name: "browser",
    caps: { seesUpgradeStatus: false },
    errors,
    open: async (getToken) => {
      tokenFn = getToken;
      const i = await page.evaluate(() => window.__sb.open());
      return {
        connect: (o) => page.evaluate(([i, o]) => window.__sb.connect(i, o), [i, o]),
        call: (m, a) => page.evaluate(([i, m, a]) => window.__sb.call(i, m, a), [i, m, a]),
        drain: () => page.evaluate((i) => window.__sb.drain(i), i),
      };
    },
    stop: async () => {
      await context.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
}
