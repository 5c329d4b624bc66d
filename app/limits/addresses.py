"""Who a client is, for the limits: its address, and the key every per-address limit counts under (docs/limits.md).

The address is the peer as the server reports it. Behind a proxy, uvicorn's
`--proxy-headers` with `FORWARDED_ALLOW_IPS` naming the proxy puts the
forwarded address there: the right-most `X-Forwarded-For` entry that is not
itself a trusted proxy, so a client cannot choose its own address by sending
the header (tests/test_addresses.py holds uvicorn to that).

One host on IPv6 is usually given a whole /64 and may use any address in it,
so every limit counts an IPv6 client by its /64 network; an IPv4 client (and
an IPv4-mapped IPv6 one) by its address.
"""

import ipaddress
from functools import lru_cache

from starlette.types import Scope

IPV6_CLIENT_PREFIX = 64
UNKNOWN = "unknown"
# A peer that is no IP address (a Unix socket, a proxy that forwards a name) is counted by its text, this long.
MAX_KEY_CHARS = 100
# The longest text of an IP address: IPv6 with an embedded IPv4 and a zone, in brackets.
MAX_IP_CHARS = 64


def client_address(scope: Scope) -> str:
    """The peer as the server reports it (after uvicorn's `--proxy-headers`), exactly."""
    client = scope.get("client")
    return str(client[0]) if client else UNKNOWN


def client_ip(scope: Scope) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's IP address, IPv4-mapped IPv6 as IPv4; None when the peer is no IP address."""
    return _ip(client_address(scope))


def limit_key(scope: Scope) -> str:
    """The key every per-address limit counts the client under."""
    return address_key(client_address(scope))


def address_key(address: str) -> str:
    """IPv4 as is, IPv4-mapped IPv6 as IPv4, other IPv6 as its /64 network (`2001:db8:1:2::/64`)."""
    if len(address) > MAX_IP_CHARS:
        return address[:MAX_KEY_CHARS]  # no IP address: not worth parsing, nor a place in the cache
    return _key(address)


@lru_cache(maxsize=4096)
def _key(address: str) -> str:
    ip = _ip(address)
    if ip is None:
        return address[:MAX_KEY_CHARS]
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    return str(ipaddress.IPv6Network((ip, IPV6_CLIENT_PREFIX), strict=False))


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if len(address) > MAX_IP_CHARS:
        return None
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        # A zone (`fe80::1%eth0`) names the server's interface, not the client.
        return ip if ip.scope_id is None else ipaddress.IPv6Address(str(ip).split("%", 1)[0])
    return ip
