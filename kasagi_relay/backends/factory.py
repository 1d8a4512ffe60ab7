"""Pick the backend the configuration asks for."""

from __future__ import annotations

from kasagi_relay.backends.base import Backend
from kasagi_relay.backends.memory import MemoryBackend
from kasagi_relay.config import Config, ConfigError

__all__ = ["build_backend"]


def build_backend(config: Config) -> Backend:
    if config.sentinels:
        raise ConfigError("the sentinel backend is not available yet (--sentinels)")
    if config.redis:
        raise ConfigError("the redis backend is not available yet (--redis)")
    return MemoryBackend()
