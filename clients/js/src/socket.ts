/**
 * The WebSocket implementation: the one given in the options, else `ws` in Node (Node 20 has
 * no global WebSocket, and `ws` can send headers and cap message sizes), else the browser's.
 * `ws` is loaded with a dynamic import only in Node, so a browser never loads it and a
 * bundler resolves it to its small browser stub.
 */

export interface SocketLike {
  readonly readyState: number;
  readonly protocol: string;
  binaryType: string;
  send(data: string | Uint8Array): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}

/** What `new WebSocket(url, protocols)` is in browsers (the `WebSocket` option). */
export type SocketConstructor = new (url: string, protocols?: string | string[]) => unknown;

export interface OpenOptions {
  headers: Record<string, string>;
  maxPayload: number;
}

export type SocketFactory = {
  open(url: string, protocol: string, options: OpenOptions): SocketLike;
  /** Whether `headers` reach the relay (not in browsers). */
  readonly headers: boolean;
};

export const OPEN = 1;

function inNode(): boolean {
  const proc = (globalThis as { process?: { versions?: { node?: unknown } } }).process;
  return typeof proc?.versions?.node === "string";
}

export async function socketFactory(given?: SocketConstructor): Promise<SocketFactory> {
  if (given === undefined && inNode()) {
    const { WebSocket } = await import("ws");
    return {
      headers: true,
      open: (url, protocol, options) =>
        new WebSocket(url, [protocol], {
          headers: options.headers,
          maxPayload: options.maxPayload,
          // The relay writes one pre-built frame to every member: no compression.
          perMessageDeflate: false,
        }) as unknown as SocketLike,
    };
  }
  const ctor = given ?? (globalThis as { WebSocket?: SocketConstructor }).WebSocket;
  if (ctor === undefined) throw new Error("no WebSocket implementation: pass the WebSocket option");
  return { headers: false, open: (url, protocol) => new ctor(url, [protocol]) as SocketLike };
}
