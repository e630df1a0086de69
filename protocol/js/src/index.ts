// Switchboard client for browsers and Node >= 20. Start with Client.connect;
// docs/clients.md describes the contract every client keeps.
export { Client, newMessageId } from "./client.js";
export type { ClientEvents, ClientOptions, ClientState, ResubscribeFailure, WebSocketConstructor, WebSocketLike } from "./client.js";
export { jsonCodec, text, toBytes, base64Decode, base64Encode } from "./codec.js";
export { Cursors } from "./cursors.js";
export type { Cursor, StreamId } from "./cursors.js";
export { fullJitter, afterRetryAfter, reconnectAdvised } from "./backoff.js";
export { SwitchboardError } from "./errors.js";
export type { ErrorKind } from "./errors.js";
export type * from "./frames.js";
