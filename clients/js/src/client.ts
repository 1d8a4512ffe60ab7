/**
 * The client: `Client` (one WebSocket connection, reconnected) and `Room` (one room's state).
 *
 * Protocol decisions are in protocol.ts (Sans-I/O); this module does the I/O around them, as
 * docs/protocol.md's client behaviour asks: after a close with 1001, 1006, 1011, 1012 or
 * 1013 (or a connection lost) it reconnects after a full-jitter backoff, joins every room
 * again with `since`, and sends every delta not yet acknowledged again with its idempotency
 * key. It never reconnects by itself after 1008, except that a connection the relay closed
 * for being idle (nothing joined, nothing pending) is opened again by the next request.
 */

import { CLOSE_POLICY, RECONNECT_CODES, TOKEN_EXPIRED, backoffDelay } from "./backoff.js";
import { Emitter } from "./emitter.js";
import { ClientClosedError, ConnectionError, KasagiError, RelayError } from "./errors.js";
import type { Delta, Json } from "./patch.js";
import {
  type Format,
  MAX_KEY_CHARS,
  type Member,
  ProtocolError,
  type Reply,
  type RequestId,
  RoomStream,
  SUBPROTOCOLS,
  checkDelta,
  checkRoom,
  deltaMessage,
  encodeMessage,
  joinMessage,
  parse,
} from "./protocol.js";
import { OPEN, type SocketConstructor, type SocketFactory, type SocketLike, socketFactory } from "./socket.js";

export type Status = "connecting" | "connected" | "disconnected";

export interface ClientOptions {
  /** Called before every connection; the token goes to the relay (identity is v1.1). */
  getToken?: () => string | Promise<string>;
  /** Backoff bounds in milliseconds: random(0, min(maxDelay, minDelay * 2^attempt)). */
  minDelay?: number;
  maxDelay?: number;
  /** kasagi.v1.json (default) or kasagi.v1.msgpack. */
  format?: Format;
  /** A WebSocket class; default: `ws` in Node, the global WebSocket in browsers. */
  WebSocket?: SocketConstructor;
  /** Consecutive failed connection attempts before giving up (default: no limit). */
  maxAttempts?: number;
  /** How often a delta or join answered `unavailable` is sent again (default 8). */
  unavailableRetries?: number;
  /** The largest message accepted from the relay, in Node (default 64 MiB). */
  maxMessageBytes?: number;
}

export interface SendOptions {
  /** The idempotency key (1 to 64 characters); a random one by default. */
  key?: string;
}

export interface ChangeInfo {
  /** The frame covers the room's deltas `from`..`seq`. */
  from: number;
  seq: number;
  /** As the relay sent it: only effective changes (docs/protocol.md). */
  delta: Delta;
}

export interface RoomOptions {
  /**
   * Follow who is in the room (docs/protocol.md, presence): `room.members` is read when the
   * join completes and kept up to date by the relay's `presence_join` / `presence_leave`;
   * the `presence` event fires with the members each time they change.
   */
  presence?: boolean;
}

export type ClientEvents = {
  status: (status: Status) => void;
  error: (error: KasagiError) => void;
};

export type RoomEvents = {
  change: (state: Json, info: ChangeInfo) => void;
  reset: (state: Json, info: { seq: number }) => void;
  presence: (members: Member[]) => void;
  error: (error: KasagiError) => void;
};

const DEFAULTS = {
  minDelay: 250,
  maxDelay: 10_000,
  format: "json" as Format,
  maxAttempts: Infinity,
  unavailableRetries: 8,
  maxMessageBytes: 64 * 1024 * 1024,
};

interface Outgoing {
  room: string;
  key: string;
  data: string | Uint8Array;
  resolve: (result: { seq: number }) => void;
  reject: (error: Error) => void;
  unavailable: number;
  sent: boolean;
}

interface Deferred<T> {
  promise: Promise<T>;
  resolve: (value: T) => void;
  reject: (error: Error) => void;
}

function deferred<T>(): Deferred<T> {
  let resolve!: (value: T) => void;
  let reject!: (error: Error) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/**
 * The relay's WebSocket URL. In a page, relative to it ("/ws" is the page's own relay), and
 * http(s) is taken as ws(s), so a page served by the relay needs no host name.
 */
function resolveUrl(url: string): string {
  const base = (globalThis as { location?: { href?: unknown } }).location?.href;
  const parsed = new URL(url, typeof base === "string" ? base : undefined);
  if (parsed.protocol === "http:") parsed.protocol = "ws:";
  else if (parsed.protocol === "https:") parsed.protocol = "wss:";
  if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
    throw new TypeError(`not a ws:, wss:, http: or https: URL: ${url}`);
  }
  return parsed.href;
}

function randomKey(): string {
  // getRandomValues, unlike randomUUID, exists outside secure contexts too (plain http pages).
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** One room: its `state` and `seq`, kept in step with the relay while joined. */
export class Room extends Emitter<RoomEvents> {
  /** The members (with the `presence` option), as the relay's presence reports them. */
  members: Member[] = [];
  /** @internal */
  readonly stream = new RoomStream();
  /** @internal the pending `join()`, until a `joined` or an error. */
  ready: Deferred<Room> | null = null;
  /** @internal joins answered `unavailable` in a row. */
  unavailable = 0;

  /** @internal use `client.room(name)` */
  constructor(
    private readonly client: Client,
    readonly name: string,
    readonly options: RoomOptions,
  ) {
    super();
  }

  /** The room's JSON document. Read-only: each change makes a new one, sharing what stayed. */
  get state(): Json {
    return this.stream.state;
  }

  /** The seq of `state`: the last delta of the room applied here (0 before the first join). */
  get seq(): number {
    return this.stream.seq ?? 0;
  }

  /** Joins the room; resolves once its state is here. After a reconnect it resumes by itself. */
  join(): Promise<Room> {
    return this.client.joinRoom(this);
  }

  /**
   * Sends a delta, `{ patch: [...] }` (RFC 6902) or `{ merge: {...} }` (RFC 7396); resolves
   * with the seq the relay gave it once acknowledged. A key is added: after a reconnect or
   * an `unavailable` the delta goes again with the same key, so it ends with exactly one
   * seq. Rejects with RelayError for a refusal (bad_patch, too_large, rate_limited, ...).
   * Joining is not needed to send.
   */
  send(delta: Delta, options: SendOptions = {}): Promise<{ seq: number }> {
    return this.client.sendDelta(this.name, delta, options);
  }

  /** Asks the relay who is in the room now (any relay of the deployment); needs no join. */
  presence(): Promise<Member[]> {
    return this.client.requestPresence(this);
  }

  /** Leaves the room; its state stays readable, and a later `join()` resumes from it. */
  leave(): Promise<void> {
    return this.client.leaveRoom(this);
  }

  /** @internal */
  fire<E extends keyof RoomEvents>(event: E, ...args: Parameters<RoomEvents[E]>): void {
    this.emit(event, ...args);
  }
}

/** Stands for the `auth` message in the order of requests (it has no id). */
const AUTH = Symbol("auth");

type Pending =
  | { kind: "join"; room: Room }
  | { kind: "leave"; room: Room; done: () => void }
  | { kind: "presence"; room: Room; done: (result: Member[] | Error) => void };

/** Refresh a token this long before it expires at most (and at half its life at least). */
const REFRESH_MARGIN_MS = 30_000;

/**
 * One connection to a relay, reconnected as docs/protocol.md's client behaviour says.
 *
 *     const client = new Client("ws://127.0.0.1:8765/ws");
 *     const room = client.room("lobby");
 *     await room.join();
 *     room.on("change", (state, { seq }) => render(state, seq));
 *     await room.send({ merge: { hp: 7 } });
 *
 * It connects on the first `join`, `send` or `connect()`.
 */
export class Client extends Emitter<ClientEvents> {
  readonly url: string;
  readonly format: Format;
  /** Close codes of every connection lost and reconnected (1006 for a lost connection). */
  readonly disconnects: number[] = [];
  /** Every time a room's stream had a gap (or a bad resume) and was joined again, and why. */
  readonly gaps: string[] = [];
  /** Deltas sent again: after a reconnect, and after an `unavailable`. */
  resent = 0;

  private readonly options: typeof DEFAULTS & ClientOptions;
  private readonly handles = new Map<string, Room>();
  /** Rooms joined or being joined: joined again after every reconnect. */
  private readonly rooms = new Map<string, Room>();
  private readonly unacked = new Map<string, Outgoing>();
  private readonly requests = new Map<RequestId, Pending>();
  /** Requests sent on this connection, oldest first: the relay answers them in order. */
  private sentOrder: (RequestId | typeof AUTH)[] = [];
  private readonly timers = new Set<ReturnType<typeof setTimeout>>();
  private ws: SocketLike | null = null;
  private live = false;
  private opening = false;
  private reconnectTimer: ReturnType<typeof setTimeout> | null = null;
  private attempt = 0;
  private nextId = 1;
  private closed = false;
  private authTimer: ReturnType<typeof setTimeout> | null = null;
  private statusValue: Status = "disconnected";
  private waiters: Deferred<undefined>[] = [];

  constructor(url: string, options: ClientOptions = {}) {
    super();
    this.url = resolveUrl(url);
    this.options = { ...DEFAULTS, ...options };
    this.format = this.options.format;
    if (!(this.format in SUBPROTOCOLS)) throw new TypeError(`format must be "json" or "msgpack"`);
  }

  get status(): Status {
    return this.statusValue;
  }

  /** The room `name` (the same object for the same name); `join()` it to follow it. */
  room(name: string, options: RoomOptions = {}): Room {
    checkRoom(name);
    let room = this.handles.get(name);
    if (room === undefined) {
      room = new Room(this, name, options);
      this.handles.set(name, room);
    }
    return room;
  }

  /** Resolves once connected (it connects if it is not); rejects if it cannot. */
  connect(): Promise<undefined> {
    if (this.closed) return Promise.reject(new ClientClosedError("client is closed"));
    if (this.live) return Promise.resolve(undefined);
    const waiter = deferred<undefined>();
    this.waiters.push(waiter);
    this.ensureConnecting();
    return waiter.promise;
  }

  /** Closes the connection for good; pending joins and sends reject with ClientClosedError. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    const error = new ClientClosedError("client closed");
    if (this.reconnectTimer !== null) clearTimeout(this.reconnectTimer);
    for (const timer of this.timers) clearTimeout(timer);
    this.timers.clear();
    const ws = this.ws;
    this.dropConnection();
    ws?.close(1000, "client closed");
    this.rejectAll(error, true);
    this.setStatus("disconnected");
  }

  // ------------------------------------------------------------------------ requests

  /** @internal */
  joinRoom(room: Room): Promise<Room> {
    if (this.closed) return Promise.reject(new ClientClosedError("client is closed"));
    if (this.rooms.get(room.name) === room) {
      // Joined (or joining): after a close that was not retried this connects again.
      this.ensureConnecting();
      return room.ready?.promise ?? Promise.resolve(room);
    }
    room.ready = deferred<Room>();
    this.rooms.set(room.name, room);
    if (this.live) this.sendJoin(room);
    else this.ensureConnecting();
    return room.ready.promise;
  }

  /** @internal */
  async leaveRoom(room: Room): Promise<void> {
    if (this.rooms.get(room.name) !== room) return;
    this.rooms.delete(room.name);
    room.ready?.reject(new ClientClosedError(`left ${room.name}`));
    room.ready = null;
    room.stream.rejoinSent();
    if (!this.live) return;
    const id = this.nextId++;
    // A lost connection ends the membership too: that resolves it as well.
    await new Promise<void>((done) => {
      this.requests.set(id, { kind: "leave", room, done });
      this.write({ t: "leave", room: room.name, id }, id);
    });
  }

  /** @internal */
  async requestPresence(room: Room): Promise<Member[]> {
    if (this.closed) throw new ClientClosedError("client is closed");
    await this.connect();
    const id = this.nextId++;
    return new Promise<Member[]>((resolve, reject) => {
      this.requests.set(id, {
        kind: "presence",
        room,
        done: (result) => { if (result instanceof Error) reject(result); else resolve(result); },
      });
      this.write({ t: "presence", room: room.name, id }, id);
    });
  }

  /** The members of a room joined with `presence`, read again after every (re)join. */
  private followPresence(room: Room): void {
    const id = this.nextId++;
    this.requests.set(id, {
      kind: "presence",
      room,
      // A relay without presence answers bad_message: the room just has no members list.
      done: () => undefined,
    });
    this.write({ t: "presence", room: room.name, id }, id);
  }

  /** Sends the `auth` message again with a fresh token before the current one expires. */
  private scheduleRefresh(exp: number): void {
    if (this.authTimer !== null) {
      clearTimeout(this.authTimer);
      this.timers.delete(this.authTimer);
    }
    this.authTimer = null;
    const getToken = this.options.getToken;
    const ws = this.ws;
    if (getToken === undefined || ws === null) return;
    const left = exp * 1000 - Date.now();
    const wait = Math.max(1000, left - Math.min(REFRESH_MARGIN_MS, left / 2));
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      this.authTimer = null;
      void (async () => {
        let token: string;
        try {
          token = await getToken();
        } catch (error) {
          // Not fatal yet: the relay closes with 4001 at expiry, and reconnecting asks again.
          this.emit("error", new KasagiError(`getToken failed: ${String(error)}`));
          return;
        }
        if (ws !== this.ws || !this.live || ws.readyState !== OPEN) return;
        this.sentOrder.push(AUTH);
        ws.send(encodeMessage(this.format, { t: "auth", token }));
      })();
    }, wait);
    this.authTimer = timer;
    this.timers.add(timer);
  }

  /** @internal */
  async sendDelta(roomName: string, delta: Delta, options: SendOptions): Promise<{ seq: number }> {
    if (this.closed) throw new ClientClosedError("client is closed");
    checkRoom(roomName);
    checkDelta(delta);
    const key = options.key ?? randomKey();
    if (typeof key !== "string" || key.length < 1 || key.length > MAX_KEY_CHARS) {
      throw new TypeError(`key must be 1-${MAX_KEY_CHARS} characters`);
    }
    if (this.unacked.has(key)) throw new TypeError(`a delta with key ${key} is already waiting for its ack`);
    // The key doubles as the request id: the message is encoded once and sent as is again.
    const data = encodeMessage(this.format, deltaMessage(roomName, delta, key, key));
    const result = deferred<{ seq: number }>();
    const out: Outgoing = {
      room: roomName,
      key,
      data,
      resolve: result.resolve,
      reject: result.reject,
      unavailable: 0,
      sent: false,
    };
    this.unacked.set(key, out);
    if (this.live) this.transmit(out);
    else this.ensureConnecting();
    return result.promise;
  }

  private transmit(out: Outgoing): void {
    if (out.sent) this.resent++;
    out.sent = true;
    this.writeRaw(out.data, out.key);
  }

  private sendJoin(room: Room): void {
    const id = this.nextId++;
    room.stream.rejoinSent();
    this.requests.set(id, { kind: "join", room });
    this.write(joinMessage(room.name, room.stream.since(), id, room.options.presence), id);
  }

  private write(message: Record<string, unknown>, id: RequestId): void {
    if (this.live) this.writeRaw(encodeMessage(this.format, message), id);
  }

  private writeRaw(data: string | Uint8Array, id: RequestId): void {
    const ws = this.ws;
    // Not connected: the next connection sends what still needs an answer.
    if (ws === null || !this.live || ws.readyState !== OPEN) return;
    this.sentOrder.push(id);
    ws.send(data);
  }

  // ------------------------------------------------------------------ the connection

  private setStatus(status: Status): void {
    if (status === this.statusValue) return;
    this.statusValue = status;
    this.emit("status", status);
  }

  private ensureConnecting(): void {
    if (this.closed || this.ws !== null || this.opening || this.reconnectTimer !== null) return;
    this.scheduleOpen(0);
  }

  private scheduleOpen(delay: number): void {
    this.setStatus("connecting");
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null;
      void this.open();
    }, delay);
  }

  private async open(): Promise<void> {
    this.opening = true;
    let ws: SocketLike;
    let factory: SocketFactory;
    let token: string | undefined;
    try {
      factory = await socketFactory(this.options.WebSocket);
    } catch (error) {
      this.opening = false;
      this.fail(new ConnectionError(`no WebSocket implementation: ${String(error)}`));
      return;
    }
    try {
      token = this.options.getToken === undefined ? undefined : await this.options.getToken();
    } catch (error) {
      // A token service that is down is retried like a relay that is down.
      this.opening = false;
      this.afterClose(1006, `getToken failed: ${String(error)}`);
      return;
    }
    this.opening = false;
    if (this.closed) return;
    const headers: Record<string, string> = token ? { Authorization: `Bearer ${token}` } : {};
    const protocol = SUBPROTOCOLS[this.format];
    try {
      ws = factory.open(this.url, protocol, { headers, maxPayload: this.options.maxMessageBytes });
    } catch (error) {
      this.fail(new ConnectionError(`cannot connect to ${this.url}: ${String(error)}`));
      return;
    }
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => {
      if (ws !== this.ws) return;
      if (ws.protocol !== protocol && this.format === "msgpack") {
        this.dropConnection();
        ws.close(1000);
        this.fail(new ConnectionError(`the relay did not accept ${protocol}`));
        return;
      }
      this.live = true;
      if (token && !factory.headers) {
        // Browsers cannot send headers: v1.1 identity takes the token as an `auth` message.
        this.sentOrder.push(AUTH);
        ws.send(encodeMessage(this.format, { t: "auth", token }));
      }
      this.resume();
      this.setStatus("connected");
      for (const waiter of this.waiters.splice(0)) waiter.resolve(undefined);
    };
    ws.onmessage = (event) => {
      if (ws !== this.ws) return;
      this.attempt = 0;
      let reply: Reply;
      try {
        reply = parse(event.data);
      } catch (error) {
        if (!(error instanceof ProtocolError)) throw error;
        this.emit("error", new KasagiError(`ignoring a malformed message from the relay: ${error.message}`));
        return;
      }
      this.dispatch(reply);
    };
    ws.onerror = () => {
      // A close event follows with the code; nothing to do here.
    };
    ws.onclose = (event) => {
      if (ws !== this.ws) return;
      this.dropConnection();
      this.afterClose(event.code, event.reason);
    };
  }

  /** Forget the current connection: its requests will never be answered. */
  private dropConnection(): void {
    if (this.ws !== null) {
      this.ws.onopen = this.ws.onmessage = this.ws.onclose = null;
    }
    this.ws = null;
    this.live = false;
    this.sentOrder = [];
    for (const pending of this.requests.values()) {
      if (pending.kind === "leave") pending.done();
      else if (pending.kind === "presence") pending.done(new ConnectionError("connection lost"));
    }
    if (this.authTimer !== null) {
      clearTimeout(this.authTimer);
      this.timers.delete(this.authTimer);
    }
    this.authTimer = null;
    this.requests.clear();
    for (const room of this.rooms.values()) room.stream.rejoinSent();
  }

  private afterClose(code: number, reason: string): void {
    if (this.closed) return;
    if (code === CLOSE_POLICY && this.rooms.size === 0 && this.unacked.size === 0) {
      // Nothing joined, nothing waiting: the relay's idle timeout (docs/protocol.md, close
      // codes). Not retried now; the next join or send connects again.
      this.setStatus("disconnected");
      return;
    }
    const retry = RECONNECT_CODES.has(code) || (code === TOKEN_EXPIRED && this.options.getToken !== undefined);
    if (!retry) {
      this.fail(new ConnectionError(`the relay closed the connection: ${code} ${reason}`.trim(), code, reason));
      return;
    }
    if (this.attempt >= this.options.maxAttempts) {
      this.fail(new ConnectionError(`gave up after ${this.attempt} attempts (last close ${code})`, code, reason));
      return;
    }
    this.disconnects.push(code);
    const delay = backoffDelay(this.attempt, this.options.minDelay, this.options.maxDelay);
    this.attempt++;
    this.scheduleOpen(delay);
  }

  private resume(): void {
    for (const room of this.rooms.values()) this.sendJoin(room);
    for (const out of this.unacked.values()) this.transmit(out);
  }

  /** Not retried: everything waiting fails; joined rooms are joined again by the next request. */
  private fail(error: ConnectionError): void {
    this.setStatus("disconnected");
    this.rejectAll(error, false);
    this.emit("error", error);
  }

  private rejectAll(error: KasagiError, forget: boolean): void {
    for (const waiter of this.waiters.splice(0)) waiter.reject(error);
    for (const out of this.unacked.values()) out.reject(error);
    this.unacked.clear();
    for (const room of [...this.rooms.values()]) {
      const ready = room.ready;
      if (ready !== null) {
        // A join that never completed is given up; a joined room resumes on the next request.
        room.ready = null;
        ready.reject(error);
        this.rooms.delete(room.name);
      } else if (forget) {
        this.rooms.delete(room.name);
      }
      if (!(error instanceof ClientClosedError)) room.fire("error", error);
    }
  }

  // ------------------------------------------------------------------------ replies

  /** The request an answer belongs to; an `error` without `id` answers the oldest one. */
  private answered(id: RequestId | undefined): RequestId | undefined {
    if (id === undefined) {
      // The `auth` message's answer (today's relay: bad_message) belongs to no request.
      const oldest = this.sentOrder.shift();
      return oldest === AUTH ? undefined : oldest;
    }
    const index = this.sentOrder.indexOf(id);
    if (index >= 0) this.sentOrder.splice(0, index + 1);
    return id;
  }

  private dispatch(reply: Reply): void {
    switch (reply.t) {
      case "delta": {
        const room = this.rooms.get(reply.room);
        if (room === undefined) return;
        const step = room.stream.onDelta(reply.from, reply.seq, reply.delta);
        if (step.kind === "applied") {
          room.fire("change", room.state, { from: step.from, seq: step.seq, delta: step.delta });
        } else if (step.kind === "rejoin") {
          this.gaps.push(`${room.name}: ${step.reason}`);
          this.sendJoin(room);
        }
        return;
      }
      case "ack": {
        const id = this.answered(reply.id);
        const out = id === undefined ? undefined : this.unacked.get(String(id));
        if (out === undefined) return;
        this.unacked.delete(out.key);
        out.resolve({ seq: reply.seq });
        return;
      }
      case "joined": {
        const id = this.answered(reply.id);
        if (id !== undefined) this.requests.delete(id);
        const room = this.rooms.get(reply.room);
        if (room === undefined) return;
        const step = room.stream.onJoined(reply.seq, reply.state);
        if (step.kind === "rejoin") {
          this.gaps.push(`${room.name}: ${step.reason}`);
          this.sendJoin(room);
          return;
        }
        room.unavailable = 0;
        if (room.options.presence === true) this.followPresence(room);
        const ready = room.ready;
        if (ready !== null) {
          room.ready = null;
          ready.resolve(room);
        } else if (step.kind === "replaced") {
          room.fire("reset", room.state, { seq: reply.seq });
        }
        return;
      }
      case "reset": {
        const room = this.rooms.get(reply.room);
        if (room === undefined) return;
        room.stream.onReset(reply.seq, reply.state);
        room.fire("reset", room.state, { seq: reply.seq });
        return;
      }
      case "presence": {
        const id = this.answered(reply.id);
        const pending = id === undefined ? undefined : this.requests.get(id);
        if (pending?.kind === "presence") {
          this.requests.delete(id as RequestId);
          pending.done(reply.members);
        }
        const room = this.handles.get(reply.room);
        if (room?.options.presence !== true) return;
        room.members = reply.members;
        room.fire("presence", room.members);
        return;
      }
      case "presence_join":
      case "presence_leave": {
        const room = this.rooms.get(reply.room);
        if (room?.options.presence !== true) return;
        const others = room.members.filter((m) => m.conn !== reply.member.conn);
        room.members = reply.t === "presence_join" ? [...others, reply.member] : others;
        room.fire("presence", room.members);
        return;
      }
      case "authed":
        this.answered(reply.id);
        if (reply.exp !== undefined) this.scheduleRefresh(reply.exp);
        return;
      case "left": {
        const id = this.answered(reply.id);
        const pending = id === undefined ? undefined : this.requests.get(id);
        if (pending?.kind === "leave") {
          this.requests.delete(id as RequestId);
          pending.done();
        } else if (reply.code !== undefined) {
          // Left by the relay (v1.1: a refreshed token lost the right to read the room).
          const room = this.rooms.get(reply.room);
          if (room !== undefined) {
            this.rooms.delete(room.name);
            room.fire("error", new RelayError(reply.code, "left by the relay", room.name));
          }
        }
        return;
      }
      case "error":
        this.onError(reply);
        return;
      case "other":
        return; // docs/protocol.md: types a client does not know are ignored
    }
  }

  private onError(reply: Extract<Reply, { t: "error" }>): void {
    const id = this.answered(reply.id);
    const error = new RelayError(reply.code, reply.message, reply.room);
    const out = id === undefined ? undefined : this.unacked.get(String(id));
    if (out !== undefined) {
      if (reply.code === "unavailable" && out.unavailable < this.options.unavailableRetries) {
        // Not stored, or not known to be: the same key again ends with exactly one seq.
        out.unavailable++;
        this.later(out.unavailable - 1, () => {
          if (this.unacked.get(out.key) === out) this.transmit(out);
        });
        return;
      }
      this.unacked.delete(out.key);
      out.reject(error);
      return;
    }
    const pending = id === undefined ? undefined : this.requests.get(id);
    if (pending?.kind === "presence") {
      this.requests.delete(id as RequestId);
      pending.done(error);
      return;
    }
    if (pending?.kind === "join") {
      this.requests.delete(id as RequestId);
      const room = pending.room;
      if (reply.code === "unavailable" && room.unavailable < this.options.unavailableRetries) {
        // Retried like a delta; a joined room keeps showing its state meanwhile.
        room.unavailable++;
        this.later(room.unavailable - 1, () => {
          if (this.rooms.get(room.name) === room) this.sendJoin(room);
        });
        return;
      }
      if (this.rooms.get(room.name) === room) this.rooms.delete(room.name);
      const ready = room.ready;
      room.ready = null;
      ready?.reject(error);
      room.fire("error", error);
      return;
    }
    this.emit("error", error);
  }

  /** Runs `fn` after a backoff delay, if the client is still connected then. */
  private later(attempt: number, fn: () => void): void {
    const timer = setTimeout(
      () => {
        this.timers.delete(timer);
        if (this.live) fn();
      },
      backoffDelay(attempt, this.options.minDelay, this.options.maxDelay),
    );
    this.timers.add(timer);
  }
}
