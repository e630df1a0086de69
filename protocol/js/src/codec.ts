// The JSON subprotocol ("switchboard.v1.json"): the canonical proto3 JSON
// mapping, written by hand so JSON-only apps do not pay for a protobuf
// runtime. 64-bit integers go out as strings and are read from strings or
// numbers; bytes are standard base64; defaults are omitted on output and
// filled in on input; unknown fields and frame kinds are skipped.
import type { ClientFrame, Codec, ServerFrame, StreamPosition } from "./frames.js";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** UTF-8 bytes of a string, or the bytes themselves. */
export function toBytes(payload: Uint8Array | string): Uint8Array {
  return typeof payload === "string" ? encoder.encode(payload) : payload;
}

/** A payload as UTF-8 text. */
export function text(payload: Uint8Array): string {
  return decoder.decode(payload);
}

export function base64Encode(bytes: Uint8Array): string {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

export function base64Decode(b64: string): Uint8Array {
  const s = atob(b64);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

type Json = Record<string, unknown>;

const num = (v: unknown): number => (typeof v === "number" ? v : typeof v === "string" ? Number(v) : 0);
const str = (v: unknown): string => (typeof v === "string" ? v : "");
const bool = (v: unknown): boolean => v === true;
const obj = (v: unknown): Json => (v !== null && typeof v === "object" ? (v as Json) : {});

function position(v: unknown): StreamPosition {
  const p = obj(v);
  return { seq: num(p.seq), epoch: str(p.epoch), recovered: num(p.recovered), resyncRequired: bool(p.resyncRequired) };
}

/** Fills in defaults and converts types of one server frame's body. */
const readers: { [K in keyof ServerFrame]-?: (v: Json) => NonNullable<ServerFrame[K]> } = {
  id: () => 0,
  connectResult: (v) => ({
    sessionId: str(v.sessionId), user: str(v.user), serverTimeMs: num(v.serverTimeMs),
    heartbeatIntervalMs: num(v.heartbeatIntervalMs), tokenExpiresAtMs: num(v.tokenExpiresAtMs),
    userStream: position(v.userStream), node: str(v.node),
  }),
  subscribeResult: (v) => ({ chat: str(v.chat), position: position(v.position) }),
  ok: () => ({}),
  publishAck: (v) => ({
    chat: str(v.chat), user: str(v.user), seq: num(v.seq), timestampMs: num(v.timestampMs), duplicate: bool(v.duplicate),
  }),
  delivery: (v) => ({
    chat: str(v.chat), user: str(v.user), seq: num(v.seq), sender: str(v.sender), timestampMs: num(v.timestampMs),
    payload: base64Decode(str(v.payload)), clientMsgId: str(v.clientMsgId), epoch: str(v.epoch),
  }),
  receipt: (v) => ({
    chat: str(v.chat), from: str(v.from), seq: num(v.seq),
    kind: (typeof v.kind === "string" ? v.kind : v.kind === 2 ? "RECEIPT_KIND_READ" : v.kind === 1 ? "RECEIPT_KIND_DELIVERED" : "RECEIPT_KIND_UNSPECIFIED") as never,
    timestampMs: num(v.timestampMs),
  }),
  presence: (v) => ({ user: str(v.user), online: bool(v.online), lastSeenMs: num(v.lastSeenMs), devices: num(v.devices) }),
  pong: (v) => ({ serverTimeMs: num(v.serverTimeMs) }),
  refreshResult: (v) => ({ tokenExpiresAtMs: num(v.tokenExpiresAtMs) }),
  error: (v) => ({ code: num(v.code), message: str(v.message) }),
  disconnect: (v) => ({ code: num(v.code), reason: str(v.reason), reconnect: bool(v.reconnect), reconnectDelayMs: num(v.reconnectDelayMs) }),
  tokenExpiring: (v) => ({ tokenExpiresAtMs: num(v.tokenExpiresAtMs) }),
  typing: (v) => ({ chat: str(v.chat), user: str(v.user) }),
  unsubscribed: (v) => ({ chat: str(v.chat), reason: str(v.reason) }),
};

/** A server frame from its JSON form (already parsed). */
export function serverFrameFromJson(value: unknown): ServerFrame {
  const v = obj(value);
  const frame: ServerFrame = { id: num(v.id) };
  for (const key of Object.keys(v)) {
    if (key === "id" || !(key in readers)) continue;
    const read = readers[key as keyof ServerFrame] as (v: Json) => never;
    (frame as unknown as Json)[key] = read(obj(v[key]));
  }
  return frame;
}

/** The JSON form of a client frame (defaults omitted, 64-bit as strings). */
export function clientFrameToJson(frame: ClientFrame): Json {
  const out: Json = {};
  if (frame.id) out.id = frame.id;
  for (const [key, body] of Object.entries(frame)) {
    if (key === "id" || body === undefined) continue;
    const b: Json = {};
    for (const [k, v] of Object.entries(body as Json)) {
      if (v === undefined || v === "" || v === false) continue;
      if (v instanceof Uint8Array) {
        if (v.length) b[k] = base64Encode(v);
      } else if (k === "seq" || k === "since" || k === "userSince") {
        b[k] = String(v); // uint64: a string, so 0 survives for optional fields
      } else if (Array.isArray(v)) {
        if (v.length) b[k] = v;
      } else {
        b[k] = v;
      }
    }
    out[key] = b;
  }
  return out;
}

/** The JSON subprotocol. */
export const jsonCodec: Codec = {
  subprotocol: "switchboard.v1.json",
  binary: false,
  encode: (frame) => JSON.stringify(clientFrameToJson(frame)),
  decode: (data) => {
    const s = typeof data === "string" ? data : decoder.decode(data instanceof Uint8Array ? data : new Uint8Array(data));
    return serverFrameFromJson(JSON.parse(s));
  },
};
