"""The private parts of libraries the hot path leans on, the releases they are verified against, and the check at
start that names an incompatible one instead of failing on the first request with a traceback.

    urllib3   HTTPConnectionPool._get_conn / _put_conn / _new_conn: the pooled connections to llama.cpp
              (paddler_sync/proxy/upstream.py) take and give back connections themselves, to relay a body chunk
              by chunk and to connect to an IP address without a resolver
    gevent    a cooperative socket's ``_sock`` and ``_read_event``: the answer reader (proxy/answer.py) waits on
              the OS socket's read watcher itself, one timer per answer instead of one per read
    gunicorn  Response._emit_body: the response writer (proxy/response_writer.py) frames body bytes with fewer
              sends (without it, gunicorn's own framing is used: slower, not wrong)
    redis     a connection pool's ``_connections``: the open-connections gauge of the Redis store

setup.cfg bounds each of these to the majors in VERIFIED; ``make test-newest`` installs the newest releases,
whatever the bounds, and runs the relay's wire tests and this check against them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

VERIFIED: dict[str, tuple[str, str]] = {  # distribution: (lowest verified release, first major not verified)
    "urllib3": ("2.0", "3"),
    "gevent": ("24.2", "27"),
    "gunicorn": ("27.0", "28"),
    "redis": ("5.0", "9"),
}


@dataclass(frozen=True)
class PrivateUse:
    distribution: str
    what: str
    present: Callable[[], bool]
    required: bool = True  # False: without it the code takes a slower public path


def _urllib3_pool() -> bool:
    from urllib3.connection import HTTPConnection
    from urllib3.connectionpool import HTTPConnectionPool

    return all(hasattr(HTTPConnectionPool, n) for n in ("_get_conn", "_put_conn", "_new_conn")) and hasattr(
        HTTPConnection, "_new_conn")


def _gevent_socket() -> bool:
    import gevent.socket

    sock = gevent.socket.socket()
    try:
        return hasattr(sock, "_sock") and hasattr(sock, "_read_event")
    finally:
        sock.close()


def _gunicorn_framing() -> bool:
    from gunicorn.http.wsgi import Response

    return hasattr(Response, "_emit_body")


def _redis_pool() -> bool:
    import redis

    return hasattr(redis.BlockingConnectionPool(), "_connections")


PRIVATE_USES = (
    PrivateUse("urllib3", "HTTPConnectionPool._get_conn, _put_conn and _new_conn", _urllib3_pool),
    PrivateUse("gevent", "a cooperative socket's _sock and _read_event", _gevent_socket),
    PrivateUse("gunicorn", "Response._emit_body", _gunicorn_framing, required=False),
    PrivateUse("redis", "a connection pool's _connections", _redis_pool),
)


def installed(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def _major(text: str) -> int:
    head = text.split(".")[0]
    return int(head) if head.isdigit() else -1


def pip_line(distribution: str) -> str:
    low, high = VERIFIED[distribution]
    return f"pip install '{distribution}>={low},<{high}'"


def problems() -> tuple[list[str], list[str]]:
    """(errors, warnings): a private use that is gone (an error when the code needs it), and a release outside the
    verified range whose private uses are all there (it may work; nobody has tried it)."""
    errors, warnings, broken = [], [], set()
    for use in PRIVATE_USES:
        if use.present():
            continue
        release = installed(use.distribution)
        if use.required:
            broken.add(use.distribution)
            errors.append(f"{use.distribution} {release} lacks {use.what}, which paddler_sync relies on: install a "
                          f"verified release: {pip_line(use.distribution)}")
        else:
            warnings.append(f"{use.distribution} {release} lacks {use.what}: paddler_sync takes a slower path "
                            f"({pip_line(use.distribution)} restores it)")
    for distribution, (low, high) in VERIFIED.items():
        release = installed(distribution)
        if distribution not in broken and not _major(low) <= _major(release) < _major(high):
            warnings.append(f"{distribution} {release} is outside the releases paddler_sync is verified against "
                            f"({low} up to {high}): it starts, but if the proxy misbehaves, {pip_line(distribution)}")
    return errors, warnings
