"""TLS for the relay's port (`wss://`, and https for /healthz and /metrics)."""

from __future__ import annotations

import os
import ssl

from kasagi_relay.config import Config, ConfigError

__all__ = ["reload", "server_context"]


def server_context(config: Config) -> ssl.SSLContext | None:
    """The server-side context for `--tls-cert`/`--tls-key`, or None when TLS is off.

    Raises ConfigError (one line) when the files cannot be loaded, so that a bad path or a
    key that does not match its certificate stops the relay before it binds its port."""
    if config.tls_cert is None:
        if config.tls_key is not None:
            raise ConfigError("--tls-key needs --tls-cert")
        return None
    for path in (config.tls_cert, config.tls_key):
        # load_cert_chain's own error does not say which file is missing.
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"TLS: no such file: {path}")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"TLS: cannot load {config.tls_cert}"
            + (f" with key {config.tls_key}" if config.tls_key else "")
            + f": {exc}"
        ) from None
    return context


def reload(context: ssl.SSLContext, config: Config) -> None:
    """Load the certificate files again into the live `context` (SIGHUP): connections made
    after this get the new certificate, open ones keep theirs.

    The files are first loaded into a new context, so that a bad file (ConfigError) leaves
    the live one as it was."""
    if server_context(config) is None:
        return
    assert config.tls_cert is not None
    context.load_cert_chain(config.tls_cert, config.tls_key)
