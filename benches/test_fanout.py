"""Fan-out load harness, reduced: floor, kasagi-relay and the plain websockets relay on the same
clients in one run, asserting the issue-3 targets (see benches/fanout/harness.py).

    .venv/bin/pytest benches/test_fanout.py -s            # table on the terminal
    KASAGI_FANOUT_MEMBERS=1000 .venv/bin/pytest benches/test_fanout.py

It is a load test, not a microbenchmark: the `benchmark` fixture runs the whole harness once
(pedantic, one round) so that `pytest benches/ --benchmark-only` includes it; the numbers go
to `benchmark.extra_info`, the markdown table to the terminal and .benchmarks/fanout.md.
Sizes from the environment: KASAGI_FANOUT_MEMBERS (200), KASAGI_FANOUT_DURATION (1.5 s per
step), KASAGI_FANOUT_CLIENTS (2 client processes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from fanout import harness  # benches/ is on sys.path (pytest's rootdir-relative import)

MEMBERS = int(os.environ.get("KASAGI_FANOUT_MEMBERS", "200"))
DURATION = float(os.environ.get("KASAGI_FANOUT_DURATION", "1.5"))
CLIENTS = int(os.environ.get("KASAGI_FANOUT_CLIENTS", "2"))
# Errors that are never acceptable, even from an overloaded server: a member must not see a
# gap, a duplicate or a frame carrying another delta than it claims.
ORDER_ERRORS = ("gaps", "dups", "mismatches")


@pytest.mark.timeout(1800)
def test_fanout_targets(benchmark: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = harness.Config(members=MEMBERS, duration=DURATION, clients=CLIENTS, refine=1)
    bench = harness.Bench(cfg)
    benchmark.group = "fanout"
    results: dict[str, harness.ServerResult] = benchmark.pedantic(bench.run, rounds=1, iterations=1)
    table = harness.report(results, cfg, bench)
    out = Path(__file__).resolve().parent.parent / ".benchmarks" / "fanout.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(table + "\n", encoding="utf-8")
    with capsys.disabled():
        print("\n" + table)
    for name, r in results.items():
        benchmark.extra_info[name] = {
            "capacity": r.capacity,
            "frames_per_s": round(r.frames_per_s),
            "deliveries_per_s": round(r.deliveries_per_s),
            "frames_per_cpu_s": round(r.frames_per_cpu_s),
            "p99_ms_half": r.half.p99_ms if r.half else None,
            "rss_per_conn_kib": round(r.rss_per_conn_kib, 2),
        }

    for name, r in results.items():
        assert r.failure is None, f"{name}: {r.failure}"
        assert r.capacity, f"{name}: no rate sustained"
        for step in r.steps:
            bad = {k: step.errors[k] for k in ORDER_ERRORS if step.errors.get(k)}
            assert not bad, f"{name} at {step.rate:g}/s: {bad}"
    failed = [t for t in harness.targets(results, cfg.tick_ms) if not t.ok]
    assert not failed, "targets missed: " + "; ".join(
        f"{t.what} = {t.value if t.value is None else round(t.value, 2)} (want {t.target})"
        for t in failed
    )
