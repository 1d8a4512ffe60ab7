/**
 * Real parts for the tests: a relay started as `python -m kasagi_relay` and a redis-server,
 * each a child process on a free loopback port, stopped by its PID.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { createServer } from "node:net";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

// build/test/helpers.js -> the repository root (clients/js/build/test/../../../..).
export const REPO = process.env["KASAGI_REPO"] ?? resolve(dirname(fileURLToPath(import.meta.url)), "../../../..");
export const PYTHON = process.env["KASAGI_PYTHON"] ?? join(REPO, ".venv/bin/python");

export async function freePort(): Promise<number> {
  return new Promise((done, fail) => {
    const server = createServer();
    server.once("error", fail);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address !== null ? address.port : 0;
      server.close(() => {
        done(port);
      });
    });
  });
}

export interface Relay {
  url: string;
  port: number;
  proc: ChildProcess;
  stderr: string[];
  /** SIGKILL (a crash) or SIGTERM (graceful: members get 1001), then wait for the exit. */
  stop(signal?: NodeJS.Signals): Promise<void>;
}

export async function startRelay(args: string[] = [], port = 0): Promise<Relay> {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("KASAGI_")) env[k] = v;
  env["PYTHONPATH"] = [REPO, process.env["PYTHONPATH"]].filter(Boolean).join(":");
  const proc = spawn(PYTHON, ["-m", "kasagi_relay", "--port", String(port), ...args], {
    cwd: REPO,
    env,
    stdio: ["ignore", "ignore", "pipe"],
  });
  const stderr: string[] = [];
  const exited = new Promise<void>((done) => proc.once("exit", () => { done(); }));
  const url = await new Promise<string>((done, fail) => {
    const timer = setTimeout(() => { fail(new Error(`relay did not start: ${stderr.join("\n")}`)); }, 20_000);
    let buffer = "";
    proc.stderr.on("data", (chunk: Buffer) => {
      buffer += chunk.toString();
      const lines = buffer.split("\n");
      buffer = lines.pop() ?? "";
      for (const line of lines) {
        stderr.push(line);
        const m = /serving (wss?:\/\/\S+)/.exec(line);
        if (m?.[1] !== undefined) {
          clearTimeout(timer);
          done(m[1]);
        }
      }
    });
    proc.once("error", (error) => {
      clearTimeout(timer);
      fail(new Error(`cannot run ${PYTHON} (set KASAGI_PYTHON): ${error.message}`));
    });
    proc.once("exit", (code) => {
      clearTimeout(timer);
      fail(new Error(`relay exited with ${String(code)}: ${stderr.join("\n")}`));
    });
  });
  return {
    url,
    port: Number(new URL(url).port),
    proc,
    stderr,
    async stop(signal: NodeJS.Signals = "SIGTERM") {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      await exited;
    },
  };
}

export interface Redis {
  url: string;
  port: number;
  stop(): Promise<void>;
}

export async function startRedis(): Promise<Redis> {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), "kasagi-js-redis-"));
  const proc = spawn(
    process.env["KASAGI_REDIS_SERVER"] ?? "redis-server",
    ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir],
    { stdio: ["ignore", "pipe", "pipe"] },
  );
  const exited = new Promise<void>((done) => proc.once("exit", () => { done(); }));
  await new Promise<void>((done, fail) => {
    const timer = setTimeout(() => { fail(new Error("redis-server did not start")); }, 10_000);
    proc.stdout.on("data", (chunk: Buffer) => {
      if (chunk.toString().includes("Ready to accept connections")) {
        clearTimeout(timer);
        done();
      }
    });
    proc.once("error", (error) => {
      clearTimeout(timer);
      fail(new Error(`cannot run redis-server: ${error.message}`));
    });
    proc.once("exit", (code) => {
      clearTimeout(timer);
      fail(new Error(`redis-server exited with ${String(code)}`));
    });
  });
  return {
    url: `redis://127.0.0.1:${port}/0`,
    port,
    async stop() {
      if (proc.exitCode === null) proc.kill("SIGTERM");
      await exited;
    },
  };
}

/** Waits until `check()` is true; fails with `what` after `ms`. */
export async function until(check: () => boolean, what: string, ms = 30_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
