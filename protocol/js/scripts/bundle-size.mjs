// Measures what the SDK adds to an app: each entry bundled on its own by
// esbuild (ESM, minified, browser target, everything it imports included),
// then gzipped at level 9. Prints one JSON line per entry, and fails when
// the JSON-only client passes its budget (BUDGET_JSON_GZIP_BYTES).
// Usage: npm run bundle   (after npm run build)
import { build } from "esbuild";
import { gzipSync } from "node:zlib";

const BUDGET_JSON_GZIP_BYTES = 8 * 1024;
const entries = {
  "json client": 'export { Client, jsonCodec } from "./dist/index.js";',
  "json + protobuf client": 'export { Client } from "./dist/index.js"; export { protobufCodec } from "./dist/proto.js";',
};
let over = false;
for (const [name, contents] of Object.entries(entries)) {
  const out = await build({
    stdin: { contents, resolveDir: process.cwd(), loader: "js" },
    bundle: true, minify: true, format: "esm", platform: "browser", target: "es2022", write: false,
  });
  const bytes = out.outputFiles[0].contents;
  const gzip = gzipSync(bytes, { level: 9 }).length;
  console.log(JSON.stringify({ entry: name, minified_bytes: bytes.length, gzip_bytes: gzip }));
  if (name === "json client" && gzip > BUDGET_JSON_GZIP_BYTES) over = true;
}
if (over) {
  console.error(`the JSON client is over its budget of ${BUDGET_JSON_GZIP_BYTES} gzipped bytes`);
  process.exit(1);
}
