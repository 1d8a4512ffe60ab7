"""kasagi-relay: a real-time state-sync relay for KasagiEngine rooms."""

from kasagi_relay._version import __version__

__all__ = ["__version__"]
