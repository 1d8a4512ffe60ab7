"""Shared fixtures: the two delta engines, tested directly (not through environment variables).

One place decides whether a missing native build is a skip or a failure: NATIVE_REQUIRED,
on when KASAGI_REQUIRE_NATIVE=1 (the test script sets it once rust/ builds).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

from kasagi_relay import _pydelta

NATIVE_REQUIRED = os.environ.get("KASAGI_REQUIRE_NATIVE", "") not in ("", "0")


def load_native() -> ModuleType | None:
    """The native engine, or None when it is not built (an error when it is required)."""
    try:
        return importlib.import_module("kasagi_relay._native")
    except ImportError:
        if NATIVE_REQUIRED:
            raise
        return None


def _native_or_skip() -> ModuleType:
    native = load_native()
    if native is None:
        pytest.skip("kasagi_relay._native is not built")
    return native


@pytest.fixture(scope="session", params=["python", "native"])
def engines(request: pytest.FixtureRequest) -> ModuleType:
    """Each delta engine in turn: the pure-Python twin, then the native one."""
    if request.param == "python":
        return _pydelta
    return _native_or_skip()


@pytest.fixture(scope="session")
def pure() -> ModuleType:
    return _pydelta


@pytest.fixture(scope="session")
def native() -> ModuleType:
    return _native_or_skip()
