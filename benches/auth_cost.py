"""What identity costs: connection setup rate and delta throughput of a relay with
`--jwt-secret` against one without, same load, in one run (rounds alternate, medians).

    .venv/bin/python -m benches.auth_cost [--rounds 3] [--connections 400] [--seconds 4]
        [--clients 16] [--window 8] [--together] [--json out.json]

Two relay subprocesses (the real command line, memory backend, 127.0.0.1): `anonymous`,
and `jwt` (KASAGI_JWT_SECRET). One client process (this one) drives both:

- setup: `--connections` connections, 32 at a time, each until it is usable: connect, (jwt:
  send `auth` with a fresh HS256 token), join a room, read `joined`. Reported as connections
  per second.
- deltas: `--clients` connections, each in its own room, each keeping `--window` deltas in
  flight for `--seconds`. Reported as acks per second.
- the relay process's CPU (user + system, /proc) per connection set up and per
  acknowledged delta, in microseconds: far less sensitive than rates to what else runs on
  the machine (for the CPU rows a ratio above 1 is the extra cost of the jwt relay).

Rounds alternate which relay goes first; with `--together` both relays are loaded at the
same time in each round (one client process, so each gets a share of the same machine and
whatever else runs on it hits both alike: the fairer ratio on a shared machine).

Also `verify_us`: microseconds per token of auth.Verifier.verify by key type (HS256,
RS256, ES256, EdDSA), in this process.

The goal (issue 10): deltas with a token >= 0.9x the anonymous rate; a verified token costs
once per connection, so setup shows the verification's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from typing import Any

import jwt
from websockets.asyncio.client import ClientConnection, connect

from testkit.proc import cpu_seconds
from testkit.relay import relay_process

SECRET = "bench-" + "x" * 42
PARALLEL = 32


def mint(sub: str) -> str:
    claims = {"sub": sub, "exp": int(time.time()) + 3600, "rooms": {"*": "rw"}}
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def open_usable(url: str, authed: bool, room: str) -> ClientConnection:
    ws = await connect(url, subprotocols=["kasagi.v1.json"], compression=None)  # type: ignore[list-item]
    if authed:
        await ws.send(json.dumps({"t": "auth", "token": mint(room)}))
    await ws.send(json.dumps({"t": "join", "room": room}))
    while True:
        reply = json.loads(await ws.recv())
        if reply["t"] == "joined":
            return ws
        if reply["t"] == "error":
            raise RuntimeError(reply)


async def setup_rate(url: str, authed: bool, connections: int) -> float:
    gate = asyncio.Semaphore(PARALLEL)

    async def one(i: int) -> None:
        async with gate:
            ws = await open_usable(url, authed, f"setup-{i % 50}")
            await ws.close()

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(connections)))
    return connections / (time.perf_counter() - start)


async def delta_rate(url: str, authed: bool, clients: int, window: int, seconds: float) -> float:
    sockets = [await open_usable(url, authed, f"deltas-{i}") for i in range(clients)]
    stop = time.monotonic() + seconds
    acks = 0

    async def drive(ws: ClientConnection, room: str) -> None:
        nonlocal acks
        n = 0
        inflight = 0
        while True:
            while inflight < window and time.monotonic() < stop:
                n += 1
                await ws.send(json.dumps({"t": "delta", "room": room, "merge": {"n": n}}))
                inflight += 1
            if inflight == 0:
                return
            reply = json.loads(await ws.recv())
            if reply["t"] == "ack":
                inflight -= 1
                if time.monotonic() < stop:
                    acks += 1
            elif reply["t"] == "error":
                raise RuntimeError(reply)

    start = time.monotonic()
    await asyncio.gather(*(drive(ws, f"deltas-{i}") for i, ws in enumerate(sockets)))
    elapsed = min(time.monotonic(), stop) - start
    for ws in sockets:
        await ws.close()
    return acks / elapsed


async def measured(pid: int, count: int, work: Any) -> tuple[float, float]:
    """(rate, relay CPU microseconds per unit) of one phase: `work` returns units/s and
    does about `count` units (setup) or reports its own count via the rate (deltas)."""
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    rate = await work
    cpu, elapsed = cpu_seconds(pid) - cpu0, time.monotonic() - t0
    units = count if count else rate * elapsed
    return rate, cpu / units * 1e6 if units else float("nan")


def verify_cost() -> dict[str, float]:
    """Microseconds per token of `auth.Verifier.verify` by key type (best of 5 x 500): what
    a connection pays once, and each refresh."""
    import timeit

    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    from kasagi_relay.auth import Verifier

    claims = {"sub": "alice", "exp": time.time() + 3600, "rooms": {"*": "rw"}}
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    cases: list[tuple[str, Verifier, str]] = [
        ("HS256", Verifier(secret=SECRET.encode()), jwt.encode(claims, SECRET, "HS256")),
        ("RS256", Verifier(public_key=rsa_key.public_key()), jwt.encode(claims, rsa_key, "RS256")),
        ("ES256", Verifier(public_key=ec_key.public_key()), jwt.encode(claims, ec_key, "ES256")),
        ("EdDSA", Verifier(public_key=ed_key.public_key()), jwt.encode(claims, ed_key, "EdDSA")),
    ]
    out = {}
    for name, verifier, token in cases:
        best = min(timeit.repeat(lambda: verifier.verify(token), number=500, repeat=5))  # noqa: B023
        out[name] = round(best / 500 * 1e6, 1)
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    common = ("--rate-limit", "0", "--rate-bytes", "0", "--max-connections-per-address", "0")
    kinds = ("setup", "deltas", "setup_cpu_us", "delta_cpu_us")
    results: dict[str, dict[str, list[float]]] = {
        "anonymous": {k: [] for k in kinds},
        "jwt": {k: [] for k in kinds},
    }
    async with (
        relay_process(*common) as anon,
        relay_process(*common, env={"KASAGI_JWT_SECRET": SECRET}) as auth,
    ):
        targets = {"anonymous": (anon.url, False), "jwt": (auth.url, True)}
        pids = {"anonymous": anon.proc.pid, "jwt": auth.proc.pid}

        def setup(name: str) -> Any:
            url, authed = targets[name]
            return measured(pids[name], args.connections, setup_rate(url, authed, args.connections))

        def deltas(name: str) -> Any:
            url, authed = targets[name]
            work = delta_rate(url, authed, args.clients, args.window, args.seconds)
            return measured(pids[name], 0, work)

        def note(name: str, kind: str, outcome: tuple[float, float]) -> None:
            results[name][kind].append(outcome[0])
            cpu = "setup_cpu_us" if kind == "setup" else "delta_cpu_us"
            results[name][cpu].append(outcome[1])

        await setup_rate(anon.url, False, 50)  # warm-up
        await setup_rate(auth.url, True, 50)
        names = list(targets)
        for r in range(args.rounds):
            if args.together:
                # Both relays loaded at once: whatever else the machine does hits both alike.
                for kind, phase in (("setup", setup), ("deltas", deltas)):
                    outcomes = await asyncio.gather(*(phase(n) for n in names))
                    for name, outcome in zip(names, outcomes, strict=True):
                        note(name, kind, outcome)
                continue
            for name in names if r % 2 == 0 else reversed(names):
                note(name, "setup", await setup(name))
                note(name, "deltas", await deltas(name))
    summary: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "args": vars(args),
        "verify_us": verify_cost(),
    }
    for name, runs in results.items():
        summary[name] = {k: round(statistics.median(v), 1) for k, v in runs.items()}
        summary[name]["runs"] = {k: [round(x, 1) for x in v] for k, v in runs.items()}
    for kind in kinds:
        summary[f"{kind}_ratio"] = round(summary["jwt"][kind] / summary["anonymous"][kind], 3)
        # Round by round (the two relays of a round ran under the same conditions).
        paired = [
            j / a for j, a in zip(results["jwt"][kind], results["anonymous"][kind], strict=True)
        ]
        summary[f"{kind}_ratio_paired"] = round(statistics.median(paired), 3)
    return summary


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=400)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--json", default=None)
    p.add_argument(
        "--together",
        action="store_true",
        help="load both relays at once in each round (a fair ratio on a busy machine) "
        "rather than one after the other",
    )
    args = p.parse_args()
    summary = asyncio.run(main(args))
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    cli()
