"""Pick the backend the configuration asks for."""

from __future__ import annotations

import os

from kasagi_relay.backends.base import Backend
from kasagi_relay.backends.memory import MemoryBackend
from kasagi_relay.config import Config, ConfigError

__all__ = ["build_backend"]


def build_backend(config: Config) -> Backend:
    if config.sentinels:
        from kasagi_relay.backends.sentinel import SentinelBackend

        return SentinelBackend(
            config.sentinels,
            config.master,
            password=config.redis_password,
            sentinel_password=config.sentinel_password,
            ack=config.ack_level,
        )
    if config.cluster:
        from kasagi_relay.backends.redis_cluster import ClusterBackend

        tls = None
        if config.redis_tls_ca is not None:
            if not os.path.isfile(config.redis_tls_ca):
                raise ConfigError(f"--redis-tls-ca: no such file: {config.redis_tls_ca}")
            tls = {"ssl_ca_certs": config.redis_tls_ca}
        return ClusterBackend(
            config.cluster, password=config.redis_password, ack=config.ack_level, tls=tls
        )
    if config.redis:
        from kasagi_relay.backends.redis import RedisBackend

        try:
            return RedisBackend(config.redis, password=config.redis_password, ack=config.ack_level)
        except ValueError as exc:  # a URL redis-py cannot parse
            raise ConfigError(f"--redis: {exc}") from None
    return MemoryBackend(room_ttl_s=config.room_ttl_s, history_bytes=config.history_bytes)
