"""The slot ledger on a Redis Cluster (three masters, three replicas on loopback, real redis-server processes):
every key of a fleet in one hash slot, so each script runs atomically on one node; the master holding that slot
killed with SIGKILL under streaming load fails no request (requests wait for the promoted replica as for a slot)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from paddler_sync.ledger.stores.redis.connect import cluster_prefix, redacted
from tests.helpers import INTERVAL, Fleet, agents_ready, health, run_cli, sim_stats, streaming_load, wait_until
from tests.redis_cluster import RedisClusterSet, free_node_port


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterSet]:
    """A cluster of this test's own: it loses a master."""
    found = RedisClusterSet(tmp_path / "cluster")
    try:
        yield found
    finally:
        found.stop()


def test_a_cluster_failover_under_streaming_load_fails_no_request(fleet: Fleet, cluster: RedisClusterSet) -> None:
    fleet.redis_url = cluster.url
    balancer = fleet.balancer("--buffered-request-timeout", "30", prefix="fleet-a")
    sims = [fleet.simulator("--parallel", "2", "--decode-tokens-per-second", "60") for _ in range(2)]
    for i, sim in enumerate(sims):
        fleet.agent(sim.port, balancer.extra["management_port"], "--name", f"s{i}", interval=INTERVAL)
    agents_ready(balancer, 2)
    holder = cluster.master_of("{fleet-a}:queue")
    keys = cluster.node(holder).keys("*")
    assert keys and all(k.startswith(b"{fleet-a}:") for k in keys)  # the whole fleet in the one slot of its tag
    with streaming_load(balancer, 6) as outcomes:  # four slots: some requests wait in the buffer
        wait_until(lambda: len(outcomes) >= 6, timeout=20, message="the load running")
        cluster.kill(holder)  # SIGKILL
        wait_until(lambda: cluster.master_of("{fleet-a}:queue") != holder, timeout=20,
                   message="a replica promoted")
        wait_until(lambda: health(balancer)["state_backend_reachable"], timeout=20, message="the new master")
        before = len(outcomes)
        wait_until(lambda: len(outcomes) >= before + 12, timeout=30, message="traffic on the new master")
    assert outcomes and set(outcomes) == {"ok"}, [o for o in outcomes if o != "ok"][:3]
    assert [sim_stats(s)["requests_deferred_total"] for s in sims] == [0, 0]  # no slot given twice
    wait_until(lambda: health(balancer)["requests_in_flight"] == 0, message="every lease given back")
    assert "Traceback" not in balancer.log()


def test_two_balancers_on_a_cluster_share_one_ledger(fleet: Fleet, redis_cluster: RedisClusterSet) -> None:
    fleet.redis_url = redis_cluster.url
    first, second = (fleet.balancer(prefix="{shared}") for _ in range(2))  # a prefix with its own hash tag: kept
    sim = fleet.simulator("--parallel", "2", "--decode-tokens-per-second", "40")
    fleet.agent(sim.port, first.extra["management_port"], "--name", "only", interval=INTERVAL)
    wait_until(lambda: health(second)["slots_total"] == 2, message="the second balancer sees the first's server")
    with streaming_load(first, 3) as one, streaming_load(second, 3) as other:
        wait_until(lambda: len(one) >= 6 and len(other) >= 6, timeout=30, message="both balancers serving")
    assert set(one) | set(other) == {"ok"}
    assert sim_stats(sim)["requests_deferred_total"] == 0  # six clients, two slots, two balancers: none overbooked
    assert redis.Redis(port=redis_cluster.master_of("{shared}:upstreams")).exists("{shared}:upstreams")


def test_a_cluster_url_with_a_database_is_refused_at_start() -> None:
    result = run_cli("balancer", "--state-backend", "redis+cluster://127.0.0.1:7000/0")
    assert result.returncode == 2 and "a cluster has no databases: drop '/0'" in result.stderr


def test_a_balancer_started_before_its_cluster_waits_for_it(fleet: Fleet, tmp_path: Path) -> None:
    """Start order is free: a cluster the balancer cannot reach at start is asked again, and requests meanwhile wait
    for it (503 naming Redis only when their wait ends first); the password never reaches the log."""
    ports = [free_node_port() for _ in range(3)]
    fleet.redis_url = f"redis+cluster://:cluster-secret@127.0.0.1:{ports[0]}"
    balancer = fleet.balancer("--buffered-request-timeout", "1")
    assert health(balancer)["state_backend_reachable"] is False
    refused = requests.post(balancer.extra["proxy"] + "/completion", json={"prompt": "x"}, timeout=10)
    assert refused.status_code == 503 and "Redis" in refused.json()["error"]["message"]
    cluster = RedisClusterSet(tmp_path / "late", replicas=0, ports=ports, password="cluster-secret")
    try:
        sim = fleet.simulator("--parallel", "1")
        fleet.agent(sim.port, balancer.extra["management_port"], "--name", "late", interval=INTERVAL)
        wait_until(lambda: health(balancer)["state_backend_reachable"] and health(balancer)["slots_total"] == 1,
                   message="the cluster reached and the agent registered")
        answer = requests.post(balancer.extra["proxy"] + "/completion", json={"prompt": "x", "n_predict": 2},
                               timeout=10)
        assert answer.status_code == 200
    finally:
        cluster.stop()
    assert "cluster-secret" not in balancer.log() and "redis+cluster://:***@127.0.0.1" in balancer.log()


def test_the_prefix_becomes_a_hash_tag_and_urls_lose_their_password() -> None:
    assert cluster_prefix("paddler") == "{paddler}"
    assert cluster_prefix("{fleet}-a") == "{fleet}-a"  # Redis's rule: the first {...} that is not empty
    assert cluster_prefix("a{}b") == "{a{}b}"
    assert redacted("redis+cluster://:s3cret@10.0.0.1:7000,10.0.0.2:7000") == "redis+cluster://:***@10.0.0.1:7000,10.0.0.2:7000"
    assert redacted("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redacted("redis://host:6379/0") == "redis://host:6379/0"
