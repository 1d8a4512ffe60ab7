/**
 * The client in a real browser: headless Chromium (Debian's `chromium`, CHROMIUM to point
 * elsewhere) driven by playwright-core, pages on one room against a real relay.
 *
 * The relay does not serve static pages yet (GET /kasagi-client.js and /inspector are #14's
 * second half), so the page and the browser build (dist/kasagi-client.js) come from a small
 * HTTP server on loopback. Chromium's local-network-access check blocks ws://127.0.0.1 from
 * public pages (such as those the driver injects); a page from a loopback origin may connect.
 */
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { type Browser, chromium, type Page } from "playwright-core";
import { REPO, type Redis, type Relay, startRedis, startRelay } from "./helpers.js";

const CHROMIUM = process.env["CHROMIUM"] ?? "/usr/bin/chromium";
const BUNDLE = join(REPO, "clients/js/dist/kasagi-client.js");
const NO_RATE_LIMIT = ["--rate-limit", "100000", "--rate-burst", "100000"];

// The page's side of the test, plain JavaScript on the bundle as a page would use it.
const PAGE = `<!doctype html><meta charset="utf-8"><title>kasagi test</title>
<script type="module">
import { Client } from "/kasagi-client.js";
window.setup = async (url, roomName, writer, options) => {
  const client = new Client(url, options);
  const room = client.room(roomName);
  const rec = { seqs: [], breaks: [], resets: [], statuses: [] };
  client.on("status", (s) => rec.statuses.push(s));
  await room.join();
  let last = room.seq;
  room.on("change", (_state, { from, seq }) => {
    if (from !== last + 1) rec.breaks.push(from + " after " + last);
    for (let s = from; s <= seq; s++) rec.seqs.push(s);
    last = seq;
  });
  room.on("reset", (_state, { seq }) => { rec.resets.push(seq); last = seq; });
  window.t = { client, room, rec, writer, pending: Promise.resolve([]) };
  return room.seq;
};
window.sendMany = (first, last) => {
  const { room, writer } = window.t;
  const sent = [];
  for (let i = first; i <= last; i++) {
    sent.push(i % 2 === 0
      ? room.send({ patch: [{ op: "add", path: "/log/-", value: writer + i }] })
      : room.send({ merge: { [writer]: i } }));
  }
  window.t.pending = Promise.all(sent);
};
window.sent = async () => (await window.t.pending).map((r) => r.seq);
window.snapshot = () => ({
  seq: window.t.room.seq, state: window.t.room.state, rec: window.t.rec, status: window.t.client.status,
});
window.ready = true;
</script>`;

interface Snapshot {
  seq: number;
  state: { log: string[]; [writer: string]: unknown };
  rec: { seqs: number[]; breaks: string[]; resets: number[]; statuses: string[] };
  status: string;
}

interface PageApi {
  ready?: boolean;
  setup(url: string, room: string, writer: string, options: object): Promise<number>;
  sendMany(first: number, last: number): void;
  sent(): Promise<number[]>;
  snapshot(): Snapshot;
}


describe("in Chromium", { skip: existsSync(CHROMIUM) ? false : `no ${CHROMIUM}` }, () => {
  let server: Server;
  let browser: Browser;
  let origin = "";

  before(async () => {
    server = createServer((req, res) => {
      if (req.url === "/kasagi-client.js") {
        res.writeHead(200, { "content-type": "text/javascript" }).end(readFileSync(BUNDLE));
      } else {
        res.writeHead(200, { "content-type": "text/html" }).end(PAGE);
      }
    });
    await new Promise<void>((done) => server.listen(0, "127.0.0.1", done));
    const address = server.address();
    origin = `http://127.0.0.1:${typeof address === "object" && address !== null ? address.port : 0}`;
    browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
  });
  after(async () => {
    await browser.close();
    await new Promise<void>((done) => server.close(() => { done(); }));
  });

  async function open(url: string, room: string, writer: string, options: object = {}): Promise<Page> {
    const page = await browser.newPage();
    page.on("pageerror", (error) => { console.error("page error:", error); });
    await page.goto(origin + "/");
    await page.waitForFunction(() => (globalThis as unknown as PageApi).ready === true);
    await page.evaluate(([u, r, w, o]) => (globalThis as unknown as PageApi).setup(u, r, w, o), [url, room, writer, options] as const);
    return page;
  }

  async function untilAll(pages: Page[], check: (s: Snapshot) => boolean, what: string): Promise<Snapshot[]> {
    const deadline = Date.now() + 30_000;
    for (;;) {
      const snaps = await Promise.all(pages.map((p) => p.evaluate(() => (globalThis as unknown as PageApi).snapshot())));
      if (snaps.every(check)) return snaps;
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(snaps.map((s) => s.seq))}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  function checkLog(state: Snapshot["state"], writer: string, last: number): void {
    const expected = Array.from({ length: last / 2 }, (_, i) => `${writer}${2 * (i + 1)}`);
    assert.deepEqual(state.log.filter((e) => e.startsWith(writer)), expected, `${writer}: each once, in order`);
  }

  it("two pages on one room converge after 1,000 deltas from each", async () => {
    const relay = await startRelay(NO_RATE_LIMIT);
    try {
      const pa = await open(relay.url, "converge", "A");
      await pa.evaluate(async () => {
        await (globalThis as unknown as { t: { room: { send(d: object): Promise<unknown> } } }).t.room.send({
          merge: { log: [] },
        });
      });
      const pb = await open(relay.url, "converge", "B");
      await Promise.all([pa, pb].map((p) => p.evaluate(() => { (globalThis as unknown as PageApi).sendMany(1, 1000); })));
      const seqs = (await Promise.all([pa, pb].map((p) => p.evaluate(() => (globalThis as unknown as PageApi).sent())))).flat();
      assert.equal(new Set(seqs).size, 2000);
      const [a, b] = (await untilAll([pa, pb], (s) => s.seq === 2001, "seq 2001")) as [Snapshot, Snapshot];
      assert.deepEqual(a.state, b.state);
      checkLog(a.state, "A", 1000);
      checkLog(a.state, "B", 1000);
      for (const s of [a, b]) {
        assert.deepEqual(s.rec.breaks, []);
        assert.deepEqual(s.rec.resets, []);
        // Page A saw seq 1 (its own /log), page B joined after it: every seq from 2 on, once.
        assert.deepEqual(s.rec.seqs.filter((seq) => seq >= 2), Array.from({ length: 2000 }, (_, i) => i + 2));
        assert.equal(new Set(s.rec.seqs).size, s.rec.seqs.length);
      }
      await Promise.all([pa, pb].map((p) => p.close()));
    } finally {
      await relay.stop();
    }
  });

  it("pages reconnect after the relay is killed (SIGKILL) and restarted, nothing missed or duplicated", async () => {
    const redis: Redis = await startRedis();
    let relay: Relay | undefined;
    try {
      relay = await startRelay(["--redis", redis.url, ...NO_RATE_LIMIT]);
      const fast = { minDelay: 50, maxDelay: 500 };
      const pa = await open(relay.url, "restart", "A", fast);
      await pa.evaluate(async () => {
        await (globalThis as unknown as { t: { room: { send(d: object): Promise<unknown> } } }).t.room.send({
          merge: { log: [] },
        });
      });
      const pb = await open(relay.url, "restart", "B", { ...fast, format: "msgpack" });
      const pages = [pa, pb];
      await Promise.all(pages.map((p) => p.evaluate(() => { (globalThis as unknown as PageApi).sendMany(1, 100); })));
      await Promise.all(pages.map((p) => p.evaluate(() => (globalThis as unknown as PageApi).sent())));
      await untilAll(pages, (s) => s.seq === 201, "seq 201");

      await relay.stop("SIGKILL");
      await untilAll(pages, (s) => s.status === "connecting", "the pages reconnecting");
      await Promise.all(pages.map((p) => p.evaluate(() => { (globalThis as unknown as PageApi).sendMany(101, 200); })));
      await new Promise((r) => setTimeout(r, 300));
      relay = await startRelay(["--redis", redis.url, ...NO_RATE_LIMIT], relay.port);

      const seqs = (await Promise.all(pages.map((p) => p.evaluate(() => (globalThis as unknown as PageApi).sent())))).flat();
      assert.equal(new Set(seqs).size, 200);
      assert.deepEqual([Math.min(...seqs), Math.max(...seqs)], [202, 401]);
      const [a, b] = (await untilAll(pages, (s) => s.seq === 401, "seq 401")) as [Snapshot, Snapshot];
      assert.deepEqual(a.state, b.state);
      checkLog(a.state, "A", 200);
      checkLog(a.state, "B", 200);
      for (const s of [a, b]) {
        assert.deepEqual(s.rec.breaks, []);
        assert.deepEqual(s.rec.resets, []);
        // Page A saw seq 1 (its own /log), page B joined after it: every seq from 2 on, once.
        assert.deepEqual(s.rec.seqs.filter((seq) => seq >= 2), Array.from({ length: 400 }, (_, i) => i + 2));
        assert.equal(new Set(s.rec.seqs).size, s.rec.seqs.length);
        assert.deepEqual(s.rec.statuses.slice(0, 1), ["connecting"]);
        assert.ok(s.rec.statuses.includes("connecting") && s.status === "connected", s.rec.statuses.join());
      }
      await Promise.all(pages.map((p) => p.close()));
    } finally {
      await relay?.stop("SIGKILL");
      await redis.stop();
    }
  });
});
