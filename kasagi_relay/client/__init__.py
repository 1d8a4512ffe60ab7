"""The Python client of kasagi-relay, for game servers, bots and tools.

    from kasagi_relay.client import Client

    async with Client("ws://127.0.0.1:8765/ws", format="msgpack") as c:
        room = await c.join("lobby")
        print(room.seq, room.state)
        await room.send(merge={"hp": 7})
        async for change in room:
            print(change.from_seq, change.seq, change.delta, change.state)

`kasagi_relay.client.protocol` is the Sans-I/O core (requests, replies, one room's stream)
for other I/O layers; `python -m kasagi_relay.client` / `kasagi-client` the command line.
"""

from kasagi_relay.client._client import RECONNECT_CODES, Change, Client, Room, backoff_delay
from kasagi_relay.client.errors import ClientClosed, ConnectionFailed, KasagiError, RelayError
from kasagi_relay.client.protocol import Format

__all__ = [
    "RECONNECT_CODES",
    "Change",
    "Client",
    "ClientClosed",
    "ConnectionFailed",
    "Format",
    "KasagiError",
    "RelayError",
    "Room",
    "backoff_delay",
]
