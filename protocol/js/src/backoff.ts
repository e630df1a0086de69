// How long to wait before the next reconnect attempt.

/** The backoff step for an attempt: base * 2^attempt, capped at max. */
export function step(baseMs: number, maxMs: number, attempt: number): number {
  return Math.min(baseMs * 2 ** Math.min(attempt, 31), maxMs);
}

/** Full jitter: uniform in [0, step], so a crowd dropped together does not come back together. */
export function fullJitter(baseMs: number, maxMs: number, attempt: number, random: () => number = Math.random): number {
  return random() * step(baseMs, maxMs, attempt);
}

/** After an HTTP Retry-After: at least what the server asked, spread over as much again (at most max). */
export function afterRetryAfter(retryAfterMs: number, maxMs: number, random: () => number = Math.random): number {
  return retryAfterMs + random() * Math.min(retryAfterMs, maxMs);
}

/**
 * Whether a close code advises reconnecting: 4000-4499 yes, 4500-4999 no;
 * standard codes yes, except those saying our frames were wrong (a new
 * socket would repeat them). No close frame (1005, 1006) means yes.
 */
export function reconnectAdvised(code: number | undefined): boolean {
  if (code === undefined) return true;
  if (code >= 4000 && code < 4500) return true;
  return ![1002, 1003, 1007, 1008, 1010].includes(code) && !(code >= 4500 && code <= 4999);
}

/** Protocol error codes that mean "try again later". */
export const retryableCode = (code: number): boolean => code === 429 || code === 500 || code === 503;
