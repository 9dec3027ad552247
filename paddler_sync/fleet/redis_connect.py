"""How the Redis store connects: one Redis (``redis://``, ``rediss://``, ``unix://``) or the master a set of
Sentinels names (``redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB]``).

Both give a blocking pool of at most MAX_CONNECTIONS: a greenlet that finds them all busy waits for one, rather
than opening more. With Sentinel, each new connection asks the Sentinels where the master is now, and a connection
to a master that was demoted (a failover) fails and is opened again to the new one: the store's commands fail
meanwhile (StateUnavailable: requests wait for it in the buffer) and succeed again once the new master answers.
redis-py has no blocking Sentinel pool: ``BlockingSentinelPool`` joins its Sentinel pool and its blocking pool,
verified against redis-py 5 to 8 (setup.cfg bounds it).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel, SentinelConnectionPool

SENTINEL_SCHEME = "redis+sentinel://"


class SentinelUrlError(ValueError):
    """A ``redis+sentinel://`` URL that says no Sentinel or no master name."""


class BlockingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """Connections to the master the Sentinels name, at most ``max_connections`` of them (callers wait)."""


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int, str | None]:
    """(sentinels, master name, db, password) of a ``redis+sentinel://`` URL."""
    parts = urlsplit(url)
    hosts = []
    for item in parts.netloc.rpartition("@")[2].split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise SentinelUrlError(f"{item!r} is no HOST:PORT of a Sentinel")
        hosts.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise SentinelUrlError("the URL names no master: redis+sentinel://HOST:PORT,HOST:PORT/MASTER_NAME")
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise SentinelUrlError(f"after the Sentinels comes /MASTER_NAME[/DB], not {parts.path!r}")
    password = unquote(parts.password) if parts.password else None
    return hosts, path[0], int(path[1]) if len(path) == 2 else 0, password


def connection_pool(url: str, max_connections: int, timeout: float) -> redis.BlockingConnectionPool:
    options: dict[str, Any] = {"max_connections": max_connections, "timeout": timeout, "socket_timeout": timeout,
                               "socket_connect_timeout": timeout, "decode_responses": True}
    if not url.startswith(SENTINEL_SCHEME):
        return redis.BlockingConnectionPool.from_url(url, **options)
    hosts, master, db, password = parse_sentinel_url(url)
    sentinels = Sentinel(hosts, socket_timeout=timeout, socket_connect_timeout=timeout)
    return BlockingSentinelPool(master, sentinels, db=db, password=password, **options)
