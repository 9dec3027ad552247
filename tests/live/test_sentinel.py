"""The slot ledger in Redis behind Sentinel: a master, a replica and three Sentinels on loopback (real
redis-server processes, the third in Sentinel mode); the master killed with SIGKILL under streaming load fails no
request: requests wait for the new master as for a slot, and the ledger goes on there."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import (
    INTERVAL,
    Fleet,
    RedisServer,
    agents_ready,
    free_port,
    health,
    port_open,
    sim_stats,
    streaming_load,
    wait_until,
)

MASTER = "paddler-ledger"


class SentinelSet:
    def __init__(self, workdir: Path) -> None:
        (workdir / "master").mkdir()
        self.master = RedisServer(workdir / "master")
        self.replica_port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        replica_dir = workdir / "replica"
        replica_dir.mkdir()
        self._spawn(["redis-server", "--port", str(self.replica_port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(replica_dir), "--replicaof", "127.0.0.1",
                     str(self.master.port)], self.replica_port)
        self.sentinel_ports = [free_port() for _ in range(3)]
        for port in self.sentinel_ports:
            conf = workdir / f"sentinel-{port}.conf"
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
                            f"sentinel monitor {MASTER} 127.0.0.1 {self.master.port} 2\n"
                            f"sentinel down-after-milliseconds {MASTER} 1000\n"
                            f"sentinel failover-timeout {MASTER} 5000\n")
            self._spawn(["redis-server", str(conf), "--sentinel"], port)
        wait_until(lambda: self.replica_synced(), message="the replica in sync")
        self.url = "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports) + f"/{MASTER}"

    def _spawn(self, argv: list[str], port: int) -> None:
        self.procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           start_new_session=True))
        wait_until(lambda: port_open(port), message=argv[0])

    def replica_synced(self) -> bool:
        info = redis.Redis(port=self.replica_port).info("replication")
        return info.get("master_link_status") == "up"

    def master_port(self) -> int:
        return int(redis.Redis(port=self.sentinel_ports[0]).sentinel_get_master_addr_by_name(MASTER)[1])

    def stop(self) -> None:
        self.master.stop()
        for proc in self.procs:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    found = SentinelSet(tmp_path)
    try:
        yield found
    finally:
        found.stop()


def test_a_sentinel_failover_under_streaming_load_fails_no_request(fleet: Fleet, sentinels: SentinelSet) -> None:
    fleet.redis_url = sentinels.url
    balancer = fleet.balancer("--buffered-request-timeout", "30", "--lease-ttl", "60")
    sims = [fleet.simulator("--parallel", "2", "--decode-tokens-per-second", "60") for _ in range(2)]
    for i, sim in enumerate(sims):
        fleet.agent(sim.port, balancer.extra["management_port"], "--name", f"s{i}", interval=INTERVAL)
    agents_ready(balancer, 2)
    assert "redis+sentinel://127.0.0.1:" in balancer.log()  # the URL logged (no password in it here)
    with streaming_load(balancer, 6) as outcomes:  # four slots: some requests wait in the buffer
        wait_until(lambda: len(outcomes) >= 6, timeout=20, message="the load running")
        old = sentinels.master_port()
        sentinels.master.stop()  # SIGKILL
        wait_until(lambda: sentinels.master_port() != old, timeout=20, message="the Sentinels' failover")
        wait_until(lambda: health(balancer)["state_backend_reachable"], timeout=20, message="the new master")
        before = len(outcomes)
        wait_until(lambda: len(outcomes) >= before + 12, timeout=30, message="traffic on the new master")
    assert outcomes and set(outcomes) == {"ok"}, [o for o in outcomes if o != "ok"][:3]
    assert [sim_stats(s)["requests_deferred_total"] for s in sims] == [0, 0]  # no slot given twice
    # slots given back while the master was away are given back to the new one (not left to their 60 s leases)
    wait_until(lambda: health(balancer)["requests_in_flight"] == 0, timeout=15, message="every slot given back")


def test_a_sentinel_url_without_a_master_name_is_refused_at_start(tmp_path: Path) -> None:
    from tests.helpers import run_cli

    result = run_cli("balancer", "--state-backend", "redis+sentinel://127.0.0.1:26379")
    assert result.returncode == 2 and "the URL names no master" in result.stderr
