"""Who may open a connection: the relay-wide and per-address caps, Sans-I/O.

`--max-connections` bounds the relay's sockets (and so its file descriptors) so that a
flood of connections fails new handshakes with 503 rather than the relay itself;
`--max-connections-per-address` keeps one address from taking every place. Behind a proxy
every connection comes from the proxy's address: the client's address is then read from
X-Forwarded-For, but only when the peer is one of `--trusted-proxies` (anyone else could
write any address there). docs/operations.md lists the limits.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final, Literal

__all__ = ["Admission", "RefusalReason", "client_address"]

RefusalReason = Literal["max_connections", "max_connections_per_address"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# X-Forwarded-For entries looked at, from the right: a header of thousands of entries
# costs no more than this.
_MAX_HOPS: Final = 16


def _parse_ip(text: str) -> _Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[v6]:port"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "v4:port"
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def client_address(peer: str, forwarded_for: Iterable[str], trusted: tuple[_Network, ...]) -> str:
    """The address a connection counts against: the peer, or when the peer is a trusted
    proxy, the right-most X-Forwarded-For entry that is not itself a trusted proxy."""
    address = _parse_ip(peer)
    if address is None or not trusted or not _in(address, trusted):
        return peer
    hops: list[str] = []
    for header in forwarded_for:
        hops.extend(header.split(","))
    for hop in reversed(hops[-_MAX_HOPS:]):
        hop_ip = _parse_ip(hop)
        if hop_ip is None:
            break  # a garbled entry: trust nothing to its left
        if not _in(hop_ip, trusted):
            return str(hop_ip)
        address = hop_ip
    return str(address)


def _in(address: _Address, networks: tuple[_Network, ...]) -> bool:
    return any(address.version == n.version and address in n for n in networks)


class Admission:
    """Counts the open connections, in all and per client address."""

    def __init__(
        self, max_connections: int, max_per_address: int, trusted_proxies: Iterable[str]
    ) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.trusted: tuple[_Network, ...] = tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in trusted_proxies
        )
        self.total = 0
        self.per_address: dict[str, int] = {}

    def address_of(self, peer: str, forwarded_for: Iterable[str]) -> str:
        return client_address(peer, forwarded_for, self.trusted)

    def admit(self, address: str) -> RefusalReason | None:
        """Take a place for a connection from `address`, or say why there is none. A place
        taken must be given back with `release(address)` when the connection ends."""
        if self.max_connections and self.total >= self.max_connections:
            return "max_connections"
        count = self.per_address.get(address, 0)
        if self.max_per_address and count >= self.max_per_address:
            return "max_connections_per_address"
        self.total += 1
        self.per_address[address] = count + 1
        return None

    def release(self, address: str) -> None:
        count = self.per_address.get(address, 0)
        if count <= 1:
            self.per_address.pop(address, None)
        else:
            self.per_address[address] = count - 1
        self.total = max(0, self.total - 1)
