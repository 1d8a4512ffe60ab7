"""The delta engine: RFC 6902 / RFC 7396 apply, merge, diff, compaction and room state.

The native implementation (`kasagi_relay._native`, Rust) by default; the pure-Python twin
(`kasagi_relay._pydelta`) when `KASAGI_PURE_PYTHON=1` is set before the first import.
Both have the API documented in `_native.pyi`.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

__all__ = [
    "IMPLEMENTATION",
    "MAX_DEPTH",
    "MEMBER_BYTES",
    "NODE_BYTES",
    "WORK_BASE",
    "WORK_PER_BYTE",
    "DeltaError",
    "RoomState",
    "TooLarge",
    "apply",
    "compact",
    "diff",
    "json_to_msgpack",
    "merge",
    "msgpack_to_json",
    "msgpack_to_json_counted",
    "validate",
    "validate_request",
]

if TYPE_CHECKING:
    # Type-check against the stub, the one contract both implementations follow.
    from kasagi_relay._native import (
        IMPLEMENTATION,
        MAX_DEPTH,
        MEMBER_BYTES,
        NODE_BYTES,
        WORK_BASE,
        WORK_PER_BYTE,
        DeltaError,
        RoomState,
        TooLarge,
        apply,
        compact,
        diff,
        json_to_msgpack,
        merge,
        msgpack_to_json,
        msgpack_to_json_counted,
        validate,
        validate_request,
    )
else:
    if os.environ.get("KASAGI_PURE_PYTHON", "") not in ("", "0"):
        _impl = importlib.import_module("kasagi_relay._pydelta")
    else:
        try:
            _impl = importlib.import_module("kasagi_relay._native")
        except ImportError as exc:  # depends on the build
            raise ImportError(
                "kasagi_relay._native is not built: run `pip install -e .` (or `maturin "
                "develop`), or set KASAGI_PURE_PYTHON=1 to use the pure-Python engine"
            ) from exc
    globals().update({name: getattr(_impl, name) for name in __all__})
