"""A real Redis Cluster, and a master with a replica watched by Sentinel, on free loopback ports.

Both are built from `RedisServer` processes in temporary folders and keep nothing on disk.
They serve the tests of the budget store's cluster and sentinel modes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from extguard.testing.redis_server import RedisServer
from extguard.testing.stack import free_port

CLUSTER_HASH_SLOTS = 16384


def _wait_until(condition: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except redis.RedisError:
            pass  # not ready yet: a node still joining, a Sentinel still electing
        time.sleep(0.05)
    raise RuntimeError(f"{what} within {timeout_s} s")


class RedisClusterServers:
    """A Redis Cluster of `masters` primaries without replicas; `url` names the first node."""

    def __init__(self, masters: int = 3) -> None:
        # The bus port defaults to the port + 10000, which may be taken or past 65535: pick a free one.
        self.bus_ports = [free_port() for _ in range(masters)]
        self.servers = [
            RedisServer(arguments=[
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000",
                "--cluster-port", str(bus_port),
            ])
            for bus_port in self.bus_ports
        ]  # fmt: skip
        self.url = self.servers[0].url

    def start(self, timeout_s: float = 20.0) -> None:
        """Start the nodes, give each an equal range of slots, and introduce them (CLUSTER MEET)."""
        for server in self.servers:
            server.start()
        share = CLUSTER_HASH_SLOTS // len(self.servers)
        for index, server in enumerate(self.servers):
            first = index * share
            last = CLUSTER_HASH_SLOTS - 1 if index == len(self.servers) - 1 else first + share - 1
            with redis.Redis(port=server.port) as client:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
                if index > 0:
                    client.execute_command("CLUSTER", "MEET", "127.0.0.1", self.servers[0].port, self.bus_ports[0])
        for server in self.servers:
            _wait_until(lambda port=server.port: _cluster_ok(port), f"node {server.port} did not report cluster_state:ok", timeout_s)

    def port_for_slot(self, slot: int) -> int:
        """Return the port of the node that serves `slot`."""
        with redis.Redis(port=self.servers[0].port) as client:
            for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(primary[1])
        raise LookupError(f"no node serves slot {slot}")

    def begin_slot_migration(self, slot: int, source_port: int, target_port: int) -> None:
        """Mark `slot` as leaving `source_port` for `target_port`. Its keys stay until migrate_keys moves them."""
        with redis.Redis(port=source_port) as source, redis.Redis(port=target_port) as target:
            target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.execute_command("CLUSTER", "MYID"))
            source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.execute_command("CLUSTER", "MYID"))

    def migrate_keys(self, slot: int, source_port: int, target_port: int, count: int) -> int:
        """Move up to `count` keys of `slot` with MIGRATE and return how many moved."""
        with redis.Redis(port=source_port) as source:
            keys = source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, count)
            if keys:
                source.execute_command("MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", *keys)
        return len(keys)

    def finish_slot_migration(self, slot: int, target_port: int) -> None:
        """Assign `slot` to `target_port` on every node, as the last step of a resharding."""
        with redis.Redis(port=target_port) as target:
            target_id = target.execute_command("CLUSTER", "MYID")
        for server in self.servers:
            with redis.Redis(port=server.port) as node:
                node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def close(self) -> None:
        for server in self.servers:
            server.close()

    def __enter__(self) -> RedisClusterServers:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _cluster_ok(port: int) -> bool:
    with redis.Redis(port=port) as client:
        return client.cluster("INFO")["cluster_state"] == "ok"


class RedisSentinelServers:
    """A master, one replica, and one Sentinel that monitors them as `master_name`.

    With `password`, master and replica require it (and the replica and Sentinel use it); with
    `sentinel_password`, the Sentinel requires its own.
    """

    def __init__(self, master_name: str = "budgets", *, password: str | None = None, sentinel_password: str | None = None) -> None:
        self.master_name = master_name
        self.password = password
        # Without the default 5 s delay before a full sync, the replica is in sync at once.
        options = ["--repl-diskless-sync-delay", "0"]
        if password:
            options += ["--requirepass", password, "--masterauth", password]
        self.master = RedisServer(arguments=options)
        self.replica = RedisServer(arguments=[*options, "--replicaof", "127.0.0.1", str(self.master.port)])
        lines = [
            f"sentinel monitor {master_name} 127.0.0.1 {self.master.port} 1",
            f"sentinel down-after-milliseconds {master_name} 1000",
            f"sentinel failover-timeout {master_name} 5000",
        ]
        if password:
            lines.append(f"sentinel auth-pass {master_name} {password}")
        if sentinel_password:
            lines.append(f"requirepass {sentinel_password}")
        self.sentinel_password = sentinel_password
        self.sentinel = RedisServer(arguments=["--sentinel"], config_text="\n".join(lines) + "\n")

    @property
    def sentinel_address(self) -> str:
        return f"127.0.0.1:{self.sentinel.port}"

    def start(self, timeout_s: float = 20.0) -> None:
        self.master.start()
        self.replica.start()
        _wait_until(self._replica_in_sync, "the replica did not connect to the master", timeout_s)
        # Started after the replica is in sync, the Sentinel finds it in its first INFO of the master.
        self.sentinel.start()
        _wait_until(self._replica_known, "the Sentinel did not list the replica", timeout_s)

    def master_port(self) -> int:
        """Return the master's port as the Sentinel reports it."""
        with self._sentinel_client() as client:
            _, port = client.sentinel_get_master_addr_by_name(self.master_name)
        return int(port)

    def failover(self, timeout_s: float = 20.0) -> int:
        """Promote the replica with SENTINEL FAILOVER; return the new master's port once it accepts writes."""
        old_port = self.master_port()
        with self._sentinel_client() as client:
            client.sentinel_failover(self.master_name)
        _wait_until(lambda: self.master_port() != old_port, "the Sentinel did not report a new master", timeout_s)
        new_port = self.master_port()
        _wait_until(lambda: self._role(new_port) == "master", f"port {new_port} did not become master", timeout_s)
        return new_port

    def close(self) -> None:
        for server in (self.sentinel, self.replica, self.master):
            server.close()

    def __enter__(self) -> RedisSentinelServers:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _sentinel_client(self) -> redis.Redis:
        return redis.Redis(port=self.sentinel.port, password=self.sentinel_password)

    def _role(self, port: int) -> str:
        with redis.Redis(port=port, password=self.password) as client:
            return client.info("replication")["role"]

    def _replica_in_sync(self) -> bool:
        with redis.Redis(port=self.replica.port, password=self.password) as client:
            replication = client.info("replication")
        return replication["role"] == "slave" and replication["master_link_status"] == "up"

    def _replica_known(self) -> bool:
        with self._sentinel_client() as client:
            replicas = client.sentinel_slaves(self.master_name)
        return any(int(replica["port"]) == self.replica.port and not replica["is_disconnected"] for replica in replicas)
