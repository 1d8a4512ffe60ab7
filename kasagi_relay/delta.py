"""The delta engine: RFC 6902 / RFC 7396 apply, merge, diff, compaction and room state.

The native implementation (`kasagi_relay._native`, Rust) by default; the pure-Python twin
(`kasagi_relay._pydelta`) when `KASAGI_PURE_PYTHON=1` is set before the first import.
Both have the API documented in `_native.pyi`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # Type-check against the stub, the one contract both implementations follow.
    from kasagi_relay._native import (
        IMPLEMENTATION,
        MAX_DEPTH,
        DeltaError,
        RoomState,
        apply,
        compact,
        diff,
        json_to_msgpack,
        merge,
        msgpack_to_json,
        validate,
    )
elif os.environ.get("KASAGI_PURE_PYTHON", "") not in ("", "0"):
    from kasagi_relay._pydelta import (
        IMPLEMENTATION,
        MAX_DEPTH,
        DeltaError,
        RoomState,
        apply,
        compact,
        diff,
        json_to_msgpack,
        merge,
        msgpack_to_json,
        validate,
    )
else:
    try:
        from kasagi_relay._native import (
            IMPLEMENTATION,
            MAX_DEPTH,
            DeltaError,
            RoomState,
            apply,
            compact,
            diff,
            json_to_msgpack,
            merge,
            msgpack_to_json,
            validate,
        )
    except ImportError as exc:  # pragma: no cover - depends on the build
        raise ImportError(
            "kasagi_relay._native is not built: run `pip install -e .` (or `maturin develop`), "
            "or set KASAGI_PURE_PYTHON=1 to use the pure-Python engine"
        ) from exc

__all__ = [
    "IMPLEMENTATION",
    "MAX_DEPTH",
    "DeltaError",
    "RoomState",
    "apply",
    "compact",
    "diff",
    "json_to_msgpack",
    "merge",
    "msgpack_to_json",
    "validate",
]
