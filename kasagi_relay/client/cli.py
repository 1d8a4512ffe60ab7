"""`kasagi-client URL watch ROOM | send ROOM DELTA-JSON | state ROOM`: the relay by hand.

`kasagi-client token --secret S --sub U --rooms '{"*":"rw"}' --ttl 3600` prints a
development token (HS256) for a relay started with the same `--jwt-secret`; give it back
with `--token` (or KASAGI_TOKEN).

Every output line on stdout is one JSON object:

- `state ROOM`: `{"room":R,"seq":N,"state":{...}}`, then exits.
- `send ROOM '{"merge":{"hp":7}}'` (or `'{"patch":[...]}'`, optionally with `"key"`):
  `{"room":R,"seq":N}` once acknowledged.
- `watch ROOM`: the state line, then one line per change until Ctrl-C:
  `{"room":R,"from":A,"seq":B,"merge":{...}}` (or `"patch"`), and
  `{"room":R,"reset":true,"seq":N,"state":{...}}` when the state was replaced.

Exit status: 0 done, 1 the relay refused (the error code on stderr) or the connection
failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from typing import Any

from kasagi_relay.client._client import Client, Room
from kasagi_relay.client.errors import KasagiError, RelayError
from kasagi_relay.client.protocol import FORMATS

__all__ = ["main", "mint_token"]

# `send` and `state` give up on a relay that stays away; `watch` waits for it forever.
ONE_SHOT_ATTEMPTS = 5


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kasagi-client",
        description="Talk to a kasagi-relay: watch a room, send a delta, print a room's state.",
        epilog='example: kasagi-client ws://127.0.0.1:8765/ws send lobby \'{"merge":{"hp":7}}\'',
    )
    p.add_argument("url", help="the relay's WebSocket URL, e.g. ws://127.0.0.1:8765/ws")
    p.add_argument("--format", choices=FORMATS, default="json", help="subprotocol (json)")
    p.add_argument(
        "--token",
        default=os.environ.get("KASAGI_TOKEN"),
        help="a connection token (JWT) for relays with JWT keys, sent as `auth` [KASAGI_TOKEN]",
    )
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("watch", help="print the state, then every change, until Ctrl-C")
    w.add_argument("room")
    s = sub.add_parser("send", help="send one delta and print its seq")
    s.add_argument("room")
    s.add_argument("delta", help='{"merge": {...}} or {"patch": [...]}, optionally "key"')
    t = sub.add_parser("state", help="print the room's seq and state")
    t.add_argument("room")
    return p


def _print(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _delta_arg(p: argparse.ArgumentParser, text: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        p.error(f"DELTA is not JSON: {exc}")
    if not isinstance(doc, dict) or ("patch" in doc) == ("merge" in doc):
        p.error('DELTA must be an object with exactly one of "patch" or "merge"')
    if "key" in doc and not isinstance(doc["key"], str):
        p.error('"key" must be a string')
    return doc


async def _watch(room: Room) -> None:
    _print({"room": room.name, "seq": room.seq, "state": room.state})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    changes = aiter(room)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while True:
            step = asyncio.ensure_future(anext(changes))
            await asyncio.wait([step, stopping], return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await step
                return
            change = step.result()
            if change.kind == "reset":
                _print({"room": room.name, "reset": True, "seq": change.seq, "state": change.state})
            else:
                line: dict[str, Any] = {"room": room.name, "from": change.from_seq}
                line["seq"] = change.seq
                line.update(change.delta or {})
                _print(line)
    except StopAsyncIteration:
        return
    finally:
        stopping.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _run(a: argparse.Namespace, doc: dict[str, Any] | None) -> None:
    attempts = None if a.command == "watch" else ONE_SHOT_ATTEMPTS
    async with Client(a.url, format=a.format, token=a.token, max_attempts=attempts) as client:
        if a.command == "send":
            assert doc is not None
            room = a.room
            seq = await client.send(
                room, patch=doc.get("patch"), merge=doc.get("merge"), key=doc.get("key")
            )
            _print({"room": room, "seq": seq})
            return
        joined = await client.join(a.room)
        if a.command == "state":
            _print({"room": joined.name, "seq": joined.seq, "state": joined.state})
        else:
            await _watch(joined)


def _token_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kasagi-client token",
        description="Print a development connection token (HS256 JWT) for a relay run with "
        "the same --jwt-secret. For production, tokens come from your own auth service.",
        epilog='example: kasagi-client token --sub alice --rooms \'{"lobby":"rw"}\' --ttl 600',
    )
    p.add_argument(
        "--secret",
        default=os.environ.get("KASAGI_JWT_SECRET"),
        help="the relay's --jwt-secret [KASAGI_JWT_SECRET]",
    )
    p.add_argument("--sub", required=True, help="the user id")
    p.add_argument(
        "--rooms", default='{"*":"rw"}', help='grants: pattern -> r, w or rw (\'{"*":"rw"}\')'
    )
    p.add_argument("--info", default=None, help="public JSON object shown in presence")
    p.add_argument("--ttl", type=float, default=3600.0, help="seconds until exp (3600)")
    p.add_argument("--alg", choices=("HS256", "HS384", "HS512"), default="HS256")
    return p


def mint_token(
    secret: str,
    sub: str,
    rooms: dict[str, str],
    ttl: float,
    info: dict[str, Any] | None = None,
    alg: str = "HS256",
    now: float | None = None,
) -> str:
    """A signed development token with the claims docs/protocol.md asks for."""
    import jwt

    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"sub": sub, "rooms": rooms, "iat": issued, "exp": issued + int(ttl)}
    if info is not None:
        claims["info"] = info
    return jwt.encode(claims, secret, algorithm=alg)


def _token_main(argv: list[str]) -> int:
    p = _token_parser()
    a = p.parse_args(argv)
    if not a.secret:
        p.error("give --secret or KASAGI_JWT_SECRET")
    try:
        rooms = json.loads(a.rooms)
        info = json.loads(a.info) if a.info is not None else None
    except ValueError as exc:
        p.error(f"not JSON: {exc}")
    if not isinstance(rooms, dict) or (info is not None and not isinstance(info, dict)):
        p.error("--rooms and --info must be JSON objects")
    if a.ttl <= 0:
        p.error("--ttl must be positive")
    print(mint_token(a.secret, a.sub, rooms, a.ttl, info, a.alg))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["token"]:
        return _token_main(args[1:])
    p = _parser()
    a = p.parse_args(argv)
    doc = _delta_arg(p, a.delta) if a.command == "send" else None
    try:
        asyncio.run(_run(a, doc))
    except RelayError as exc:
        print(f"kasagi-client: the relay answered {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except KasagiError as exc:
        print(f"kasagi-client: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a bad room name or URL, found before anything was sent
        print(f"kasagi-client: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
