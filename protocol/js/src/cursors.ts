// Per-stream positions: de-duplication of deliveries and the `since` the
// client resumes from (the same rules as the Rust client's cursor.rs).
//
// Seqs of a stream start at 1 and are contiguous within an epoch. The
// client keeps the last seq it handed to the app per stream; a delivery at
// or below it is a duplicate (at-least-once on the wire becomes
// exactly-once for the app), one further ahead than the next seq is a hole
// the app must re-sync, and a new epoch means the server lost history.
import type { Delivery, StreamPosition } from "./frames.js";

/** Where the client stands in one stream. */
export interface Cursor { seq: number; epoch: string }

/** A stream: the personal one (`null`) or a chat. */
export type StreamId = { chat: string } | { personal: true };

export type Verdict = { duplicate: true } | { duplicate: false; hole?: number };

interface Entry { cursor: Cursor; holeReported: boolean }

export class Cursors {
  personal: Entry;
  readonly chats = new Map<string, Entry>();

  constructor(personal: Cursor = { seq: 0, epoch: "" }) {
    this.personal = { cursor: { ...personal }, holeReported: false };
  }

  /** Stops following a chat. */
  forget(chat: string): void {
    this.chats.delete(chat);
  }

  /** A copy of every position: where the client would resume from. */
  snapshot(): { personal: Cursor; chats: Record<string, Cursor> } {
    const chats: Record<string, Cursor> = {};
    for (const [c, e] of this.chats) chats[c] = { ...e.cursor };
    return { personal: { ...this.personal.cursor }, chats };
  }

  /**
   * Takes the position from a ConnectResult (chat undefined) or a
   * SubscribeResult; `since` is what the request asked for. Returns the
   * last seq seen when the server could not recover everything after it
   * (the app must re-sync), else undefined.
   */
  onPosition(chat: string | undefined, since: number | undefined, pos: StreamPosition): number | undefined {
    let seq: number;
    if (since === undefined) seq = pos.seq; // live only
    else if (pos.resyncRequired && pos.recovered === 0) seq = pos.seq; // nothing recovered
    else seq = since; // recovered deliveries (> since) follow
    const hole = pos.resyncRequired && since !== undefined;
    const entry: Entry = { cursor: { seq, epoch: pos.epoch }, holeReported: hole && pos.recovered > 0 };
    if (chat === undefined) this.personal = entry;
    else this.chats.set(chat, entry);
    return hole ? since : undefined;
  }

  /** Checks a delivery against its stream's cursor and advances it. */
  onDelivery(d: Delivery): Verdict {
    let entry: Entry | undefined;
    if (!d.chat) entry = this.personal;
    else {
      entry = this.chats.get(d.chat);
      // Not followed (a race with unsubscribe): pass through untracked.
      if (!entry) return { duplicate: false };
    }
    const cur = entry.cursor;
    const epochChanged = cur.epoch !== "" && d.epoch !== "" && cur.epoch !== d.epoch;
    let hole: number | undefined;
    if (epochChanged) hole = cur.seq;
    else if (d.seq <= cur.seq) return { duplicate: true };
    else if (d.seq > cur.seq + 1 && !entry.holeReported) hole = cur.seq;
    cur.seq = d.seq;
    if (d.epoch) cur.epoch = d.epoch;
    entry.holeReported = false;
    return hole === undefined ? { duplicate: false } : { duplicate: false, hole };
  }
}
