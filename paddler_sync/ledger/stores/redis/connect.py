"""How the Redis store connects: one Redis (``redis://``, ``rediss://``, ``unix://``), the master a set of
Sentinels names (``redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB]``), or a Redis Cluster
(``redis+cluster://[:PASSWORD@]HOST:PORT[,HOST:PORT...]``: any of its nodes; the client learns the rest).

Each gives blocking pools of at most MAX_CONNECTIONS (per node, on a cluster): a greenlet that finds them all busy
waits for one, rather than opening more. With Sentinel, each new connection asks the Sentinels where the master is
now, and a connection to a master that was demoted (a failover) fails and is opened again to the new one: the
store's commands fail meanwhile (StateUnavailable: requests wait for it in the buffer) and succeed again once the
new master answers. A cluster client follows its slots' moves and failovers the same way.

On a cluster every key of a prefix must live in one hash slot, since each script reads and writes many keys
atomically: the store wraps the prefix in a hash tag (``{paddler}:...``, see ``cluster_prefix``), so one node serves
one fleet's ledger (a fleet's ledger is a few kilobytes and a few thousand scripts a second; a cluster is chosen
for its failover and its managed hosting, not to spread one fleet). redis-py has no blocking Sentinel pool:
``BlockingSentinelPool`` joins its Sentinel pool and its blocking pool, verified against redis-py 5 to 8 (setup.cfg
bounds it).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel, SentinelConnectionPool

SENTINEL_SCHEME = "redis+sentinel://"
CLUSTER_SCHEME = "redis+cluster://"
Client = redis.Redis | RedisCluster


class RedisUrlError(ValueError):
    """A ``redis+sentinel://`` URL that says no Sentinel or no master name, or a ``redis+cluster://`` URL that
    names no node."""


class BlockingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """Connections to the master the Sentinels name, at most ``max_connections`` of them (callers wait)."""


def _hosts(netloc: str, what: str) -> list[tuple[str, int]]:
    hosts = []
    for item in netloc.rpartition("@")[2].split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise RedisUrlError(f"{item!r} is no HOST:PORT of {what}")
        hosts.append((host.strip("[]"), int(port)))
    return hosts


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int, str | None]:
    """(sentinels, master name, db, password) of a ``redis+sentinel://`` URL."""
    parts = urlsplit(url)
    hosts = _hosts(parts.netloc, "a Sentinel")
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise RedisUrlError("the URL names no master: redis+sentinel://HOST:PORT,HOST:PORT/MASTER_NAME")
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise RedisUrlError(f"after the Sentinels comes /MASTER_NAME[/DB], not {parts.path!r}")
    password = unquote(parts.password) if parts.password else None
    return hosts, path[0], int(path[1]) if len(path) == 2 else 0, password


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], str | None]:
    """(startup nodes, password) of a ``redis+cluster://`` URL; a cluster has one database, so no /DB."""
    parts = urlsplit(url)
    hosts = _hosts(parts.netloc, "a cluster node")
    if parts.path.strip("/"):
        raise RedisUrlError(f"a cluster has no databases: drop {parts.path!r} (redis+cluster://HOST:PORT,HOST:PORT)")
    return hosts, unquote(parts.password) if parts.password else None


def is_cluster(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEME)


def cluster_prefix(prefix: str) -> str:
    """The prefix as a hash tag, so every key of the fleet lands in one slot; a prefix that has one is kept (Redis's
    rule: the text between the first '{' and the next '}', when not empty)."""
    opening = prefix.find("{")
    closing = prefix.find("}", opening + 1) if opening >= 0 else -1
    return prefix if closing > opening + 1 else f"{{{prefix}}}"


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{parts.netloc.rpartition('@')[2]}"))


def connect(url: str, max_connections: int, timeout: float) -> Client:
    """A client for ``url``. A cluster client asks its nodes for the slots at once: an unreachable cluster raises
    here (one of redis-py's errors; the store tries again on its next command)."""
    options: dict[str, Any] = {"max_connections": max_connections, "timeout": timeout, "socket_timeout": timeout,
                               "socket_connect_timeout": timeout, "decode_responses": True}
    if url.startswith(SENTINEL_SCHEME):
        hosts, master, db, password = parse_sentinel_url(url)
        sentinels = Sentinel(hosts, socket_timeout=timeout, socket_connect_timeout=timeout)
        return redis.Redis(connection_pool=BlockingSentinelPool(master, sentinels, db=db, password=password,
                                                                **options))
    if is_cluster(url):
        hosts, password = parse_cluster_url(url)
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in hosts], password=password,
                            connection_pool_class=redis.BlockingConnectionPool, **options)
    return redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(url, **options))


def open_connections(client: Client) -> int:
    """Connections open now (idle in a pool or in use), over every node of a cluster."""
    if isinstance(client, RedisCluster):
        pools = [node.redis_connection.connection_pool for node in client.get_nodes() if node.redis_connection]
    else:
        pools = [client.connection_pool]
    return sum(1 for pool in pools for c in pool._connections if c is not None and c._sock is not None)
