/**
 * The client through a Sentinel failover: a relay on the repository's test topology
 * (test/sentinel_topology.py runs kit/topology.py: 1 master, 2 replicas, 3 Sentinels), with
 * `--ack replica`; the master is killed (SIGKILL) while two clients write. Every delta the
 * clients sent is acknowledged exactly once (sent again with its key on `unavailable`), and
 * both end with the relay's state.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { describe, it } from "node:test";
import { Client, type Json } from "../src/index.js";
import { PYTHON, REPO, startRelay, until } from "./helpers.js";

describe("Sentinel failover", () => {
  it("two clients keep writing through a failover: nothing lost, nothing twice", { timeout: 120_000 }, async () => {
    const topo = spawn(PYTHON, [`${REPO}/clients/js/test/sentinel_topology.py`], {
      cwd: REPO,
      env: { ...process.env, PYTHONPATH: REPO },
      stdio: ["pipe", "pipe", "inherit"],
    });
    const lines = createInterface({ input: topo.stdout })[Symbol.asyncIterator]();
    const next = async (): Promise<Record<string, string>> => {
      const line = await lines.next();
      if (line.done === true) throw new Error("the topology script ended");
      return JSON.parse(line.value) as Record<string, string>;
    };
    const exited = new Promise<void>((done) => topo.once("exit", () => { done(); }));
    try {
      const ready = await next();
      const relay = await startRelay([
        "--sentinels", ready["sentinels"] ?? "", "--master", ready["master_name"] ?? "", "--ack", "replica",
        "--rate-limit", "100000", "--rate-burst", "100000",
      ]);
      // Retried with the same key until the new master takes writes (a few seconds).
      const options = { minDelay: 50, maxDelay: 500, unavailableRetries: 1000 };
      const a = new Client(relay.url, options);
      const b = new Client(relay.url, { ...options, format: "msgpack" });
      try {
        const ra = a.room("failover");
        const rb = b.room("failover");
        await ra.join();
        await ra.send({ merge: { log: [] } });
        await rb.join();
        const write = async (room: typeof ra, name: string, count: number): Promise<number[]> => {
          const seqs: number[] = [];
          for (let i = 1; i <= count; i++) {
            const value = `${name}${i}`;
            seqs.push((await room.send({ patch: [{ op: "add", path: "/log/-", value }] })).seq);
            await new Promise((r) => setTimeout(r, 5));
          }
          return seqs;
        };
        const writers = [write(ra, "A", 300), write(rb, "B", 300)];
        await until(() => ra.seq > 100, "writes before the failover");
        topo.stdin.write("kill-master\n");
        const promoted = await next();
        assert.notEqual(promoted["master"], ready["master"]);
        const seqs = (await Promise.all(writers)).flat();
        assert.equal(new Set(seqs).size, 600, "each delta acknowledged with its own seq");
        const last = Math.max(...seqs);
        await until(() => ra.seq === last && rb.seq === last, `both at seq ${last}`);
        assert.deepEqual(ra.state, rb.state);
        const log = (ra.state as { log: string[] }).log;
        for (const name of ["A", "B"]) {
          assert.deepEqual(
            log.filter((e) => e.startsWith(name)),
            Array.from({ length: 300 }, (_, i) => `${name}${i + 1}`),
            `${name}: every delta once, in order`,
          );
        }
        const check = new Client(relay.url);
        const state: Json = (await check.room("failover").join()).state;
        check.close();
        assert.deepEqual(state, ra.state);
      } finally {
        a.close();
        b.close();
        await relay.stop();
      }
    } finally {
      topo.stdin.end();
      await exited;
    }
  });
});
