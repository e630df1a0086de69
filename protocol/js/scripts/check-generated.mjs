// Fails when src/gen/ is not what `npm run generate` makes of the .proto
// today: generates into a temporary directory and compares file by file.
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, readdirSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";

const out = mkdtempSync(join(tmpdir(), "sb-gen-"));
try {
  execFileSync("npx", ["--no-install", "buf", "generate", "-o", out], { stdio: "inherit" });
  const files = (dir) => readdirSync(dir).flatMap((f) => (statSync(join(dir, f)).isDirectory() ? files(join(dir, f)) : [join(dir, f)]));
  const fresh = files(join(out, "src/gen")).map((f) => relative(out, f)).sort();
  const committed = files("src/gen").sort();
  const stale = fresh.length !== committed.length || fresh.some((f, i) => f !== committed[i] || readFileSync(join(out, f), "utf8") !== readFileSync(f, "utf8"));
  if (stale) {
    console.error("src/gen is stale: run `npm run generate` in protocol/js and commit the result");
    process.exit(1);
  }
  console.log("src/gen matches the .proto");
} finally {
  rmSync(out, { recursive: true, force: true });
}
