"""A reload under streaming load on real llama-servers (each build): SIGHUP to the balancer fails no request and
queues none inside llama.cpp (its ``requests_deferred`` sampled all along), the new worker learning the old one's
running streams from the agents' reports."""

from __future__ import annotations

import re
import signal

import pytest

from tests.helpers import Fleet, agent_named, real_builds, spawn_llama_server, streaming_load, wait_until
from tests.llamacpp_servers import Build, DeferredSampler

pytestmark = [pytest.mark.real_llamacpp, pytest.mark.parametrize("build", real_builds())]


def test_a_reload_on_real_llamacpp_fails_nothing_and_queues_nothing_inside(fleet: Fleet, build: Build,
                                                                             llamacpp_models) -> None:
    balancer = fleet.balancer("--buffered-request-timeout", "30")
    servers = []
    for i in range(2):
        server = spawn_llama_server(fleet, build, llamacpp_models["slow"], "-np", "2", "-c", "2048",
                                    *build.slots_flags())
        fleet.agent(server.port, balancer.extra["management_port"], "--name", f"r{i}", interval=0.2)
        servers.append(server)
    wait_until(lambda: all((agent_named(balancer, f"r{i}") or {}).get("state") == "ready" for i in range(2)),
               timeout=15, message="both agents ready")
    urls = [s.url for s in servers]
    with DeferredSampler(urls) as deferred, streaming_load(balancer, 6) as outcomes:  # four slots: two wait
        wait_until(lambda: len(outcomes) >= 6, timeout=60, message="the load running")
        balancer.signal(signal.SIGHUP)
        wait_until(lambda: "handed over to them" in balancer.log(), message="the hand-over")
        before = len(outcomes)
        wait_until(lambda: len(outcomes) >= before + 12, timeout=60, message="the new worker serving")
    assert outcomes and set(outcomes) == {"ok"}, [o for o in outcomes if o != "ok"][:3]
    assert deferred.peak == 0 and deferred.samples >= 2
    assert len(re.findall(r"Booting worker with pid", balancer.log())) == 2 and "Traceback" not in balancer.log()


def test_a_rolling_restart_on_real_llamacpp_fails_nothing_and_queues_nothing_inside(fleet: Fleet, build: Build,
                                                                                     llamacpp_models,
                                                                                     redis_server) -> None:
    """Two balancers sharing Redis behind a TCP load balancer that checks /health, each stopped (SIGTERM) and
    started again in turn while six clients stream through the front."""
    from tests.live.test_reload import balancers_sharing_redis, restart_in_turn

    balancers, ports, prefix = balancers_sharing_redis(fleet, redis_server.url)
    servers = []
    for i in range(2):
        server = spawn_llama_server(fleet, build, llamacpp_models["tiny"], "-np", "2", "-c", "2048",
                                    *build.slots_flags())
        fleet.agent(server.port, ports[i][1], "--name", f"r{i}", interval=0.2)
        servers.append(server)
    wait_until(lambda: all((agent_named(balancers[0], f"r{i}") or {}).get("state") == "ready" for i in range(2)),
               timeout=15, message="both agents ready")
    with DeferredSampler([s.url for s in servers]) as deferred:
        outcomes = restart_in_turn(fleet, balancers, ports, prefix, patience=60)
    assert outcomes and set(outcomes) == {"ok"}, [o for o in outcomes if o != "ok"][:3]
    assert deferred.peak == 0 and deferred.samples >= 2
