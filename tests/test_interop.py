"""Publishers and subscribers that are not this project, through the same Redis keys:

- `redis-cli FCALL kasagi_publish 4 ...` publishes a delta that relay members (the
  project's client, `kasagi_relay.client`) receive;
- the Node ioredis client, connecting through the Sentinels as docs/operations.md
  ("Connecting applications") shows, publishes with FCALL (idempotent with a key) and reads
  the compacted snapshot;
- a plain redis-py subscriber on `room:{R}:channel` sees the relay's deltas.

ioredis is installed with npm once into `.cache/node` (git-ignored) and reused; the test
skips, saying why, only when npm cannot install it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from kasagi_relay.client import Client
from kasagi_relay.config import Config
from testkit.redis import REDIS_CLI, Topology, running_topology
from testkit.relay import REPO, start_relay

pytestmark = pytest.mark.timeout(180)

NODE_CACHE = REPO / ".cache" / "node"
ROOM = "interop"
RPW, SPW = "redis-pw", "sentinel-pw"

NODE_SCRIPT = r"""
const Redis = require('ioredis');
const [sentinels, name, room, delta, key, password, sentinelPassword] = process.argv.slice(2);
const redis = new Redis({
  sentinels: JSON.parse(sentinels), name, password, sentinelPassword,
  maxRetriesPerRequest: 3,
});
const k = (s) => `room:{${room}}:${s}`;
(async () => {
  const args = [k('seq'), k('ops'), k('channel'), k('keys'), 'merge', delta, key];
  const seq = await redis.call('FCALL', 'kasagi_publish', 4, ...args);
  const again = await redis.call('FCALL', 'kasagi_publish', 4, ...args);
  const snapshot = await redis.hgetall(k('snapshot'));
  const master = redis.options.host + ':' + redis.stream.remotePort;
  console.log(JSON.stringify({ seq, again, snapshot, master }));
  redis.disconnect();
})().catch((e) => { console.error(String(e && e.stack || e)); process.exit(1); });
"""


@pytest.fixture(scope="module")
def ioredis() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node/npm not installed")
    modules = NODE_CACHE / "node_modules"
    if not (modules / "ioredis" / "package.json").exists():
        NODE_CACHE.mkdir(parents=True, exist_ok=True)
        ignore = NODE_CACHE.parent / ".gitignore"
        if not ignore.exists():
            ignore.write_text("*\n")
        try:
            proc = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--prefix", str(NODE_CACHE),
                 "ioredis@5"],
                capture_output=True, text=True, timeout=180,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.skip("npm install ioredis timed out (registry unreachable?)")
        if proc.returncode != 0:
            pytest.skip(f"npm cannot install ioredis: {proc.stderr.strip()[-500:]}")
    return modules


@pytest.fixture
def topo(tmp_path: Path) -> Iterator[Topology]:
    with running_topology(tmp_path / "t", password=RPW, sentinel_password=SPW) as t:
        yield t


async def test_interop(topo: Topology, ioredis: Path, tmp_path: Path) -> None:
    config = Config(
        sentinels=tuple(topo.sentinel_addrs),
        redis_password=RPW,
        sentinel_password=SPW,
        ack="replica",
        compaction_interval_s=0.3,
    )
    host, port = topo.master_addr()
    keys = [f"room:{{{ROOM}}}:{s}" for s in ("seq", "ops", "channel", "keys")]
    async with start_relay(config) as relay, Client(relay.url) as member:
        room = await member.join(ROOM)
        assert (room.seq, room.state) == (0, {})
        changes = aiter(room)
        plain = aioredis.Redis(host=host, port=port, password=RPW)
        sub = plain.pubsub()
        await sub.subscribe(f"room:{{{ROOM}}}:channel")

        # 1. redis-cli publishes; the relay's member receives it.
        out = await asyncio.to_thread(
            subprocess.run,
            [REDIS_CLI, "-h", host, "-p", str(port), "-a", RPW, "--no-auth-warning",
             "FCALL", "kasagi_publish", "4", *keys, "merge", '{"cli":1}', "cli-1"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        assert out.stdout.strip() == "1", out
        change = await asyncio.wait_for(anext(changes), 5)
        assert (change.kind, change.from_seq, change.seq) == ("delta", 1, 1)
        assert change.delta == {"merge": {"cli": 1}}

        # 2. The relay publishes; a plain redis-py subscriber sees it on the channel.
        async with Client(relay.url) as writer:
            assert await writer.send(ROOM, merge={"ws": 2}, key="ws-2") == 2
        seen: list[object] = []
        async with asyncio.timeout(5):
            while len(seen) < 2:
                m = await sub.get_message(timeout=1)
                if m and m["type"] == "message":
                    seen.append(json.loads(m["data"]))
        assert seen == [{"seq": 1, "merge": {"cli": 1}}, {"seq": 2, "merge": {"ws": 2}}]
        change = await asyncio.wait_for(anext(changes), 5)
        assert (change.seq, change.delta) == (2, {"merge": {"ws": 2}})

        # Compaction writes the snapshot that ioredis reads below.
        async with asyncio.timeout(10):
            while (await plain.hget(f"room:{{{ROOM}}}:snapshot", "seq")) != b"2":  # noqa: ASYNC110
                await asyncio.sleep(0.1)

        # 3. ioredis through the Sentinels: FCALL twice with one key, then the snapshot.
        script = tmp_path / "interop.js"
        script.write_text(NODE_SCRIPT)
        sentinels = json.dumps([{"host": h, "port": p} for h, p in topo.sentinel_addrs])
        proc = await asyncio.create_subprocess_exec(
            "node", str(script), sentinels, topo.master_name, ROOM, '{"node":3}', "node-3",
            RPW, SPW,
            env={"NODE_PATH": str(ioredis), "PATH": "/usr/bin:/bin:/usr/local/bin"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, stderr.decode()
        result = json.loads(stdout)
        assert (result["seq"], result["again"]) == (3, 3)
        assert result["snapshot"]["seq"] == "2"
        assert json.loads(result["snapshot"]["data"]) == {"cli": 1, "ws": 2}
        assert result["master"].endswith(f":{port}")
        change = await asyncio.wait_for(anext(changes), 5)
        assert (change.seq, change.delta) == (3, {"merge": {"node": 3}})
        assert change.state == {"cli": 1, "ws": 2, "node": 3}
        # The idempotent second FCALL published nothing.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(changes), 0.5)
        assert member.gaps == [] and member.disconnects == []

        async with Client(relay.url) as late:
            joined = await late.join(ROOM)
            assert (joined.seq, joined.state) == (3, {"cli": 1, "ws": 2, "node": 3})
        await sub.aclose()  # type: ignore[no-untyped-call]
        await plain.aclose()
