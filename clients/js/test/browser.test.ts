/**
 * The client in a real browser: headless Chromium (Debian's `chromium`, CHROMIUM to point
 * elsewhere) driven by playwright-core, two pages on one room against a real relay.
 *
 * The relay does not serve static pages yet (GET /kasagi-client.js and /inspector are #14's
 * second half), so the page and the browser build (dist/kasagi-client.js) come from a small
 * HTTP server on loopback. Chromium's local-network-access check blocks ws://127.0.0.1 only
 * from public pages (such as those injected by the driver); a loopback page may connect.
 */
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { type Browser, chromium, type Page } from "playwright-core";
import { REPO, type Relay, startRelay } from "./helpers.js";

const CHROMIUM = process.env["CHROMIUM"] ?? "/usr/bin/chromium";
const BUNDLE = join(REPO, "clients/js/dist/kasagi-client.js");
const PAGE = `<!doctype html><meta charset="utf-8"><title>kasagi test</title>
<script type="module">
  import * as kasagi from "/kasagi-client.js";
  window.kasagi = kasagi;
  window.ready = true;
</script>`;

interface PageRoom {
  seq: number;
  state: unknown;
  breaks: string[];
}

describe("in Chromium", { skip: existsSync(CHROMIUM) ? false : `no ${CHROMIUM}` }, () => {
  let relay: Relay;
  let server: Server;
  let browser: Browser;
  let origin = "";

  before(async () => {
    relay = await startRelay(["--rate-limit", "100000", "--rate-burst", "100000"]);
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
    await relay.stop();
  });

  async function open(): Promise<Page> {
    const page = await browser.newPage();
    page.on("pageerror", (error) => { console.error("page error:", error); });
    await page.goto(origin + "/");
    await page.waitForFunction(() => (window as unknown as { ready?: boolean }).ready === true);
    return page;
  }

  it("two pages on one room converge after 1,000 deltas from each", async () => {
    const pages = [await open(), await open()];
    const url = relay.url;
    // Each page joins, then sends its 1,000 deltas; the first also creates /log first.
    await Promise.all(
      pages.map((page, i) =>
        page.evaluate(
          async ({ url, name, first }) => {
            type K = typeof import("../src/index.js");
            const { Client } = (window as unknown as { kasagi: K }).kasagi;
            const client = new Client(url);
            const room = client.room("browser-converge");
            await room.join();
            if (first) await room.send({ merge: { log: [] } });
            const record = { breaks: [] as string[] };
            let last = room.seq;
            room.on("change", (_s, { from, seq }) => {
              if (from !== last + 1) record.breaks.push(`${from} after ${last}`);
              last = seq;
            });
            Object.assign(window, { room, record, name });
            return room.seq;
          },
          { url, name: i === 0 ? "A" : "B", first: i === 0 },
        ),
      ),
    );
    await Promise.all(
      pages.map((page) =>
        page.evaluate(async () => {
          const w = window as unknown as { room: import("../src/index.js").Room; name: string };
          const sent = [];
          for (let i = 1; i <= 1000; i++) {
            sent.push(
              i % 2 === 0
                ? w.room.send({ patch: [{ op: "add", path: "/log/-", value: `${w.name}${i}` }] })
                : w.room.send({ merge: { [w.name]: i } }),
            );
          }
          await Promise.all(sent);
        }),
      ),
    );
    const read = (page: Page): Promise<PageRoom> =>
      page.evaluate(() => {
        const w = window as unknown as { room: import("../src/index.js").Room; record: { breaks: string[] } };
        return { seq: w.room.seq, state: w.room.state, breaks: w.record.breaks };
      });
    const deadline = Date.now() + 30_000;
    let rooms = await Promise.all(pages.map(read));
    while (rooms.some((r) => r.seq !== 2001) && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 100));
      rooms = await Promise.all(pages.map(read));
    }
    const [a, b] = rooms as [PageRoom, PageRoom];
    assert.equal(a.seq, 2001);
    assert.equal(b.seq, 2001);
    assert.deepEqual(a.state, b.state);
    assert.deepEqual(a.breaks, []);
    assert.deepEqual(b.breaks, []);
    const log = (a.state as { log: string[] }).log;
    assert.equal(log.length, 1000);
    assert.deepEqual(log.filter((e) => e.startsWith("A")), Array.from({ length: 500 }, (_, i) => `A${2 * (i + 1)}`));
  });
});
