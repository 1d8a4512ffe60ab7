/** Every error this package raises on purpose. */
export class KasagiError extends Error {
  override name = "KasagiError";
}

/** The relay refused a request: `code` is docs/protocol.md's error code (bad_patch, ...). */
export class RelayError extends KasagiError {
  override name = "RelayError";
  constructor(
    readonly code: string,
    message: string,
    readonly room?: string,
  ) {
    super(`${code}: ${message}`);
  }
}

/**
 * The connection ended in a way the client does not retry by itself (a close code such as
 * 1008 or 1009, or `maxAttempts` failed attempts). `closeCode` is the WebSocket close code,
 * when there was one. The next request (join, send, connect) connects again.
 */
export class ConnectionError extends KasagiError {
  override name = "ConnectionError";
  constructor(
    message: string,
    readonly closeCode?: number,
    readonly reason?: string,
  ) {
    super(message);
  }
}

/** `client.close()` was called, or the room was left, before the request finished. */
export class ClientClosedError extends KasagiError {
  override name = "ClientClosedError";
}
