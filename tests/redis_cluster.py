"""A real Redis Cluster on loopback for the tests: three masters and three replicas (redis-server
``--cluster-enabled``, joined by ``redis-cli --cluster create``), failing over within about two seconds of a master's
death (``cluster-node-timeout`` 1000 ms)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import redis

from tests.helpers import free_port, port_open, wait_until

NODE_TIMEOUT_MS = 1000


def free_node_port() -> int:
    """A free port (from this xdist worker's range) whose cluster bus port, 10,000 above it, is free too."""
    while True:
        port = free_port()
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port


class RedisClusterSet:
    def __init__(self, workdir: Path, masters: int = 3, replicas: int = 1, ports: list[int] | None = None,
                 password: str | None = None) -> None:
        self.ports = ports or [free_node_port() for _ in range(masters * (1 + replicas))]
        self.password = password
        secured = ["--requirepass", password, "--masterauth", password] if password else []
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        for port in self.ports:
            node_dir = workdir / f"node-{port}"
            node_dir.mkdir(parents=True)
            self.procs[port] = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(node_dir), "--cluster-enabled", "yes", "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                 "--cluster-config-file", str(node_dir / "nodes.conf"), *secured],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        for port in self.ports:
            wait_until(lambda p=port: port_open(p), message=f"cluster node {port}")
        auth = ["-a", password, "--no-auth-warning"] if password else []
        subprocess.run(["redis-cli", *auth, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", str(replicas), "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        wait_until(self.healthy, timeout=30, message="the cluster ok on every node")
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:2])

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2, password=self.password)

    def healthy(self) -> bool:
        """Every live node says the cluster is ok and every live replica is in sync with its master."""
        for port in self.live_ports():
            node = self.node(port)
            if node.cluster("info").get("cluster_state") != "ok":
                return False
            replication = node.info("replication")
            if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                return False
        return True

    def live_ports(self) -> list[int]:
        return [port for port, proc in self.procs.items() if proc.poll() is None]

    def master_of(self, key: str) -> int:
        """The port of the master that holds ``key``'s slot now."""
        probe = self.node(self.live_ports()[0])
        slot = probe.cluster("keyslot", key)
        for start, end, master, *_ in probe.cluster("slots"):
            if start <= slot <= end:
                return int(master[1])
        raise AssertionError(f"no master holds slot {slot}")

    def kill(self, port: int) -> None:
        self.procs[port].kill()
        self.procs[port].wait(5)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
