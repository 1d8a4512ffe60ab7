/**
 * The client against a real relay (python -m kasagi_relay) over real sockets: two clients
 * converge, a relay killed and restarted under them, the close codes the client must and must
 * not retry, the relay's refusals. JSON and MessagePack.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { after, before, describe, it } from "node:test";
import { Client, ConnectionError, type Delta, type Format, type Json, RelayError, type Room, type Status } from "../src/index.js";
import { type Redis, type Relay, startRedis, startRelay, until } from "./helpers.js";

const FAST = { minDelay: 50, maxDelay: 500 };
// The relay's default rate limit (200 messages/s per connection) would make the tests wait.
const NO_RATE_LIMIT = ["--rate-limit", "100000", "--rate-burst", "100000"];

/** Records a room's stream: every change must continue where the last one ended. */
function watch(room: Room): { seqs: number[]; resets: number[]; breaks: string[] } {
  const seen = { seqs: [] as number[], resets: [] as number[], breaks: [] as string[] };
  let last = room.seq;
  room.on("change", (_state, { from, seq }) => {
    if (from !== last + 1) seen.breaks.push(`${from}..${seq} after ${last}`);
    for (let s = from; s <= seq; s++) seen.seqs.push(s);
    last = seq;
  });
  room.on("reset", (_state, { seq }) => {
    seen.resets.push(seq);
    last = seq;
  });
  return seen;
}

type Doc = { log: string[]; [writer: string]: Json };

/** Writer `name`'s deltas `first`..`last`: patch appends to /log, merge sets its counter. */
function sendMany(room: Room, name: string, first: number, last: number): Promise<{ seq: number }>[] {
  const sent: Promise<{ seq: number }>[] = [];
  for (let i = first; i <= last; i++) {
    sent.push(
      i % 2 === 0
        ? room.send({ patch: [{ op: "add", path: "/log/-", value: `${name}${i}` }] })
        : room.send({ merge: { [name]: i } }),
    );
  }
  return sent;
}

function checkLog(state: Json, name: string, first: number, last: number): void {
  const entries = (state as Doc).log.filter((e) => e.startsWith(name));
  const expected = [];
  for (let i = first; i <= last; i++) if (i % 2 === 0) expected.push(`${name}${i}`);
  assert.deepEqual(entries, expected, `${name}'s entries: each once, in the order sent`);
}

async function fresh(url: string, format: Format, name: string): Promise<Json> {
  const c = new Client(url, { format });
  try {
    return (await c.room(name).join()).state;
  } finally {
    c.close();
  }
}

describe("two clients on one room (memory backend)", () => {
  let relay: Relay;
  before(async () => {
    relay = await startRelay(NO_RATE_LIMIT);
  });
  after(async () => {
    await relay.stop();
  });

  for (const format of ["json", "msgpack"] as const) {
    it(`converge after 1,000 deltas from each (${format})`, async () => {
      const a = new Client(relay.url, { format });
      const b = new Client(relay.url, { format });
      const statuses: Status[] = [];
      a.on("status", (s) => statuses.push(s));
      try {
        const ra = a.room(`conv-${format}`);
        const rb = b.room(`conv-${format}`);
        await ra.join();
        await ra.send({ merge: { log: [] } });
        await rb.join();
        assert.deepEqual(rb.state, { log: [] });
        const wa = watch(ra);
        const wb = watch(rb);
        const seqs = (await Promise.all([...sendMany(ra, "A", 1, 1000), ...sendMany(rb, "B", 1, 1000)])).map(
          (r) => r.seq,
        );
        assert.equal(new Set(seqs).size, 2000, "every delta got its own seq");
        assert.deepEqual([Math.min(...seqs), Math.max(...seqs)], [2, 2001]);
        await until(() => ra.seq === 2001 && rb.seq === 2001, "both clients at seq 2001");
        assert.deepEqual(ra.state, rb.state);
        assert.deepEqual(await fresh(relay.url, format, `conv-${format}`), ra.state);
        checkLog(ra.state, "A", 1, 1000);
        checkLog(ra.state, "B", 1, 1000);
        assert.equal((ra.state as Doc)["A"], 999);
        assert.equal((ra.state as Doc)["B"], 999);
        for (const w of [wa, wb]) {
          assert.deepEqual(w.breaks, []);
          assert.deepEqual(w.resets, []);
          assert.equal(w.seqs.length, 2000);
        }
        assert.deepEqual(statuses, ["connecting", "connected"]);
        assert.equal(a.status, "connected");
      } finally {
        a.close();
        b.close();
      }
      assert.equal(a.status, "disconnected");
    });
  }

  it("rejects a refused delta with the relay's code, and a bad room name at once", async () => {
    const c = new Client(relay.url);
    try {
      const room = c.room("refusals");
      await room.join();
      await assert.rejects(room.send({ patch: [{ op: "remove", path: "/nothing" }] }), (error: unknown) => {
        assert.ok(error instanceof RelayError);
        assert.equal(error.code, "bad_patch");
        return true;
      });
      assert.throws(() => c.room("no spaces"), TypeError);
      await assert.rejects(room.send({ patch: [], merge: {} }), TypeError);
      // The same key again is answered with the first ack: one seq, stored once.
      const { seq } = await room.send({ merge: { k: 1 } }, { key: "k1" });
      assert.deepEqual(await room.send({ merge: { k: 1 } }, { key: "k1" }), { seq });
      await until(() => room.seq === seq, "the delta in the stream");
      assert.deepEqual(room.state, { k: 1 });
    } finally {
      c.close();
    }
  });

  // Needs #11's key_conflict on the memory backend (on main since this branch began).
  it(
    "rejects a key reused for another delta with key_conflict",
    async () => {
      const c = new Client(relay.url);
      try {
        const room = c.room("conflict");
        await room.join();
        await room.send({ merge: { k: 1 } }, { key: "k1" });
        await assert.rejects(room.send({ merge: { k: 2 } }, { key: "k1" }), { code: "key_conflict" });
        assert.deepEqual(room.state, { k: 1 });
      } finally {
        c.close();
      }
    },
  );
});

describe("rate limits", () => {
  it("a refused delta is rejected with rate_limited, also a big one answered without its id", async () => {
    const relay = await startRelay(["--rate-limit", "1", "--rate-burst", "2"]);
    const c = new Client(relay.url);
    try {
      const room = c.room("limited");
      // Over 16 KiB: the relay refuses it without reading it, so the answer has no id; the
      // client matches it by order (one connection's requests are answered in order).
      const big = "x".repeat(20_000);
      const results = await Promise.allSettled([
        room.send({ merge: { a: 1 } }),
        room.send({ merge: { b: big } }),
        room.send({ merge: { c: big } }),
        room.send({ merge: { d: 1 } }),
      ]);
      const codes = results.map((r) =>
        r.status === "fulfilled" ? "ok" : r.reason instanceof RelayError ? r.reason.code : String(r.reason),
      );
      assert.deepEqual(codes.slice(0, 2), ["ok", "ok"]);
      assert.deepEqual(codes.slice(2), ["rate_limited", "rate_limited"]);
      assert.equal(c.status, "connected");
    } finally {
      c.close();
      await relay.stop();
    }
  });
});

describe("the relay restarted under the clients (Redis backend)", () => {
  let redis: Redis;
  before(async () => {
    redis = await startRedis();
  });
  after(async () => {
    await redis.stop();
  });

  it("gets only effective changes: a delta that failed at its position as an empty patch, no test ops", async () => {
    const relay = await startRelay(["--redis", redis.url]);
    const c = new Client(relay.url, { format: "msgpack" });
    // Published straight into the room's history, as another service may (docs/protocol.md,
    // "Through Redis"): the relay checks nothing then, so these fail at their position, and
    // the relay sends what they did (docs/protocol.md, frames carry only effective changes).
    const publish = (kind: string, body: unknown): void => {
      const r = "{fails}";
      execFileSync(process.env["KASAGI_REDIS_CLI"] ?? "redis-cli", [
        "-p", String(redis.port), "FCALL", "kasagi_publish", "4",
        `room:${r}:seq`, `room:${r}:ops`, `room:${r}:channel`, `room:${r}:keys`, kind, JSON.stringify(body),
      ]);
    };
    try {
      const room = c.room("fails");
      await room.join();
      const frames: [number, number, Delta][] = [];
      room.on("change", (_state, { from, seq, delta }) => frames.push([from, seq, delta]));
      await room.send({ merge: { a: 1, n: 1.5 } });
      await until(() => room.seq === 1, "seq 1");
      publish("patch", [{ op: "remove", path: "/missing" }]);
      await until(() => room.seq === 2, "seq 2");
      publish("patch", [{ op: "test", path: "/a", value: 2 }, { op: "add", path: "/b", value: 1 }]);
      await until(() => room.seq === 3, "seq 3");
      publish("patch", [{ op: "test", path: "/a", value: 1.0 }, { op: "add", path: "/c", value: 1 }]);
      await until(() => room.seq === 4, "seq 4");
      publish("patch", [{ op: "add", path: "/d", value: 1 }, { op: "remove", path: "/a/deeper" }]);
      await until(() => room.seq === 5, "seq 5");
      publish("merge", { e: { f: null, g: 2 } });
      await until(() => room.seq === 6, "seq 6");
      assert.deepEqual(frames, [
        [1, 1, { merge: { a: 1, n: 1.5 } }],
        [2, 2, { patch: [] }],
        [3, 3, { patch: [] }],
        [4, 4, { patch: [{ op: "add", path: "/c", value: 1 }] }],
        [5, 5, { patch: [] }],
        [6, 6, { merge: { e: { f: null, g: 2 } } }],
      ]);
      assert.deepEqual(c.gaps, []);
      assert.deepEqual(room.state, { a: 1, n: 1.5, c: 1, e: { g: 2 } });
      assert.deepEqual(await fresh(relay.url, "json", "fails"), room.state);
    } finally {
      c.close();
      await relay.stop();
    }
  });

  it("reconnect and resume with nothing missed or duplicated (JSON and MessagePack)", async () => {
    let relay = await startRelay(["--redis", redis.url, ...NO_RATE_LIMIT]);
    const a = new Client(relay.url, { format: "json", ...FAST });
    const b = new Client(relay.url, { format: "msgpack", ...FAST });
    const statuses: Status[] = [];
    b.on("status", (s) => statuses.push(s));
    try {
      const ra = a.room("restart");
      const rb = b.room("restart");
      await ra.join();
      await ra.send({ merge: { log: [] } });
      await rb.join();
      const wa = watch(ra);
      const wb = watch(rb);
      await Promise.all([...sendMany(ra, "A", 1, 100), ...sendMany(rb, "B", 1, 100)]);
      await until(() => ra.seq === 201 && rb.seq === 201, "both at seq 201");

      await relay.stop("SIGKILL");
      await until(() => a.status === "connecting" && b.status === "connecting", "both clients reconnecting");
      // Sent while the relay is down: they wait, then go with their keys after the reconnect.
      const pending = [...sendMany(ra, "A", 101, 200), ...sendMany(rb, "B", 101, 200)];
      await new Promise((r) => setTimeout(r, 300));
      relay = await startRelay(["--redis", redis.url, ...NO_RATE_LIMIT], relay.port);

      const seqs = (await Promise.all(pending)).map((r) => r.seq);
      assert.equal(new Set(seqs).size, 200);
      assert.deepEqual([Math.min(...seqs), Math.max(...seqs)], [202, 401]);
      await until(() => ra.seq === 401 && rb.seq === 401, "both at seq 401");
      assert.deepEqual(ra.state, rb.state);
      assert.deepEqual(await fresh(relay.url, "json", "restart"), ra.state);
      checkLog(ra.state, "A", 1, 200);
      checkLog(ra.state, "B", 1, 200);
      for (const w of [wa, wb]) {
        // Resumed with since: the missed deltas came as deltas, no reset, no gap, no repeat.
        assert.deepEqual(w.breaks, []);
        assert.deepEqual(w.resets, []);
        assert.deepEqual(w.seqs, Array.from({ length: 400 }, (_, i) => i + 2));
      }
      assert.ok(a.disconnects.includes(1006), `disconnects ${a.disconnects.join()}`);
      assert.deepEqual(statuses.slice(0, 3), ["connecting", "connected", "connecting"]);
      assert.equal(statuses.at(-1), "connected");
    } finally {
      a.close();
      b.close();
      await relay.stop("SIGKILL");
    }
  });
});

describe("close codes", () => {
  // Needs #11's --idle-timeout (on main since this branch began).
  it(
    "an idle connection closed with 1008 is opened again by the next request",
    async () => {
    const relay = await startRelay(["--idle-timeout", "1"]);
    const c = new Client(relay.url, FAST);
    const errors: unknown[] = [];
    c.on("error", (e) => errors.push(e));
    try {
      await c.connect();
      await until(() => c.status === "disconnected", "the idle close", 5_000);
      assert.deepEqual(errors, []);
      assert.deepEqual(c.disconnects, [], "not reconnected by itself");
      const room = c.room("after-idle");
      await room.join();
      assert.equal(c.status, "connected");
      assert.equal((await room.send({ merge: { ok: true } })).seq, 1);
    } finally {
      c.close();
      await relay.stop();
    }
  },
  );

  it("never reconnects by itself after a close it must not retry (1009), and the next request does", async () => {
    const relay = await startRelay(["--max-message-bytes", "2048"]);
    const c = new Client(relay.url, FAST);
    try {
      const room = c.room("too-big");
      await room.join();
      await room.send({ merge: { a: 1 } });
      await assert.rejects(room.send({ merge: { blob: "x".repeat(4096) } }), (error: unknown) => {
        assert.ok(error instanceof ConnectionError);
        assert.equal(error.closeCode, 1009);
        return true;
      });
      assert.equal(c.status, "disconnected");
      await new Promise((r) => setTimeout(r, 600));
      assert.equal(c.status, "disconnected");
      assert.deepEqual(c.disconnects, []);
      // The next request connects again and the joined room resumes from its seq.
      assert.equal((await room.send({ merge: { b: 2 } })).seq, 2);
      await until(() => room.seq === 2, "the room resumed");
      assert.deepEqual(room.state, { a: 1, b: 2 });
    } finally {
      c.close();
      await relay.stop();
    }
  });

  it("reconnects after 1001 (the relay shutting down) and resumes on the next relay", async () => {
    const redis = await startRedis();
    let relay: Relay | undefined;
    try {
      relay = await startRelay(["--redis", redis.url]);
    } finally {
      if (relay === undefined) await redis.stop();
    }
    const c = new Client(relay.url, FAST);
    try {
      const room = c.room("shutdown");
      await room.join();
      await room.send({ merge: { a: 1 } });
      await until(() => room.seq === 1, "seq 1");
      await relay.stop("SIGTERM");
      relay = await startRelay(["--redis", redis.url], relay.port);
      assert.equal((await room.send({ merge: { b: 2 } })).seq, 2);
      await until(() => room.seq === 2, "seq 2");
      assert.deepEqual(room.state, { a: 1, b: 2 });
      assert.equal(c.disconnects[0], 1001);
    } finally {
      c.close();
      await relay.stop();
      await redis.stop();
    }
  });
});
