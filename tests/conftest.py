"""The fixtures: a fleet of real processes per test, a Redis server per session, the real llama-server models.

A test marked ``both_stores`` (its module's ``pytestmark``) that uses ``fleet`` runs twice: on the in-process slot
store and on Redis; ``ledger_agnostic`` keeps one test of such a module on the in-process store only.
The helpers every test module uses are in helpers.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Fleet, RedisServer
from tests.redis_cluster import RedisClusterSet


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterSet]:
    """Three masters and three replicas, shared by the tests that only read and write (none kills a node)."""
    cluster = RedisClusterSet(tmp_path_factory.mktemp("cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files against real llama-servers first: they are the longest, and started last they would leave one
    xdist worker running alone at the end of ``make test``. (A stable sort: every worker collects the same order.)"""
    items.sort(key=lambda item: item.get_closest_marker("real_llamacpp") is None)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``both_stores``: the proxy, buffer and fault scenarios run against both slot stores, in process and in
    Redis; ``ledger_agnostic`` ones (headers, parsing, command lines: nothing a store decides) on the first."""
    if "fleet" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_stores") is not None:
        agnostic = metafunc.definition.get_closest_marker("ledger_agnostic") is not None
        metafunc.parametrize("state_backend", ["local"] if agnostic else ["local", "redis"], indirect=True)


@pytest.fixture
def state_backend(request: pytest.FixtureRequest) -> str | None:
    """The Redis URL when the test runs against the shared ledger, else None."""
    if getattr(request, "param", "local") == "local":
        return None
    return request.getfixturevalue("redis_server").url


@pytest.fixture
def fleet(tmp_path: Path, state_backend: str | None) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path, state_backend)
    try:
        yield fleet
    finally:
        fleet.cleanup()


# --- real llama-server builds (tests/llamacpp_servers.py) ---------------------------------------------

@pytest.fixture(scope="session")
def llamacpp_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.llamacpp_servers import make_models, missing_reason

    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    return make_models(tmp_path_factory.mktemp("models"))


