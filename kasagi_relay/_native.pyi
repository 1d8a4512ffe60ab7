"""Type stub of the native delta engine (`rust/`, built by maturin as `kasagi_relay._native`).

The pure-Python twin `kasagi_relay._pydelta` has exactly this API, except `send_frame` at
the end (the relay's broadcast loop, not part of the engine). `kasagi_relay.delta` picks one
of the two at import time.

Conventions shared by both implementations:
- JSON arguments are `bytes` (UTF-8) or `str`; JSON results are `bytes`.
- A delta is the JSON object `{"patch": [...]}` (RFC 6902) or `{"merge": ...}` (RFC 7396);
  any other top-level key is ignored, exactly one of the two must be present.
- Documents nest at most `MAX_DEPTH` levels (serde_json's parser limit); deeper input is a
  `DeltaError`, never a crash.
- Integers outside the signed/unsigned 64-bit range become floats (as serde_json does);
  a number that overflows a double (`1e400`) is a `DeltaError`.
- Every error caused by the input is `DeltaError`; its message names the failing operation
  index and JSON Pointer when there is one, e.g. `op 2 (remove /a/b): path not found`.
"""

from collections.abc import Sequence

IMPLEMENTATION: str
MAX_DEPTH: int

class DeltaError(ValueError): ...

def validate(d: bytes | str) -> tuple[str, bytes]:
    """Check that `d` is a well-formed delta; return (kind, body) where kind is "patch" or
    "merge" and body is the compact JSON of the patch array / merge object."""

def apply(state: bytes | str, d: bytes | str) -> bytes:
    """Apply one delta to a state. RFC 6902 patches are atomic: on failure DeltaError."""

def merge(ds: Sequence[bytes | str]) -> bytes:
    """One delta equivalent to applying `ds` in order, on every state where they all apply.
    Runs of JSON Patches collapse repeated writes to one path; merge patches compose into
    one merge patch. Raises DeltaError when no single RFC 6902/7396 delta can express the
    sequence (e.g. a merge patch that deletes a key, mixed with JSON Patches)."""

def diff(a: bytes | str, b: bytes | str) -> bytes:
    """A `{"patch": [...]}` delta taking `a` to `b`, small when the change is small."""

def compact(state: bytes | str, ds: Sequence[bytes | str]) -> bytes:
    """Apply `ds` in order to `state`; a delta that fails at its position is a no-op."""

def json_to_msgpack(doc: bytes | str) -> bytes:
    """Re-encode a JSON document as MessagePack."""

def msgpack_to_json(data: bytes) -> bytes:
    """Re-encode a MessagePack document as JSON (maps must have string keys)."""

class RoomState:
    """One room's state held natively; the relay keeps one per active room.

    Applying a small delta costs time in the size of the delta, not of the state; the
    encoded snapshots are cached until the next change."""

    def __init__(self, state: bytes | str = b"{}", seq: int = 0) -> None: ...
    @property
    def seq(self) -> int: ...
    def check(self, d: bytes | str) -> None:
        """Raise DeltaError when `d` is malformed or would fail on the current state.
        Changes nothing."""
    def apply(self, d: bytes | str, seq: int) -> bool:
        """Apply `d` as the room's delta number `seq` (> self.seq, else ValueError).
        Returns False when it failed at its position and was a no-op (the seq still
        advances): PROTOCOL.md's rule. Malformed deltas are no-ops too."""
    def apply_batch(self, ds: Sequence[bytes | str], seq: int) -> bytes:
        """Apply `ds` (the deltas self.seq+1 .. seq, in order, failures as no-ops) and return
        ONE delta, `{"patch": [...]}` or `{"merge": {...}}`, that takes the previous state to
        the new one. Always succeeds (it knows the state, so merge patches become concrete
        operations when needed). len(ds) must equal seq - self.seq, else ValueError."""
    def to_json(self) -> bytes:
        """The state as compact JSON; cached until the next change."""
    def to_msgpack(self) -> bytes:
        """The state as MessagePack; cached until the next change."""
    def json_size(self) -> int:
        """len(self.to_json()) (computed and cached on demand)."""

# Not part of the engine API: the relay's broadcast loop (kasagi_relay/fanout.py), Unix only.

def send_frame(fds: Sequence[int], frame: bytes, /) -> list[tuple[int, int]]:
    """Send `frame` to each socket without blocking (GIL released); returns (position in
    `fds`, bytes taken) for each socket that took less than all of it (would block, or an
    error). The caller passes only sockets whose transport has nothing buffered."""
