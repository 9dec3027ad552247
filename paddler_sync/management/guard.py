"""Who may use the management plane: tokens (compared in constant time) and the agents' allowed networks.

Without ``--management-token`` anyone who reaches the management address can register a llama.cpp
address and receive traffic; the balancer warns about that at start-up unless it listens on loopback.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from collections.abc import Sequence

from paddler_sync.addresses import parse_address

WRITE, READ = "write", "read"


class Guard:
    def __init__(self, token: str | None, read_token: str | None,
                 allowed_networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] | None) -> None:
        self.token = token
        self.read_token = read_token
        self.allowed_networks = tuple(allowed_networks or ())

    @property
    def enabled(self) -> bool:
        return self.token is not None or self.read_token is not None

    def allows(self, presented: str | None, access: str) -> bool:
        if not self.enabled:
            return True
        if presented is None:
            return False
        accepted = [self.token] + ([self.read_token] if access == READ else [])
        # compare_digest on every candidate, so timing says nothing about which (if any) matched
        results = [hmac.compare_digest(presented.encode(), t.encode()) for t in accepted if t is not None]
        return any(results)

    def address_allowed(self, addr: str) -> bool:
        """True when every address the host resolves to lies in an allowed network (or none is set)."""
        if not self.allowed_networks:
            return True
        address = parse_address(addr)
        try:
            ips = {info[4][0] for info in socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)}
        except OSError:
            return False
        return bool(ips) and all(any(ipaddress.ip_address(str(ip).split("%")[0]) in net
                                     for net in self.allowed_networks) for ip in ips)


def presented_token(authorization: str | None, query_token: str | None) -> str | None:
    if authorization and authorization.startswith("Bearer "):
        return authorization[len("Bearer "):]
    return query_token
