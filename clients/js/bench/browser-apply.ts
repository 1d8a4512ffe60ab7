/**
 * Benchmark: does a browser page keep up with a busy room? Writers in Node (this client)
 * send deltas as fast as the relay takes them to one room of 200 players; one headless
 * Chromium page has joined the room and applies the stream. Reports the deltas/s the page
 * applied and the main-thread time per delta (Chromium's TaskDuration over the run, divided by
 * the deltas and by the frames: the relay merges what queues into one frame). `npm run bench`
 * (after `npm run build`); DELTAS, WRITERS, WINDOW to change the load.
 */
import { cpus } from "node:os";
import { chromium } from "playwright-core";
import { Client } from "../src/index.js";
import { startRelay } from "../test/helpers.js";

const DELTAS = Number(process.env["DELTAS"] ?? 20_000);
const WRITERS = Number(process.env["WRITERS"] ?? 4);
// Deltas in flight per writer; WINDOW=1 makes mostly single-delta frames (no merging).
const WINDOW = Number(process.env["WINDOW"] ?? 100);
const PLAYERS = 200;
const CHROMIUM = process.env["CHROMIUM"] ?? "/usr/bin/chromium";
// Added to the relay's own /inspector page: it imports the relay's /kasagi-client.js.
const HARNESS = `
import { Client } from "/kasagi-client.js";
window.start = async (url) => {
  const room = new Client(url).room("busy");
  await room.join();
  window.room = room;
  window.changes = 0;
  room.on("change", () => { window.changes++; });
  return room.seq;
};
window.ready = true;
`;

interface PageWindow {
  ready?: boolean;
  start(url: string): Promise<number>;
  room: { seq: number };
  changes: number;
}

const relay = await startRelay(["--rate-limit", "1000000", "--rate-burst", "1000000"]);
const origin = `http://127.0.0.1:${relay.port}`;
const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
try {
  const setup = new Client(relay.url);
  const players: Record<string, { x: number; y: number; hp: number; name: string }> = {};
  for (let i = 0; i < PLAYERS; i++) players[`p${i}`] = { x: 0, y: 0, hp: 100, name: `player ${i}` };
  await setup.room("busy").send({ merge: { players, tick: 0 } });
  setup.close();

  const page = await browser.newPage();
  await page.goto(origin + "/inspector");
  await page.addScriptTag({ type: "module", content: HARNESS });
  await page.waitForFunction(() => (globalThis as unknown as PageWindow).ready === true);
  const startSeq = await page.evaluate((url) => (globalThis as unknown as PageWindow).start(url), relay.url);
  const cdp = await page.context().newCDPSession(page);
  await cdp.send("Performance.enable");
  const metric = async (name: string): Promise<number> => {
    const { metrics } = await cdp.send("Performance.getMetrics");
    return metrics.find((m) => m.name === name)?.value ?? 0;
  };
  const task0 = await metric("TaskDuration");
  const t0 = performance.now();

  const perWriter = Math.floor(DELTAS / WRITERS);
  await Promise.all(
    Array.from({ length: WRITERS }, async (_, w) => {
      const client = new Client(relay.url);
      const room = client.room("busy");
      // WINDOW deltas in flight per writer: the relay's order, not the client's wait.
      const inflight = new Set<Promise<unknown>>();
      for (let i = 0; i < perWriter; i++) {
        const p = (i * WRITERS + w) % PLAYERS;
        const sent: Promise<unknown> =
          i % 2 === 0
            ? room.send({ merge: { players: { [`p${p}`]: { x: i, y: -i } }, tick: i } })
            : room.send({ patch: [{ op: "replace", path: `/players/p${p}/hp`, value: i % 100 }] });
        inflight.add(sent);
        void sent.finally(() => inflight.delete(sent));
        if (inflight.size >= WINDOW) await Promise.race(inflight);
      }
      await Promise.all(inflight);
      client.close();
    }),
  );
  const total = perWriter * WRITERS;
  await page.waitForFunction(
    (target) => (globalThis as unknown as PageWindow).room.seq >= target,
    startSeq + total,
    { timeout: 120_000, polling: 10 },
  );
  const seconds = (performance.now() - t0) / 1000;
  const taskSeconds = (await metric("TaskDuration")) - task0;
  const frames = await page.evaluate(() => (globalThis as unknown as PageWindow).changes);
  console.log(
    JSON.stringify(
      {
        deltas: total,
        writers: WRITERS,
        frames,
        seconds: Number(seconds.toFixed(2)),
        deltas_per_s_applied: Math.round(total / seconds),
        main_thread_ms_total: Number((taskSeconds * 1000).toFixed(1)),
        main_thread_us_per_delta: Number(((taskSeconds * 1e6) / total).toFixed(1)),
        main_thread_us_per_frame: Number(((taskSeconds * 1e6) / Math.max(frames, 1)).toFixed(1)),
        main_thread_busy_fraction: Number((taskSeconds / seconds).toFixed(3)),
        machine: `${cpus().length} x ${cpus()[0]?.model ?? "?"}, node ${process.version}, chromium headless`,
      },
      null,
      1,
    ),
  );
} finally {
  await browser.close();
  await relay.stop();
}
