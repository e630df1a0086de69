// The resume and de-dup rules, case by case (as protocol/src/client/cursor.rs).
import { test } from "node:test";
import assert from "node:assert/strict";
import { Cursors } from "../dist/index.js";

const chat = (c, seq, epoch) => ({ chat: c, user: "", seq, epoch });
const personal = (seq, epoch) => ({ chat: "", user: "me", seq, epoch });
const pos = (seq, epoch, recovered, resyncRequired) => ({ seq, epoch, recovered, resyncRequired });
const NEW = { duplicate: false };
const DUP = { duplicate: true };

test("drops seqs already seen", () => {
  const c = new Cursors();
  assert.equal(c.onPosition("room", undefined, pos(4, "e", 0, false)), undefined);
  assert.deepEqual(c.onDelivery(chat("room", 4, "e")), DUP);
  assert.deepEqual(c.onDelivery(chat("room", 5, "e")), NEW);
  assert.deepEqual(c.onDelivery(chat("room", 5, "e")), DUP);
  assert.deepEqual(c.onDelivery(chat("room", 3, "e")), DUP);
  assert.deepEqual(c.onDelivery(chat("room", 6, "e")), NEW);
  assert.equal(c.snapshot().chats.room.seq, 6);
});

test("streams are independent", () => {
  const c = new Cursors({ seq: 2, epoch: "p" });
  c.onPosition("a", undefined, pos(0, "", 0, false));
  c.onPosition("b", undefined, pos(0, "", 0, false));
  assert.deepEqual(c.onDelivery(chat("a", 1, "x")), NEW);
  assert.deepEqual(c.onDelivery(chat("b", 1, "y")), NEW);
  assert.deepEqual(c.onDelivery(personal(3, "p")), NEW);
  assert.deepEqual(c.onDelivery(personal(2, "p")), DUP);
  assert.deepEqual(c.onDelivery(chat("a", 1, "x")), DUP);
  const s = c.snapshot();
  assert.equal(s.personal.seq, 3);
  assert.equal(s.chats.a.epoch, "x");
});

test("recovery from since accepts everything after it", () => {
  const c = new Cursors();
  assert.equal(c.onPosition("room", 3, pos(6, "e", 3, false)), undefined);
  for (const seq of [4, 5, 6, 7]) assert.deepEqual(c.onDelivery(chat("room", seq, "e")), NEW);
});

test("a gap is reported once and delivery goes on", () => {
  const c = new Cursors();
  c.onPosition("room", undefined, pos(1, "e", 0, false));
  assert.deepEqual(c.onDelivery(chat("room", 4, "e")), { duplicate: false, hole: 1 });
  assert.deepEqual(c.onDelivery(chat("room", 5, "e")), NEW);
  assert.deepEqual(c.onDelivery(chat("room", 3, "e")), DUP);
});

test("history window too short: the hole comes from the position", () => {
  const c = new Cursors();
  assert.equal(c.onPosition("room", 2, pos(10, "e", 3, true)), 2);
  assert.deepEqual(c.onDelivery(chat("room", 8, "e")), NEW);
  assert.deepEqual(c.onDelivery(chat("room", 9, "e")), NEW);
});

test("epoch change without recovery starts from the new position", () => {
  const c = new Cursors({ seq: 50, epoch: "old" });
  assert.equal(c.onPosition(undefined, 50, pos(2, "new", 0, true)), 50);
  assert.deepEqual(c.snapshot().personal, { seq: 2, epoch: "new" });
  assert.deepEqual(c.onDelivery(personal(2, "new")), DUP);
  assert.deepEqual(c.onDelivery(personal(3, "new")), NEW);
});

test("a new epoch on a delivery is a hole", () => {
  const c = new Cursors();
  c.onPosition("room", undefined, pos(7, "old", 0, false));
  assert.deepEqual(c.onDelivery(chat("room", 1, "new")), { duplicate: false, hole: 7 });
  assert.deepEqual(c.onDelivery(chat("room", 1, "new")), DUP);
  assert.deepEqual(c.onDelivery(chat("room", 2, "new")), NEW);
});

test("unfollowed chats pass through untracked", () => {
  const c = new Cursors();
  c.onPosition("room", undefined, pos(0, "e", 0, false));
  c.forget("room");
  assert.deepEqual(c.onDelivery(chat("room", 1, "e")), NEW);
  assert.deepEqual(c.onDelivery(chat("room", 1, "e")), NEW);
  assert.deepEqual(c.snapshot().chats, {});
});
