/** Why a connect or a request failed. */
export type ErrorKind =
  /** The server answered with an Error frame; `code` is its ErrorCode (401, 403, 503, ...). */
  | "server"
  /** The upgrade got an HTTP error (seen only where the platform shows it: Node with `ws`). */
  | "http"
  /** The server closed the socket before the session started; `code` is the close code. */
  | "closed"
  /** The socket could not be opened (browsers say no more than that). */
  | "dial"
  /** The connection dropped while the request was in flight: retry it (publish: same client message id). */
  | "disconnected"
  /** No reply (or no connection) within the request timeout. */
  | "timeout"
  /** The client was closed, or stopped for good after a terminal close. */
  | "clientClosed"
  /** The server sent something that does not fit the protocol. */
  | "protocol";

export class SwitchboardError extends Error {
  readonly kind: ErrorKind;
  /** The Error frame's code, the HTTP status, or the close code. */
  readonly code: number | undefined;
  /** HTTP Retry-After in ms, when seen. */
  readonly retryAfterMs: number | undefined;

  constructor(kind: ErrorKind, message: string, code?: number, retryAfterMs?: number) {
    super(message);
    this.name = "SwitchboardError";
    this.kind = kind;
    this.code = code;
    this.retryAfterMs = retryAfterMs;
  }

  /** Whether the same request may succeed later (dropped, timed out, 429, 500, 503). */
  get retryable(): boolean {
    switch (this.kind) {
      case "disconnected":
      case "timeout":
      case "dial":
        return true;
      case "server":
        return this.code === 429 || this.code === 500 || this.code === 503;
      case "http":
        return this.code === 408 || this.code === 429 || (this.code ?? 0) >= 500;
      default:
        return false;
    }
  }
}
