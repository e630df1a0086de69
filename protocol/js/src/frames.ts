// The frames of protocol/proto/switchboard/v1/switchboard.proto as the SDK
// sees them: the proto3 JSON shape (lowerCamelCase, one key per oneof case),
// with 64-bit integers as JS numbers and `bytes` as Uint8Array. Both codecs
// (JSON in codec.ts, protobuf in proto.ts) turn wire bytes into these; a
// unit test checks the JSON codec against the protobuf-es types generated
// from the .proto, so the two cannot drift apart.
//
// Seqs and times are numbers: exact up to 2^53, which a stream would need
// nine quadrillion messages to pass.

export type ReceiptKind = "RECEIPT_KIND_DELIVERED" | "RECEIPT_KIND_READ";

export interface Connect {
  token?: string;
  clientName?: string;
  clientVersion?: string;
  userSince?: number;
  userEpoch?: string;
}
export interface Subscribe { chat: string; since?: number; epoch?: string; token?: string }
export interface Unsubscribe { chat: string }
export interface Publish { chat?: string; user?: string; clientMsgId: string; payload: Uint8Array }
export interface Receipt { chat?: string; user?: string; seq: number; kind: ReceiptKind }
export interface RefreshToken { token: string }
export interface WatchPresence { users: string[] }
export interface Typing { chat: string }

/** Everything a client sends: an id and exactly one request. */
export interface ClientFrame {
  id?: number;
  connect?: Connect;
  subscribe?: Subscribe;
  unsubscribe?: Unsubscribe;
  publish?: Publish;
  receipt?: Receipt;
  ping?: Record<string, never>;
  refresh?: RefreshToken;
  watchPresence?: WatchPresence;
  unwatchPresence?: WatchPresence;
  typing?: Typing;
}

export interface StreamPosition {
  /** Last seq assigned in the stream (0: nothing yet). */
  seq: number;
  /** Identity of the stream's history; it changes when history is lost. */
  epoch: string;
  /** Missed messages delivered right after this result. */
  recovered: number;
  /** `since` could not be honoured: re-sync the stream from the backend. */
  resyncRequired: boolean;
}

export interface ConnectResult {
  sessionId: string;
  user: string;
  serverTimeMs: number;
  heartbeatIntervalMs: number;
  tokenExpiresAtMs: number;
  userStream: StreamPosition;
  node: string;
}
export interface SubscribeResult { chat: string; position: StreamPosition }
export interface PublishAck { chat: string; user: string; seq: number; timestampMs: number; duplicate: boolean }
/** A sequenced message: `chat` set for a chat, `user` for the personal stream. */
export interface Delivery {
  chat: string;
  user: string;
  seq: number;
  sender: string;
  timestampMs: number;
  payload: Uint8Array;
  clientMsgId: string;
  epoch: string;
}
export interface ReceiptEvent { chat: string; from: string; seq: number; kind: ReceiptKind | "RECEIPT_KIND_UNSPECIFIED"; timestampMs: number }
export interface PresenceEvent { user: string; online: boolean; lastSeenMs: number; devices: number }
export interface Pong { serverTimeMs: number }
export interface RefreshResult { tokenExpiresAtMs: number }
export interface ErrorFrame { code: number; message: string }
export interface Disconnect { code: number; reason: string; reconnect: boolean; reconnectDelayMs: number }
export interface TokenExpiring { tokenExpiresAtMs: number }
export interface TypingEvent { chat: string; user: string }
export interface Unsubscribed { chat: string; reason: string }

/** Everything a server sends: an id (0 for pushes) and one kind. */
export interface ServerFrame {
  id: number;
  connectResult?: ConnectResult;
  subscribeResult?: SubscribeResult;
  ok?: Record<string, never>;
  publishAck?: PublishAck;
  delivery?: Delivery;
  receipt?: ReceiptEvent;
  presence?: PresenceEvent;
  pong?: Pong;
  refreshResult?: RefreshResult;
  error?: ErrorFrame;
  disconnect?: Disconnect;
  tokenExpiring?: TokenExpiring;
  typing?: TypingEvent;
  unsubscribed?: Unsubscribed;
}

/** The kinds of server frame, in .proto order. */
export const SERVER_KINDS = [
  "connectResult", "subscribeResult", "ok", "publishAck", "delivery", "receipt", "presence",
  "pong", "refreshResult", "error", "disconnect", "tokenExpiring", "typing", "unsubscribed",
] as const;

/** Turns wire bytes into frames and back; one per subprotocol. */
export interface Codec {
  /** The WebSocket subprotocol offered. */
  readonly subprotocol: string;
  /** Binary frames (protobuf) or text frames (JSON). */
  readonly binary: boolean;
  encode(frame: ClientFrame): string | Uint8Array;
  /** Throws on a frame that does not decode. */
  decode(data: string | ArrayBuffer | Uint8Array): ServerFrame;
}
