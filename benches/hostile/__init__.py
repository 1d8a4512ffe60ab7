"""Hostile-client harness: `python -m benches.hostile` (issue #11, docs/operations.md).

For each class of hostile input found in issue #11 (items 1-12), the harness starts a fresh
relay (`python -m kasagi_relay` with its default flags on a free loopback port; with
`--redis` also against a redis-server on a free port, stopped by PID), starts a
well-behaved member in another room in its own process (`probe.py`: a small delta every
10 ms, each ack's latency recorded, an unanswered delta charged until the end), runs the
attack from hostile clients (`attacks.py`: websockets' asyncio client, and raw sockets in
`wire.py` for partial frames, pings without reading, pipelined frames, tiny windows), and
prints one row per class:

- worst stall: the longest the well-behaved member waited for an ack during the class
  (goal: at most 50 ms);
- peak RSS: the relay's VmHWM (/proc/PID/status), against a budget computed from the
  relay's configured limits (`rss_budget` in harness.py: the relay's idle RSS, what the
  limits relevant to the class allow, a room's state counted from --max-state-memory and
  --max-state-bytes as `room_budget`, and a 64 MiB margin);
- alive: whether the relay process is still running after the attack (a dead relay is
  reported and the next class gets a new one anyway: every class starts a fresh relay, so
  each peak RSS is that class's own);
- attacker got: the replies, close codes and HTTP statuses the attacker saw, and the
  number of tracebacks the relay logged.

Each attack is bounded in time and count (a few seconds; class 9 waits for the idle and
frame timeouts, at most 15 s; `--attack-timeout` cuts any attack); traffic is loopback only.

    python -m benches.hostile                      # all classes, memory backend
    python -m benches.hostile --redis --classes 3,11-12
    python -m benches.hostile --relay-flags='--max-state-bytes 65536'

Rows marked "not met" before the fixes of #11 land are expected: the table is the honest
state of the relay it ran against. Timing on a shared machine is noisy: rerun a class
alone (`--classes N`) before reading much into one stall.
"""
