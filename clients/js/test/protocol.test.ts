import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { encode } from "@msgpack/msgpack";
import { backoffDelay, Client, parse, ProtocolError, RoomStream } from "../src/index.js";

describe("RoomStream (docs/protocol.md, client behaviour)", () => {
  it("ignores frames until joined, applies from == seq + 1, rejoins with since on a gap", () => {
    const s = new RoomStream();
    assert.deepEqual(s.onDelta(1, 1, { merge: { a: 1 } }), { kind: "ignored" });
    assert.equal(s.onJoined(3, { a: 0 }).kind, "replaced");
    assert.equal(s.since(), 3);
    const applied = s.onDelta(4, 5, { merge: { a: 2 } });
    assert.equal(applied.kind, "applied");
    assert.deepEqual(s.state, { a: 2 });
    assert.equal(s.seq, 5);
    // A duplicate and a gap are both protocol errors: join again with since = seq held.
    assert.deepEqual(s.onDelta(5, 5, { merge: { a: 3 } }), { kind: "rejoin", since: 5, reason: "frame from 5 after seq 5" });
    assert.deepEqual(s.onDelta(6, 6, { merge: { a: 3 } }), { kind: "ignored" });
    assert.deepEqual(s.state, { a: 2 });
    assert.equal(s.onJoined(5, undefined).kind, "ignored"); // resumed at the seq held
    assert.equal(s.onDelta(7, 7, { merge: { a: 3 } }).kind, "rejoin");
  });

  it("applies frames without judging test ops; a frame that does not apply asks for a full join", () => {
    const s = new RoomStream();
    s.onJoined(0, { a: 1 });
    // The relay leaves test ops out of frames; one that came anyway is not evaluated.
    const patch = [{ op: "test" as const, path: "/a", value: 99 }, { op: "add" as const, path: "/b", value: 2 }];
    assert.deepEqual(s.onDelta(1, 1, { patch }), { kind: "applied", from: 1, seq: 1, delta: { patch } });
    assert.deepEqual(s.state, { a: 1, b: 2 });
    // A delta that failed at its position comes as an empty patch: applied, seq moves on.
    assert.equal(s.onDelta(2, 2, { patch: [] }).kind, "applied");
    assert.equal(s.seq, 2);
    const step = s.onDelta(3, 3, { patch: [{ op: "remove", path: "/missing" }] });
    assert.ok(step.kind === "rejoin" && step.reason.startsWith("frame 3..3 does not apply"), JSON.stringify(step));
    assert.deepEqual({ ...step, reason: "" }, { kind: "rejoin", since: null, reason: "" });
    assert.deepEqual(s.state, { a: 1, b: 2 });
    assert.equal(s.since(), null);
  });

  it("asks for a full join when resumed at a seq it does not hold", () => {
    const s = new RoomStream();
    s.onJoined(2, { a: 1 });
    s.rejoinSent();
    assert.deepEqual(s.onJoined(9, undefined), { kind: "rejoin", since: null, reason: "resumed at 9, held 2" });
    assert.equal(s.since(), null);
    assert.equal(s.onJoined(9, { a: 9 }).kind, "replaced");
    assert.equal(s.since(), 9);
  });

  it("replaces the state on reset", () => {
    const s = new RoomStream();
    s.onJoined(1, { a: 1 });
    assert.deepEqual(s.onReset(10, { b: 2 }), { kind: "replaced", seq: 10, reset: true });
    assert.deepEqual(s.state, { b: 2 });
    assert.equal(s.onDelta(11, 11, { merge: { c: 3 } }).kind, "applied");
  });
});

describe("parse", () => {
  it("reads presence replies and events, and authed", () => {
    const member = { conn: "c1", sub: null, info: {} };
    assert.deepEqual(parse(JSON.stringify({ t: "presence", id: 3, room: "r", members: [member], count: 1, users: 0 })), {
      t: "presence", room: "r", id: 3, members: [member],
    });
    assert.deepEqual(parse(JSON.stringify({ t: "presence_join", room: "r", member: { conn: "c2", sub: "u", info: { a: 1 } } })), {
      t: "presence_join", room: "r", member: { conn: "c2", sub: "u", info: { a: 1 } },
    });
    assert.deepEqual(parse(JSON.stringify({ t: "presence_leave", room: "r", member: { conn: "c2" } })), {
      t: "presence_leave", room: "r", member: { conn: "c2", sub: null, info: {} },
    });
    assert.throws(() => parse(JSON.stringify({ t: "presence_join", room: "r", member: {} })), ProtocolError);
    assert.throws(() => parse(JSON.stringify({ t: "presence", room: "r", members: {} })), ProtocolError);
    assert.deepEqual(parse(JSON.stringify({ t: "authed", sub: "u", exp: 99 })), { t: "authed", sub: "u", exp: 99, id: undefined });
  });

  it("reads JSON text frames and MessagePack binary frames alike", () => {
    const msg = { t: "delta", room: "r", from: 1, seq: 2, merge: { a: 1 } };
    const expected = { t: "delta", room: "r", from: 1, seq: 2, delta: { merge: { a: 1 } } };
    assert.deepEqual(parse(JSON.stringify(msg)), expected);
    const packed = encode(msg);
    assert.deepEqual(parse(packed), expected);
    assert.deepEqual(parse(packed.buffer.slice(packed.byteOffset, packed.byteOffset + packed.byteLength)), expected);
  });

  it("refuses malformed messages", () => {
    for (const bad of ["[1]", "{", '{"t":"delta","room":"r","from":0,"seq":1,"patch":[]}', '{"t":"ack","room":"r"}',
      '{"t":"delta","room":"r","from":1,"seq":1}', '{"t":"joined","room":"r","seq":1}', "{}"]) {
      assert.throws(() => parse(bad), ProtocolError, bad);
    }
    assert.deepEqual(parse('{"t":"future","x":1}'), { t: "other", type: "future", message: { t: "future", x: 1 } });
  });
});

describe("backoffDelay", () => {
  it("is full jitter: random(0, min(maxDelay, minDelay * 2^attempt))", () => {
    assert.equal(backoffDelay(0, 250, 10_000, () => 1), 250);
    assert.equal(backoffDelay(3, 250, 10_000, () => 1), 2000);
    assert.equal(backoffDelay(10, 250, 10_000, () => 1), 10_000);
    assert.equal(backoffDelay(5000, 250, 10_000, () => 0.5), 5000);
    assert.equal(backoffDelay(3, 250, 10_000, () => 0), 0);
  });
});

describe("Client", () => {
  it("takes ws(s) URLs, and http(s) ones as ws(s); refuses others and bad room names", () => {
    assert.equal(new Client("ws://127.0.0.1:8765/ws").url, "ws://127.0.0.1:8765/ws");
    assert.equal(new Client("https://relay.example/ws").url, "wss://relay.example/ws");
    assert.throws(() => new Client("ftp://relay.example/ws"), TypeError);
    assert.throws(() => new Client("/ws"), TypeError); // relative only in a page
    const c = new Client("ws://127.0.0.1:1/ws");
    assert.equal(c.status, "disconnected"); // connects on the first request, not before
    assert.throws(() => c.room("a b"), TypeError);
    assert.equal(c.room("lobby"), c.room("lobby"));
  });
});
