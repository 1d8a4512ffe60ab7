/**
 * The client side of the wire protocol, Sans-I/O (docs/protocol.md): requests out, replies
 * in, and `RoomStream`, one room's `(seq, state)`. Nothing here touches a socket or a timer;
 * `client.ts` does the I/O around it.
 */

import { decode, encode } from "@msgpack/msgpack";
import { applyDelta, type Delta, type Json, PatchError, isObject } from "./patch.js";

export type Format = "json" | "msgpack";

export const SUBPROTOCOLS: Readonly<Record<Format, string>> = {
  json: "kasagi.v1.json",
  msgpack: "kasagi.v1.msgpack",
};

/** docs/protocol.md, "Rooms": the room name rule (domain.valid_room on the relay). */
export const ROOM_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;
export const MAX_KEY_CHARS = 64;

export type RequestId = number | string;

/** The relay sent something docs/protocol.md does not allow. */
export class ProtocolError extends Error {
  override name = "ProtocolError";
}

// ------------------------------------------------------------------------------ requests

/** JSON goes in text frames and MessagePack in binary frames (docs/protocol.md, transport). */
export function encodeMessage(format: Format, message: Record<string, unknown>): string | Uint8Array {
  return format === "msgpack" ? encode(message) : JSON.stringify(message);
}

export function checkRoom(room: string): void {
  if (typeof room !== "string" || !ROOM_NAME.test(room)) {
    throw new TypeError(`not a valid room name: ${JSON.stringify(room)}`);
  }
}

export function joinMessage(
  room: string,
  since: number | null,
  id: RequestId,
  presence?: boolean,
): Record<string, unknown> {
  const message: Record<string, unknown> = { t: "join", room, id };
  if (since !== null) message["since"] = since;
  // docs/protocol.md, presence: members coming and going are sent to this connection.
  if (presence === true) message["presence"] = true;
  return message;
}

/** Checks a delta as `Room.send` takes it: exactly one of `patch` (an array) or `merge`. */
export function checkDelta(delta: unknown): asserts delta is Delta {
  if (!isObject(delta)) throw new TypeError("a delta is { patch: [...] } or { merge: {...} }");
  const hasPatch = Object.prototype.hasOwnProperty.call(delta, "patch");
  const hasMerge = Object.prototype.hasOwnProperty.call(delta, "merge");
  if (hasPatch === hasMerge) throw new TypeError("a delta has exactly one of patch or merge");
  if (hasPatch && !Array.isArray(delta["patch"])) {
    throw new TypeError("patch must be an array of RFC 6902 operations");
  }
  if (hasMerge && delta["merge"] === undefined) throw new TypeError("merge must be a JSON value");
}

export function deltaMessage(room: string, delta: Delta, key: string, id: RequestId): Record<string, unknown> {
  const body = "patch" in delta ? { patch: delta.patch } : { merge: delta.merge };
  return { t: "delta", room, ...body, key, id };
}

// ------------------------------------------------------------------------------- replies

export type Reply =
  | { t: "joined"; room: string; seq: number; state: Json | undefined; id: RequestId | undefined }
  | { t: "left"; room: string; id: RequestId | undefined; code: string | undefined }
  | { t: "ack"; room: string; seq: number; id: RequestId | undefined }
  | { t: "error"; code: string; message: string; id: RequestId | undefined; room: string | undefined }
  | { t: "delta"; room: string; from: number; seq: number; delta: Delta }
  | { t: "reset"; room: string; seq: number; state: Json }
  | { t: "presence"; room: string; members: Member[]; id: RequestId | undefined }
  | { t: "presence_join" | "presence_leave"; room: string; member: Member }
  | { t: "authed"; sub: string | null; exp: number | undefined; id: RequestId | undefined }
  | { t: "other"; type: string; message: Record<string, unknown> };

function decodeFrame(data: unknown): Record<string, unknown> {
  let value: unknown;
  try {
    if (typeof data === "string") value = JSON.parse(data);
    else if (data instanceof ArrayBuffer || ArrayBuffer.isView(data)) value = decode(data);
    else throw new ProtocolError("a frame must be text or binary");
  } catch (error) {
    if (error instanceof ProtocolError) throw error;
    throw new ProtocolError(`undecodable message: ${String(error)}`);
  }
  if (!isObject(value)) throw new ProtocolError("a message must be an object");
  return value;
}

function seqField(obj: Record<string, unknown>, name: string): number {
  const value = obj[name];
  if (typeof value !== "number" || !Number.isInteger(value) || value < 0) {
    throw new ProtocolError(`${String(obj["t"])}: ${name} must be a non-negative integer`);
  }
  return value;
}

function roomField(obj: Record<string, unknown>): string {
  const room = obj["room"];
  if (typeof room !== "string") throw new ProtocolError(`${String(obj["t"])}: room missing`);
  return room;
}

function idField(obj: Record<string, unknown>): RequestId | undefined {
  const id = obj["id"];
  return typeof id === "number" || typeof id === "string" ? id : undefined;
}

/** One member of a room (docs/protocol.md, presence): a connection joined to it. */
export interface Member {
  /** A random id per connection. */
  conn: string;
  /** The user, from the connection's token; null when anonymous. */
  sub: string | null;
  /** Public data from the token (`info` claim); {} when none. */
  info: Json;
}

function memberField(value: unknown): Member {
  if (!isObject(value) || typeof value["conn"] !== "string") {
    throw new ProtocolError("presence: a member needs a conn");
  }
  const sub = value["sub"];
  return { conn: value["conn"], sub: typeof sub === "string" ? sub : null, info: value["info"] ?? {} };
}

function optionalString(value: unknown): string | undefined {
  return typeof value === "string" ? value : undefined;
}

/** One message from the relay (a text or binary frame) as a typed reply. */
export function parse(data: unknown): Reply {
  const obj = decodeFrame(data);
  const t = obj["t"];
  const has = (name: string): boolean => Object.prototype.hasOwnProperty.call(obj, name);
  switch (t) {
    case "delta": {
      const from = seqField(obj, "from");
      const seq = seqField(obj, "seq");
      if (from === 0 || from > seq) throw new ProtocolError(`delta: from ${from} with seq ${seq}`);
      if (has("patch") === has("merge")) throw new ProtocolError("delta: exactly one of patch or merge");
      const delta = has("patch") ? { patch: obj["patch"] } : { merge: obj["merge"] };
      return { t, room: roomField(obj), from, seq, delta: delta as Delta };
    }
    case "joined": {
      if (obj["resumed"] !== true && !has("state")) throw new ProtocolError("joined: neither state nor resumed");
      const state = obj["resumed"] === true ? undefined : (obj["state"] as Json);
      return { t, room: roomField(obj), seq: seqField(obj, "seq"), state, id: idField(obj) };
    }
    case "ack":
      return { t, room: roomField(obj), seq: seqField(obj, "seq"), id: idField(obj) };
    case "error": {
      const code = obj["code"];
      if (typeof code !== "string") throw new ProtocolError("error: code missing");
      return {
        t,
        code,
        message: optionalString(obj["message"]) ?? "",
        id: idField(obj),
        room: optionalString(obj["room"]),
      };
    }
    case "reset":
      if (!has("state")) throw new ProtocolError("reset: state missing");
      return { t, room: roomField(obj), seq: seqField(obj, "seq"), state: obj["state"] as Json };
    case "left":
      return { t, room: roomField(obj), id: idField(obj), code: optionalString(obj["code"]) };
    case "presence": {
      const members = obj["members"];
      if (!Array.isArray(members)) throw new ProtocolError("presence: members must be an array");
      return { t, room: roomField(obj), members: members.map(memberField), id: idField(obj) };
    }
    case "presence_join":
    case "presence_leave":
      return { t, room: roomField(obj), member: memberField(obj["member"]) };
    case "authed": {
      const exp = obj["exp"];
      return {
        t,
        sub: optionalString(obj["sub"]) ?? null,
        exp: typeof exp === "number" && Number.isFinite(exp) ? exp : undefined,
        id: idField(obj),
      };
    }
    default:
      if (typeof t !== "string") throw new ProtocolError("a message needs a type t");
      return { t: "other", type: t, message: obj };
  }
}

// ------------------------------------------------------------------------------ one room

/** What `RoomStream` asks its caller to do or tell. */
export type Step =
  | { kind: "applied"; from: number; seq: number; delta: Delta }
  | { kind: "replaced"; seq: number; reset: boolean }
  | { kind: "rejoin"; since: number | null; reason: string }
  | { kind: "ignored" };

/**
 * One room's `(seq, state)` as the relay's stream describes it (docs/protocol.md, "Client
 * behaviour"): apply a delta whose `from` is `seq + 1`, replace the state on a full `joined`
 * and on `reset`, and ask to join again with `since` on anything else. Until the first
 * `joined` (and after `rejoinSent()` until the next one) delta frames are ignored: they
 * belong to a stream the next `joined` restarts.
 */
export class RoomStream {
  state: Json = {};
  seq: number | null = null;
  private waiting = true;
  // A resume went wrong: only a full join can put the state right.
  private full = false;

  /** True between a `joined` and a gap or a lost connection. */
  get synced(): boolean {
    return !this.waiting;
  }

  /** What the next `join` carries: the last seq held, if any. */
  since(): number | null {
    return this.full ? null : this.seq;
  }

  /** A `join` went out, or the connection was lost: ignore frames until `joined`. */
  rejoinSent(): void {
    this.waiting = true;
  }

  onJoined(seq: number, state: Json | undefined): Step {
    if (state === undefined) {
      if (this.seq === null || this.full || seq !== this.seq) {
        this.full = true;
        this.waiting = true;
        return { kind: "rejoin", since: null, reason: `resumed at ${seq}, held ${String(this.seq)}` };
      }
      this.waiting = false;
      return { kind: "ignored" };
    }
    this.state = state;
    this.seq = seq;
    this.waiting = false;
    this.full = false;
    return { kind: "replaced", seq, reset: false };
  }

  onReset(seq: number, state: Json): Step {
    this.state = state;
    this.seq = seq;
    return { kind: "replaced", seq, reset: true };
  }

  onDelta(from: number, seq: number, delta: Delta): Step {
    if (this.waiting || this.seq === null) return { kind: "ignored" };
    if (from !== this.seq + 1) {
      this.waiting = true;
      return { kind: "rejoin", since: this.seq, reason: `frame from ${from} after seq ${this.seq}` };
    }
    // docs/protocol.md: frames carry only effective changes (a delta that failed at its
    // position comes as an empty patch, `test` ops are left out), so a frame is applied
    // without judging anything; any `test` op is skipped, not evaluated. A frame that does
    // not apply means this state is not the relay's: only a full join puts it right.
    let next: Json;
    try {
      next = applyDelta(this.state, "patch" in delta ? { patch: delta.patch.filter((op) => op.op !== "test") } : delta);
    } catch (error) {
      if (!(error instanceof PatchError)) throw error;
      this.full = true;
      this.waiting = true;
      return { kind: "rejoin", since: null, reason: `frame ${from}..${seq} does not apply: ${error.message}` };
    }
    this.state = next;
    this.seq = seq;
    return { kind: "applied", from, seq, delta };
  }
}
