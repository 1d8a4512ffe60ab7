"""Faults under load: a real Sentinel topology, two relay processes, several writers and
members (the project's client, kasagi_relay.client, driven by testkit/failover.py) spread
over both, and the checks of issue 4 after each fault, made by the harness itself from the
Redis history, a fresh join and the snapshot, not taken from the client's counters:

- every acknowledged delta is in the new master's history, exactly once, at its acked seq;
- every member's seqs are gapless and duplicate-free and its state is state(N);
- the members, a fresh joiner and the compacted snapshot agree;
- delivery resumes within 10 s of the fault.

The control run (`--ack leader`, SIGSTOP) may lose a delta; it records whether it did.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.exceptions import AuthenticationError

from kasagi_relay.backends.base import Op
from kasagi_relay.backends.sentinel import SentinelBackend
from kasagi_relay.config import Config
from testkit.failover import (
    Outcome,
    Stream,
    fresh_join_state,
    health,
    lost_keys,
    read_history,
    relay_args,
    snapshot_agrees,
    wait_healthy,
)
from testkit.redis import Topology, running_topology
from testkit.relay import RelayProcess, relay_process, start_relay

pytestmark = pytest.mark.timeout(120)

RESUME_WITHIN_S = 10.0
RESULTS: dict[str, Outcome] = {}


@pytest.fixture
def topo(tmp_path: Path) -> Iterator[Topology]:
    with running_topology(tmp_path / "topology") as t:
        yield t


@contextlib.asynccontextmanager
async def two_relays(topo: Topology, ack: str) -> AsyncIterator[list[RelayProcess]]:
    args = relay_args(topo, ack)
    async with relay_process(*args) as a, relay_process(*args) as b:
        await wait_healthy([a.url, b.url], topo.master_addr(), 15)
        yield [a, b]


def report(name: str, out: Outcome) -> None:
    RESULTS[name] = out
    print(
        f"\n[{name}] acked={out.acked} last_seq={out.last_seq} lost={len(out.lost)} "
        f"dup={len(out.duplicated)} diverged={len(out.diverged)} resets={out.resets} "
        f"unavailable={out.unavailable} pause={out.pause_s} max_gap={out.max_gap_s:.2f}s "
        f"notes={out.notes}"
    )


async def agree(topo: Topology, relays: list[RelayProcess], out: Outcome) -> None:
    """Members (checked in `out`), a fresh joiner on each relay and the snapshot agree."""
    seq, snap_state, expect = await snapshot_agrees(topo)
    assert snap_state == expect, "the compacted snapshot differs from the history"
    for r in relays:
        if r.returncode is None:
            jseq, jstate = await fresh_join_state(r.url)
            assert (jseq, jstate) == (seq, expect), f"fresh joiner on {r.url} differs"


def assert_safe(out: Outcome) -> None:
    assert out.acked > 20, "the stream did not flow"
    assert not out.lost, f"acknowledged deltas lost: {out.lost[:10]}"
    assert not out.duplicated, f"deltas stored twice: {out.duplicated[:10]}"
    assert not out.wrong_seq, f"acked seqs differ from history: {out.wrong_seq[:10]}"
    assert not out.violations, f"gaps/duplicates: {out.violations}"
    assert not out.diverged, f"members differ from the history: {out.diverged}"
    assert out.pause_s is not None and out.pause_s < RESUME_WITHIN_S, out.pause_s
    assert out.max_gap_s < RESUME_WITHIN_S, f"no delivery for {out.max_gap_s:.1f}s"


async def run_stream(
    topo: Topology, relays: list[RelayProcess], fault: object, *, after: int = 40
) -> Outcome:
    """Stream ~1 s, run `fault()` (an async callable), then stream until `after` more acks."""
    stream = Stream([r.url for r in relays])
    try:
        await stream.start()
        await asyncio.sleep(1.0)
        stream.fault_at = time.monotonic()
        await fault()  # type: ignore[operator]
        await stream.wait_acks_after(time.monotonic(), after, 30)
        return await stream.finish(topo)
    finally:
        await stream.cancel()


# --------------------------------------------------------------------------- backend level


class _Rec:
    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.resyncs = 0

    def on_op(self, room: str, op: Op) -> None:
        self.seqs.append(op.seq)

    def on_resync(self, rooms: frozenset[str] | None) -> None:
        self.resyncs += 1


async def test_backend_follows_failover_with_passwords(tmp_path: Path) -> None:
    """The backend alone: Sentinel + Redis passwords, SIGKILL of the master, health 503
    then 200, a resync, and an idempotent retry landing on the new master."""
    with running_topology(tmp_path / "t", password="redispw", sentinel_password="sentpw") as t:
        b = SentinelBackend(
            t.sentinel_addrs, password="redispw", sentinel_password="sentpw", ack="replica"
        )
        rec = _Rec()
        b.set_listener(rec)
        await b.start()
        try:
            await b.subscribe("p")
            assert await b.publish("p", "merge", b'{"a":1}', key="a") == 1
            assert (await b.health())["ok"]
            old = t.master_addr()
            t.signal(t.node_at(old), signal.SIGKILL)
            assert not (await b.health())["ok"]
            t0 = time.monotonic()
            seq = await b.publish("p", "merge", b'{"b":1}', key="b")
            assert seq == 2
            print(f"\npublish resumed {time.monotonic() - t0:.2f}s after SIGKILL")
            assert await b.publish("p", "merge", b'{"b":1}', key="b") == 2
            new = t.wait_master_change(old)
            assert b._addr == new
            async with asyncio.timeout(5):
                while not (await b.health())["ok"]:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
            assert rec.resyncs >= 1 and b.switches == 1
        finally:
            await b.close()
        for kw in ({"sentinel_password": "wrong", "password": "redispw"},
                   {"sentinel_password": "sentpw", "password": "wrong"}):  # fmt: skip
            bad = SentinelBackend(t.sentinel_addrs, **kw)  # type: ignore[arg-type]
            with pytest.raises(AuthenticationError):
                await bad.start()
            await bad.close()


# --------------------------------------------------------------------------- relay level


async def test_sigkill_master(topo: Topology) -> None:
    """Also: /healthz turns 503 while no master is reachable and back to 200 after."""
    async with two_relays(topo, "replica") as relays:
        old = topo.master_addr()
        seen: list[bool] = []
        done = asyncio.Event()

        async def watch_health() -> None:
            while not done.is_set():
                seen.append(bool((await asyncio.to_thread(health, relays[0].url)).get("ok")))
                await asyncio.sleep(0.1)

        async def fault() -> None:
            topo.signal(topo.node_at(old), signal.SIGKILL)
            watcher = asyncio.create_task(watch_health())
            await asyncio.to_thread(topo.wait_master_change, old, 20.0)
            await wait_healthy([r.url for r in relays], None, 10)
            done.set()
            await watcher

        out = await run_stream(topo, relays, fault)
        report("sigkill-master", out)
        assert_safe(out)
        await agree(topo, relays, out)
        assert False in seen, "/healthz never reported the outage"
        assert seen[-1] or health(relays[0].url)["ok"], "/healthz did not recover"


async def split_brain(topo: Topology, ack: str) -> Outcome:
    async with two_relays(topo, ack) as relays:
        old = topo.master_addr()
        old_node = topo.node_at(old)

        async def fault() -> None:
            topo.signal(old_node, signal.SIGSTOP)
            new = await asyncio.to_thread(topo.wait_master_change, old, 20.0)
            # Both relays on the new master before the old one wakes up (as it would when
            # it comes back minutes later), then the old master resumes believing it is
            # still the master until the Sentinels demote it.
            await wait_healthy([r.url for r in relays], new, 15)
            topo.signal(old_node, signal.SIGCONT)

        out = await run_stream(topo, relays, fault)
        if ack != "leader":
            await agree(topo, relays, out)
        return out


async def test_sigstop_master_split_brain(topo: Topology) -> None:
    """With --ack replica, a write that reaches only the frozen (or resumed, demoted) old
    master never gets WAIT 1 (its replicas follow the new master), so it is never
    acknowledged: every ack is in the new master's history."""
    out = await split_brain(topo, "replica")
    report("sigstop-master", out)
    assert_safe(out)


async def test_sigstop_master_ack_leader_control(topo: Topology) -> None:
    """The control: --ack leader may lose what the frozen master acknowledged. Reported,
    not asserted (a loss is possible, not certain), to show the checks can see one."""
    out = await split_brain(topo, "leader")
    out.notes.append(f"ack=leader lost {len(out.lost)} acknowledged delta(s): {out.lost[:5]}")
    report("sigstop-master-ack-leader", out)
    assert out.acked > 20
    assert not out.duplicated and not out.violations
    # The checks can see a loss: an ack the history does not hold is reported as lost.
    acked = {"w0-0": 1, "ghost-1": out.last_seq + 1}
    _, ops = await read_history(topo)
    assert lost_keys(acked, ops) == ["ghost-1"]


async def test_sentinel_failover_command(topo: Topology) -> None:
    async with two_relays(topo, "replica") as relays:
        old = topo.master_addr()

        async def fault() -> None:
            topo.failover()  # returns at once: the failover itself follows
            await asyncio.to_thread(topo.wait_master_change, old, 20.0)

        out = await run_stream(topo, relays, fault)
        report("sentinel-failover", out)
        assert_safe(out)
        await agree(topo, relays, out)


async def test_sentinel_failover_unfenced_control(topo: Topology) -> None:
    """The control for the fence: the same SENTINEL FAILOVER with relays whose backend
    ignores +try-failover. WAIT 1 is then satisfied by the replica that is NOT promoted
    while the old master still takes writes, so acknowledged deltas may be lost. Reported,
    not asserted (it depends on timing)."""
    config = Config(
        sentinels=tuple(topo.sentinel_addrs), ack="replica", history=100_000,
        compaction_interval_s=1.0, rate_limit=0,
    )  # fmt: skip
    old = topo.master_addr()
    backends = [SentinelBackend(topo.sentinel_addrs, fence=False) for _ in range(2)]
    async with (
        start_relay(config, backend=backends[0]) as a,
        start_relay(config, backend=backends[1]) as b,
    ):
        stream = Stream([a.url, b.url])
        try:
            await stream.start()
            await asyncio.sleep(1.0)
            stream.fault_at = time.monotonic()
            topo.failover()
            await asyncio.to_thread(topo.wait_master_change, old, 20.0)
            await stream.wait_acks_after(time.monotonic(), 40, 30)
            out = await stream.finish(topo)
        finally:
            await stream.cancel()
    out.notes.append(f"unfenced: lost {len(out.lost)} acknowledged delta(s)")
    report("sentinel-failover-unfenced", out)
    assert out.acked > 20


async def test_replicas_stalled_wait_times_out(topo: Topology) -> None:
    """Both replicas frozen: WAIT 1 times out, writers get `unavailable`, retry with their
    key once the replicas are back, and each delta ends with exactly one seq."""
    async with two_relays(topo, "replica") as relays:
        master = topo.master()
        replicas = [n for n in topo.servers if n is not master]

        async def fault() -> None:
            for r in replicas:
                topo.signal(r, signal.SIGSTOP)
            await asyncio.sleep(2.5)
            for r in replicas:
                topo.signal(r, signal.SIGCONT)

        out = await run_stream(topo, relays, fault)
        report("replicas-stalled", out)
        assert out.unavailable > 0, "WAIT never timed out: the fault did not bite"
        assert_safe(out)
        await agree(topo, relays, out)
        assert topo.master_addr() == master.addr  # no failover happened


async def test_relay_sigkill_members_resume(topo: Topology) -> None:
    """A relay dies mid-stream: its writers and members move to the other relay; members
    rejoin with `since` and miss nothing."""
    async with two_relays(topo, "replica") as relays:
        victim = relays[0]

        async def fault() -> None:
            victim.proc.send_signal(signal.SIGKILL)
            await victim.proc.wait()

        stream = Stream([r.url for r in relays])
        try:
            await stream.start()
            await asyncio.sleep(1.0)
            stream.fault_at = time.monotonic()
            await fault()
            await stream.wait_acks_after(time.monotonic(), 40, 30)
            out = await stream.finish(topo)
            rejoins = sum(m.rejoins for m in stream.members)
            full = sum(m.full_rejoins for m in stream.members)
        finally:
            await stream.cancel()
        out.notes.append(f"rejoins={rejoins} full={full}")
        report("relay-sigkill", out)
        assert rejoins >= 2, "the killed relay's members did not rejoin"
        assert full == 0, "a member could not resume from history"
        assert_safe(out)
        await agree(topo, relays, out)


def test_zz_summary() -> None:
    """Prints what every scenario measured (run with -s to see it)."""
    for name, out in RESULTS.items():
        print(
            json.dumps(
                {
                    "scenario": name,
                    "pause_s": out.pause_s,
                    "lost": len(out.lost),
                    "acked": out.acked,
                    "unavailable": out.unavailable,
                    "max_gap_s": round(out.max_gap_s, 2),
                    "notes": out.notes,
                }
            )
        )
