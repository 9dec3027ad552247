"""Network addresses as operators write them: ``host:port``, ``[v6]:port`` or ``name:port``.

Kept apart from the settings so that the agent, the balancer and the simulator share one parser,
and so that the AWS placeholder (resolved later, at start-up) is recognised in one place.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

AWS_LOCAL_IPV4 = "aws:metadata:local-ipv4"

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")


class AddressError(ValueError):
    """The text is not an address; the message says what was expected."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    @property
    def is_aws_placeholder(self) -> bool:
        return self.host == AWS_LOCAL_IPV4

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def with_host(self, host: str) -> Address:
        return Address(host, self.port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self}"


EXPECTED = "expected HOST:PORT, [IPv6]:PORT or NAME:PORT with a port from 1 to 65535"


def parse_address(text: str, default_port: int | None = None) -> Address:
    """Parse one address; ``aws:metadata:local-ipv4[:PORT]`` is kept as a placeholder host."""
    text = text.strip()
    if text.startswith(AWS_LOCAL_IPV4):
        rest = text[len(AWS_LOCAL_IPV4):]
        if rest == "":  # the port is filled in at start-up (the agent takes the local server's)
            return Address(AWS_LOCAL_IPV4, default_port or 0)
        return Address(AWS_LOCAL_IPV4, _parse_port(rest.removeprefix(":"), text))
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise AddressError(f"'{text}' is not an address: {EXPECTED}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"'{host}' in '{text}' is not an IPv6 address: {EXPECTED}") from None
        return Address(host, _parse_port(rest[1:], text))
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise AddressError(f"'{text}' has no port: {EXPECTED}")
    if ":" in host:
        raise AddressError(f"'{text}' looks like a bare IPv6 address: write it as [{host}]:{port}")
    if not _HOSTNAME.match(host):
        raise AddressError(f"'{host}' in '{text}' is not a host name or IP address: {EXPECTED}")
    return Address(host, _parse_port(port, text))


def _parse_port(port: str, text: str) -> int:
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise AddressError(f"'{text}' has no valid port: {EXPECTED}")
    return int(port)
