/**
 * The client in a real browser: headless Chromium (Debian's `chromium`, CHROMIUM to point
 * elsewhere) driven by playwright-core, pages on one room against real relays.
 *
 * Every page comes from the relay's own origin: its inspector page (/inspector), with the
 * test's harness added as a module that imports the relay's /kasagi-client.js. Chromium's
 * local-network-access check blocks ws://127.0.0.1 from public pages (such as those the
 * driver injects); a page from the relay's loopback origin may connect.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { type Browser, chromium, type Page } from "playwright-core";
import { Client } from "../src/index.js";
import { REPO, type Redis, type Relay, startRedis, startRelay, until } from "./helpers.js";

const CHROMIUM = process.env["CHROMIUM"] ?? "/usr/bin/chromium";
const NO_RATE_LIMIT = ["--rate-limit", "100000", "--rate-burst", "100000"];
const RESULTS = join(REPO, "clients/js/test-results");

// The page's side of the test, plain JavaScript on the relay's client as a page would use it.
const HARNESS = `
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
`;

/** The relay's HTTP origin (it serves the pages on the WebSocket's port). */
function originOf(relay: Relay): string {
  return `http://127.0.0.1:${relay.port}`;
}

/** A Redis command's reply, through redis-cli. */
function redisCli(redis: Redis, ...args: string[]): string {
  return execFileSync(process.env["KASAGI_REDIS_CLI"] ?? "redis-cli", ["-p", String(redis.port), ...args]).toString().trim();
}

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
  let browser: Browser;

  before(async () => {
    browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
  });
  after(async () => {
    await browser.close();
  });

  async function open(relay: Relay, room: string, writer: string, options: object = {}): Promise<Page> {
    const page = await browser.newPage();
    page.on("pageerror", (error) => { console.error("page error:", error); });
    await page.goto(originOf(relay) + "/inspector");
    await page.addScriptTag({ type: "module", content: HARNESS });
    await page.waitForFunction(() => (globalThis as unknown as PageApi).ready === true);
    // "/ws": the page's own relay, as any page served by it would say.
    await page.evaluate(([r, w, o]) => (globalThis as unknown as PageApi).setup("/ws", r, w, o), [room, writer, options] as const);
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
      const pa = await open(relay, "converge", "A");
      await pa.evaluate(async () => {
        await (globalThis as unknown as { t: { room: { send(d: object): Promise<unknown> } } }).t.room.send({
          merge: { log: [] },
        });
      });
      const pb = await open(relay, "converge", "B");
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
      const pa = await open(relay, "restart", "A", fast);
      await pa.evaluate(async () => {
        await (globalThis as unknown as { t: { room: { send(d: object): Promise<unknown> } } }).t.room.send({
          merge: { log: [] },
        });
      });
      const pb = await open(relay, "restart", "B", { ...fast, format: "msgpack" });
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
  it("a page whose resume the relay cannot serve gets the full state (reset) and goes on", async () => {
    const redis: Redis = await startRedis();
    const args = ["--redis", redis.url, ...NO_RATE_LIMIT];
    let relay: Relay | undefined;
    // A second relay that keeps 5 deltas of history and compacts every 0.2 s.
    const other = await startRelay([...args, "--history", "5", "--compaction-interval", "0.2"]);
    const writer = new Client(other.url);
    try {
      relay = await startRelay(args);
      const page = await open(relay, "reset", "A", { minDelay: 50, maxDelay: 500 });
      await page.evaluate(async () => {
        await (globalThis as unknown as { t: { room: { send(d: object): Promise<unknown> } } }).t.room.send({
          merge: { log: [] },
        });
      });
      await page.evaluate(() => { (globalThis as unknown as PageApi).sendMany(1, 10); });
      await page.evaluate(() => (globalThis as unknown as PageApi).sent());
      await untilAll([page], (s) => s.seq === 11, "seq 11");
      await relay.stop("SIGKILL");
      // Meanwhile the room moves on through the other relay, which snapshots it and trims
      // its history past what the page holds.
      const room = writer.room("reset");
      await room.join();
      for (let i = 12; i <= 61; i++) await room.send({ merge: { B: i } });
      await until(() => redisCli(redis, "HGET", "room:{reset}:snapshot", "seq") === "61", "a snapshot at 61");
      relay = await startRelay(args, relay.port);
      const [snap] = (await untilAll([page], (s) => s.seq === 61, "seq 61")) as [Snapshot];
      assert.deepEqual(snap.rec.resets, [61]);
      assert.deepEqual(snap.rec.breaks, []);
      assert.deepEqual(snap.state, room.state);
      // And the stream goes on from there.
      await page.evaluate(() => { (globalThis as unknown as PageApi).sendMany(62, 63); });
      await until(() => room.seq === 63, "seq 63 at the other relay");
      const [later] = (await untilAll([page], (s) => s.seq === 63, "seq 63")) as [Snapshot];
      assert.deepEqual(later.state, room.state);
      assert.deepEqual(later.rec.seqs.filter((q) => q > 11), [62, 63]);
      assert.deepEqual(later.state.log, ["A2", "A4", "A6", "A8", "A10", "A62"]);
      await page.close();
    } finally {
      writer.close();
      await relay?.stop("SIGKILL");
      await other.stop();
      await redis.stop();
    }
  });

  it("the inspector page: two tabs follow a room live, send a delta, and a screenshot", async () => {
    const relay = await startRelay(NO_RATE_LIMIT);
    const writer = new Client(relay.url);
    try {
      const room = writer.room("lobby");
      await room.join();
      await room.send({
        merge: { game: { round: 3, players: { alice: { hp: 10, pos: [1, 2] }, bob: { hp: 7, pos: [4, 2] } } } },
      });
      const tabs: Page[] = [];
      for (let i = 0; i < 2; i++) {
        const tab = await browser.newPage({ viewport: { width: 1100, height: 720 } });
        tab.on("pageerror", (error) => { console.error("inspector page error:", error); });
        await tab.goto(originOf(relay) + "/?room=lobby");
        await tab.waitForSelector('#tree[data-seq="1"]');
        tabs.push(tab);
      }
      const [a, b] = tabs as [Page, Page];
      for (let hp = 9; hp >= 0; hp--) {
        await room.send({ patch: [{ op: "replace", path: "/game/players/bob/hp", value: hp }] });
      }
      // A delta typed into one tab reaches the other (and every member).
      await a.fill("#delta", '{"patch": [{"op": "add", "path": "/game/players/carol", "value": {"hp": 12}}]}');
      await a.click("#send-button");
      await a.waitForFunction(() => document.getElementById("result")?.textContent === "acknowledged as seq 12");
      for (const tab of tabs) await tab.waitForSelector('#tree[data-seq="12"]');
      await until(() => room.seq === 12, "seq 12 at the writer");
      const text = async (tab: Page, id: string): Promise<string> => (await tab.textContent(`#${id}`)) ?? "";
      assert.equal(await text(a, "tree"), await text(b, "tree"));
      for (const word of ["alice", "carol", "round", "12"]) assert.ok((await text(b, "tree")).includes(word), word);
      assert.deepEqual(await Promise.all(tabs.map((t) => text(t, "seq"))), ["12", "12"]);
      assert.deepEqual(await Promise.all(tabs.map((t) => text(t, "status"))), ["connected", "connected"]);
      assert.equal(await text(a, "room-name"), "lobby");
      // What the relay refuses is shown, not thrown.
      await b.fill("#delta", '{"patch": [{"op": "remove", "path": "/nobody"}]}');
      await b.click("#send-button");
      await b.waitForFunction(() => (document.getElementById("result")?.textContent ?? "").startsWith("bad_patch"));
      await b.fill("#delta", "{not json");
      await b.click("#send-button");
      await b.waitForFunction(() => (document.getElementById("result")?.textContent ?? "").startsWith("not JSON"));
      // Room data is text, never markup.
      await room.send({ merge: { "<img src=x onerror=alert(1)>": "<b>bold</b>" } });
      await a.waitForSelector('#tree[data-seq="13"]');
      assert.equal(await a.$$eval("#tree img, #tree b", (els) => els.length), 0);
      assert.ok((await text(a, "tree")).includes("<b>bold</b>"));
      mkdirSync(RESULTS, { recursive: true });
      const shot = join(RESULTS, "inspector.png");
      await a.screenshot({ path: shot, fullPage: true });
      assert.ok(statSync(shot).size > 10_000, "a screenshot with something in it");
      await Promise.all(tabs.map((t) => t.close()));
    } finally {
      writer.close();
      await relay.stop();
    }
  });
});
