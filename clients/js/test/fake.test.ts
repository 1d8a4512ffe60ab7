/**
 * Behaviour the real relay cannot be made to show on demand, against a FAKE relay (a `ws`
 * server speaking the protocol by hand): close 4001 and 1008, a token refreshed before it
 * expires (the relay's identity is built on another branch), a stream with a gap, and a
 * `reset`. Everything else is tested against the real relay in relay.test.ts.
 */
import assert from "node:assert/strict";
import type { IncomingMessage } from "node:http";
import { after, before, describe, it } from "node:test";
import { WebSocket, WebSocketServer } from "ws";
import { Client, ConnectionError, type Json } from "../src/index.js";
import { until } from "./helpers.js";

type Handler = (ws: WebSocket, request: IncomingMessage, n: number) => void;

describe("against a fake relay", () => {
  let server: WebSocketServer;
  let url = "";
  let handler: Handler = () => undefined;
  let connections = 0;

  before(async () => {
    server = new WebSocketServer({ host: "127.0.0.1", port: 0, handleProtocols: (p) => [...p][0] ?? false });
    server.on("connection", (ws, request) => {
      handler(ws, request, ++connections);
    });
    await new Promise<void>((done) => server.once("listening", () => { done(); }));
    const address = server.address();
    url = `ws://127.0.0.1:${typeof address === "object" && address !== null ? address.port : 0}/ws`;
  });
  after(async () => {
    for (const ws of server.clients) ws.terminate();
    await new Promise<void>((done) => { server.close(() => { done(); }); });
  });

  const messages = (ws: WebSocket, on: (msg: Record<string, unknown>) => void): void => {
    ws.on("message", (data: Buffer) => {
      on(JSON.parse(data.toString()) as Record<string, unknown>);
    });
  };

  it("4001: asks getToken for a fresh token and reconnects; without getToken it stops", async () => {
    connections = 0;
    const auth: (string | undefined)[] = [];
    handler = (ws, request, n) => {
      auth.push(request.headers.authorization);
      if (n === 1) ws.close(4001, "token expired");
      else messages(ws, (m) => { ws.send(JSON.stringify({ t: "joined", id: m["id"], room: m["room"], seq: 0, state: {} })); });
    };
    let tokens = 0;
    const c = new Client(url, { minDelay: 10, maxDelay: 50, getToken: () => `t${++tokens}` });
    try {
      await c.room("r").join();
      assert.deepEqual(auth, ["Bearer t1", "Bearer t2"]);
      assert.deepEqual(c.disconnects, [4001]);
    } finally {
      c.close();
    }

    connections = 0;
    handler = (ws) => { ws.close(4001, "token expired"); };
    const plain = new Client(url, { minDelay: 10, maxDelay: 50 });
    await assert.rejects(plain.room("r").join(), (e: unknown) => e instanceof ConnectionError && e.closeCode === 4001);
    assert.equal(plain.status, "disconnected");
    assert.equal(connections, 1);
    plain.close();
  });

  it("joins again with since on a gap, and replaces the state on reset", async () => {
    const joins: Record<string, unknown>[] = [];
    handler = (ws) => {
      messages(ws, (m) => {
        joins.push(m);
        const send = (x: object): void => { ws.send(JSON.stringify(x)); };
        if (joins.length === 1) {
          send({ t: "joined", id: m["id"], room: "r", seq: 1, state: { a: 1 } });
          send({ t: "delta", room: "r", from: 2, seq: 2, merge: { a: 2 } });
          send({ t: "delta", room: "r", from: 4, seq: 4, merge: { a: 4 } }); // 3 is missing
        } else {
          send({ t: "joined", id: m["id"], room: "r", seq: 2, resumed: true });
          send({ t: "delta", room: "r", from: 3, seq: 4, merge: { a: 4, b: 3 } });
          send({ t: "reset", room: "r", seq: 10, state: { fresh: true } });
          send({ t: "delta", room: "r", from: 11, seq: 11, patch: [{ op: "add", path: "/n", value: 11 }] });
        }
      });
    };
    const c = new Client(url);
    const events: [string, Json, number][] = [];
    try {
      const room = c.room("r");
      room.on("change", (state, { seq }) => events.push(["change", state, seq]));
      room.on("reset", (state, { seq }) => events.push(["reset", state, seq]));
      await room.join();
      await until(() => room.seq === 11, "seq 11");
      assert.deepEqual(joins.map((j) => j["since"]), [undefined, 2]);
      assert.deepEqual(c.gaps, ["r: frame from 4 after seq 2"]);
      assert.deepEqual(events, [
        ["change", { a: 2 }, 2],
        ["change", { a: 4, b: 3 }, 4],
        ["reset", { fresh: true }, 10],
        ["change", { fresh: true, n: 11 }, 11],
      ]);
      assert.deepEqual(room.state, { fresh: true, n: 11 });
    } finally {
      c.close();
    }
  });
  it("a page's token goes as the first message, is refreshed before exp, and 1008 is final", async () => {
    connections = 0;
    const got: Record<string, unknown>[] = [];
    let socket: WebSocket | undefined;
    handler = (ws) => {
      socket = ws;
      messages(ws, (m) => {
        got.push(m);
        if (m["t"] === "auth") {
          // Expires in 2 s: refreshed 1 s before (half its life, under the 30 s margin).
          ws.send(JSON.stringify({ t: "authed", sub: "u1", exp: Date.now() / 1000 + 2 }));
        } else if (m["t"] === "join") {
          ws.send(JSON.stringify({ t: "joined", id: m["id"], room: "r", seq: 0, state: {} }));
        }
      });
    };
    let tokens = 0;
    // The WebSocket option stands for a browser's: no headers, so the token is a message.
    const c = new Client(url, { minDelay: 10, maxDelay: 50, WebSocket, getToken: () => `t${++tokens}` });
    const errors: unknown[] = [];
    c.on("error", (e) => errors.push(e));
    try {
      await c.room("r").join();
      assert.deepEqual(got.slice(0, 2).map((m) => [m["t"], m["token"]]), [["auth", "t1"], ["join", undefined]]);
      await until(() => got.length === 3, "the refresh", 5000);
      assert.deepEqual([got[2]?.["t"], got[2]?.["token"]], ["auth", "t2"]);
      assert.equal(connections, 1); // refreshed in place
      socket?.close(1008, "authentication failed");
      await until(() => c.status === "disconnected", "disconnected");
      await new Promise((r) => setTimeout(r, 200));
      assert.equal(connections, 1); // never reconnected after 1008
      assert.ok(errors.some((e) => e instanceof ConnectionError && e.closeCode === 1008));
    } finally {
      c.close();
    }
  });
});
