import { test } from "node:test";
import assert from "node:assert/strict";
import { fullJitter, afterRetryAfter, reconnectAdvised } from "../dist/index.js";

test("full jitter stays within the doubling, capped step", () => {
  for (let attempt = 0; attempt < 40; attempt++) {
    const cap = Math.min(100 * 2 ** attempt, 10_000);
    const draws = Array.from({ length: 200 }, () => fullJitter(100, 10_000, attempt));
    assert.ok(draws.every((d) => d >= 0 && d <= cap));
    assert.ok(draws.some((d) => d < cap / 2) && draws.some((d) => d > cap / 2));
  }
  assert.equal(fullJitter(100, 10_000, 3, () => 0.5), 400);
});

test("Retry-After is honoured and spread", () => {
  const draws = Array.from({ length: 200 }, () => afterRetryAfter(2000, 10_000));
  assert.ok(draws.every((d) => d >= 2000 && d <= 4000));
  assert.ok(afterRetryAfter(60_000, 10_000) <= 70_000);
});

test("close codes advise by range", () => {
  assert.ok(reconnectAdvised(undefined));
  for (const c of [4000, 4001, 4005, 4499, 1001, 1006, 1011]) assert.ok(reconnectAdvised(c), String(c));
  for (const c of [4500, 4501, 4503, 4999, 1008, 1002]) assert.ok(!reconnectAdvised(c), String(c));
});
