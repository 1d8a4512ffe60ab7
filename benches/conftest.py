"""Room workloads for the engine benchmarks, and the ratio table printed at the end.

Every benchmark group compares implementations of one workload; each benchmark sets
`extra_info["impl"]` to "native", "pure" or "jsonpatch". At the end of the run the table of
ratios (median times, same run) is printed as markdown, with PASS/FAIL against the targets,
and written to .benchmarks/ratios.md.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import random
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from kasagi_relay import _pydelta

# One place decides whether a missing native build skips its benchmarks or fails them.
NATIVE_REQUIRED = os.environ.get("KASAGI_REQUIRE_NATIVE", "") not in ("", "0")

# (group, what it measures, target for pure/native, or None when informational)
RATIO_ROWS: list[tuple[str, str, float | None]] = [
    ("compact", "compaction: 1 MB state (8,000 entities) + 10,000 deltas", 20.0),
    ("merge", "merge of 1,000 JSON Patch deltas", 20.0),
    ("merge_compose", "merge of 1,000 JSON Merge Patch deltas", None),
    ("room_apply", "one small delta through RoomState on a 1 MB state", 50.0),
    ("room_apply_snapshot", "one small delta + to_json() of the 1 MB state", None),
    ("diff", "diff of two 1 MB states", None),
]
LOOP_LAG_TARGET_MS = 5.0

# Ceiling rows: (group of a native lower bound, what it measures, group whose pure median it
# is compared with). Not results: they show the highest pure/native ratio reachable.
CEILING_ROWS: list[tuple[str, str, str]] = [
    (
        "compact_ceiling",
        "ceiling of compaction: native parse + write of the 1 MB state alone "
        "(`compact(state, [])`) vs pure full compaction",
        "compact",
    ),
    (
        "room_apply_ceiling",
        "ceiling of one small delta through RoomState: the same bench step calling a native "
        "no-op (`room.seq`) vs the pure step",
        "room_apply",
    ),
]


def load_native() -> ModuleType | None:
    try:
        return importlib.import_module("kasagi_relay._native")
    except ImportError:
        if NATIVE_REQUIRED:
            raise
        return None


def engine(impl: str) -> ModuleType:
    """The engine module for a benchmark parameter ("native" or "pure")."""
    if impl == "pure":
        return _pydelta
    native = load_native()
    if native is None:
        pytest.skip("kasagi_relay._native is not built")
    return native


@pytest.fixture(scope="session")
def engine_of() -> Callable[[str], ModuleType]:
    """engine_of("native" | "pure") -> the module (skips when native is not built)."""
    return engine


# --------------------------------------------------------------------------- workloads


def make_state(entities: int, seed: int = 1) -> dict[str, Any]:
    """A game room: entities of ~115 bytes each (8,000 -> about 0.9 MB of JSON)."""
    rng = random.Random(seed)
    return {
        "tick": 0,
        "map": {"name": "harbour", "size": [4096, 4096]},
        "entities": {
            f"e{i}": {
                "x": round(rng.uniform(0, 4096), 2),
                "y": round(rng.uniform(0, 4096), 2),
                "hp": rng.randint(1, 100),
                "name": f"unit-{i}",
                "team": rng.choice(["red", "blue"]),
                "tags": ["npc", rng.choice(["walker", "flyer"])],
                "inv": {"gold": rng.randint(0, 500)},
            }
            for i in range(entities)
        },
    }


def dumps(v: Any) -> bytes:
    return json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode()


def make_deltas(entities: int, n: int, seed: int = 2) -> list[bytes]:
    """Small room deltas: mostly moves, some damage, spawns, despawns, tags, a tick; about
    1% remove an entity that is gone (a no-op failure, as in real rooms)."""
    rng = random.Random(seed)
    alive = list(range(entities))
    next_id = entities
    out: list[bytes] = []
    for i in range(n):
        r = rng.random()
        e = f"/entities/e{rng.choice(alive)}"
        if r < 0.6:
            ops: list[dict[str, Any]] = [
                {"op": "replace", "path": f"{e}/x", "value": round(rng.uniform(0, 4096), 2)},
                {"op": "replace", "path": f"{e}/y", "value": round(rng.uniform(0, 4096), 2)},
            ]
        elif r < 0.75:
            ops = [{"op": "replace", "path": f"{e}/hp", "value": rng.randint(0, 100)}]
        elif r < 0.83:
            ops = [
                {
                    "op": "add",
                    "path": f"/entities/e{next_id}",
                    "value": {"x": 0.0, "y": 0.0, "hp": 100, "name": f"unit-{next_id}"},
                }
            ]
            alive.append(next_id)
            next_id += 1
        elif r < 0.90 and len(alive) > 1:
            victim = alive.pop(rng.randrange(len(alive)))
            ops = [{"op": "remove", "path": f"/entities/e{victim}"}]
        elif r < 0.95:
            ops = [{"op": "add", "path": f"{e}/tags/-", "value": f"t{i}"}]
        elif r < 0.99:
            ops = [{"op": "replace", "path": "/tick", "value": i}]
        else:
            ops = [{"op": "remove", "path": f"/entities/gone{i}"}]
        out.append(dumps({"patch": ops}))
    return out


def make_merge_patches(entities: int, n: int, seed: int = 3) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        e = f"e{rng.randrange(entities)}"
        body: dict[str, Any] = {"entities": {e: {"x": round(rng.uniform(0, 4096), 2)}}}
        if rng.random() < 0.2:
            body["entities"][e]["hp"] = None if rng.random() < 0.5 else rng.randint(0, 100)
        if rng.random() < 0.1:
            body["tick"] = i
        out.append(dumps({"merge": body}))
    return out


ENTITIES = 8_000


@pytest.fixture(scope="session")
def state_1mb() -> bytes:
    return dumps(make_state(ENTITIES))


@pytest.fixture(scope="session")
def deltas_10k() -> list[bytes]:
    return make_deltas(ENTITIES, 10_000)


@pytest.fixture(scope="session")
def deltas_1k() -> list[bytes]:
    return make_deltas(ENTITIES, 1_000, seed=4)


@pytest.fixture(scope="session")
def merge_patches_1k() -> list[bytes]:
    return make_merge_patches(ENTITIES, 1_000)


@pytest.fixture(scope="session")
def state_1mb_changed(state_1mb: bytes) -> bytes:
    """The 1 MB state after 2,000 room deltas: the second state of a diff."""
    return _pydelta.compact(state_1mb, make_deltas(ENTITIES, 2_000, seed=5))


@pytest.fixture(scope="session")
def state_20mb() -> bytes:
    return dumps(make_state(170_000, seed=6))


@pytest.fixture(scope="session")
def deltas_for_20mb() -> list[bytes]:
    return make_deltas(170_000, 10_000, seed=7)


# --------------------------------------------------------------------------- ratio table


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.2f} µs"


def ratio_table(benchmarks: list[Any]) -> list[str]:
    medians: dict[tuple[str, str], float] = {}
    lag: dict[str, float] = {}
    worst: dict[str, float] = {}
    for b in benchmarks:
        if not b or b.group is None:
            continue
        impl = b.extra_info.get("impl", b.name)
        medians[(b.group, impl)] = b.stats.median
        if "max_lag_ms" in b.extra_info:
            lag[impl] = b.extra_info["max_lag_ms"]
            worst[impl] = b.extra_info.get("worst_lag_ms", lag[impl])
    lines = [
        f"Engine benchmarks ({_cpu_model()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}); median times of one run.",
        "",
        "| workload | native | pure | jsonpatch (÷ native) | pure / native | target | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for group, label, target in RATIO_ROWS:
        nat, pur, ref = (medians.get((group, i)) for i in ("native", "pure", "jsonpatch"))
        if nat is None and pur is None:
            continue
        ratio = pur / nat if nat and pur else None
        verdict = "-"
        if target is not None and ratio is not None:
            verdict = "PASS" if ratio >= target else "FAIL"
        ref_txt = _fmt_time(ref)
        if ref is not None and nat:
            ref_txt += f" ({ref / nat:.3g}x)"
        lines.append(
            f"| {label} | {_fmt_time(nat)} | {_fmt_time(pur)} | {ref_txt} | "
            f"{f'{ratio:.3g}x' if ratio else '-'} | "
            f"{f'>= {target:g}x' if target else '-'} | {verdict} |"
        )
    for group, label, real in CEILING_ROWS:
        floor, pur = medians.get((group, "native")), medians.get((real, "pure"))
        if floor is None:
            continue
        ratio = pur / floor if pur else None
        lines.append(
            f"| {label} | {_fmt_time(floor)} | {_fmt_time(pur)} | - | "
            f"{f'{ratio:.3g}x' if ratio else '-'} (highest reachable) | - | ceiling, not a result |"
        )
    if lag:
        nat_lag = lag.get("native")
        verdict = "-"
        if nat_lag is not None:
            verdict = "PASS" if nat_lag <= LOOP_LAG_TARGET_MS else "FAIL"

        def lag_txt(impl: str) -> str:
            if impl not in lag:
                return "-"
            return f"{lag[impl]:.2f} ms (worst {worst[impl]:.2f})"

        lines.append(
            "| asyncio loop max lag while compacting a 20 MB state in a thread "
            f"(median of rounds) | {lag_txt('native')} | {lag_txt('pure')} | - | - | "
            f"<= {LOOP_LAG_TARGET_MS:g} ms (native) | {verdict} |"
        )
    return lines


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    lines = ratio_table(session.benchmarks)
    terminalreporter.section("engine ratios (markdown)")
    for line in lines:
        terminalreporter.write_line(line)
    out = Path(str(config.rootpath)) / ".benchmarks" / "ratios.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
