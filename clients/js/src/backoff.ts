/**
 * Full-jitter backoff (docs/protocol.md, client behaviour):
 * random(0, min(maxDelay, minDelay * 2^attempt)), in milliseconds.
 */
export function backoffDelay(
  attempt: number,
  minDelay: number,
  maxDelay: number,
  random: () => number = Math.random,
): number {
  // Capped before the power so that a long outage cannot overflow to Infinity.
  const ceiling = attempt >= 64 ? maxDelay : Math.min(maxDelay, minDelay * 2 ** attempt);
  return random() * ceiling;
}

/** Close codes after which the client reconnects and resumes (docs/protocol.md, "Close codes"). */
export const RECONNECT_CODES: ReadonlySet<number> = new Set([1001, 1006, 1011, 1012, 1013]);
/** Policy: never retried by itself, except a connection closed while idle (see client.ts). */
export const CLOSE_POLICY = 1008;
/** Token expired (v1.1): retried with a fresh token from `getToken`. */
export const TOKEN_EXPIRED = 4001;
