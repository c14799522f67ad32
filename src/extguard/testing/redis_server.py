"""A real `redis-server` on a free loopback port, for tests and benchmarks.

By default it keeps nothing on disk, so a restart comes back empty. With `durable=True` it
writes an append-only file and syncs it before each reply, so a restart (even after `kill()`)
comes back with every write it acknowledged. It runs in a temporary folder and can be stopped and
started again on the same port to test outages. `arguments` are added to the command line, and
`config_text` becomes its config file (Sentinel needs one that it can rewrite).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from extguard.testing.stack import free_port


class RedisServer:
    """Start with `start()`, stop with `stop()`; `url` stays the same across restarts."""

    def __init__(
        self, port: int | None = None, *, durable: bool = False, arguments: Sequence[str] = (), config_text: str | None = None
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; scripts/bootstrap.sh installs it with apt-get")
        self.binary = binary
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.durable = durable
        self.arguments = list(arguments)
        self._work_dir = Path(tempfile.mkdtemp(prefix="extguard-redis-"))
        self._config_file: list[str] = []
        if config_text is not None:
            (self._work_dir / "redis.conf").write_text(config_text, encoding="utf-8")
            self._config_file = [str(self._work_dir / "redis.conf")]
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        command = [
            self.binary, *self._config_file, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
            "--dir", str(self._work_dir), "--protected-mode", "yes", *self.arguments,
        ]  # fmt: skip
        log = open(self._work_dir / "redis.log", "ab")  # noqa: SIM115 - the child process keeps it
        self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._process.returncode}; see {self._work_dir / 'redis.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as connection:
                    connection.sendall(b"PING\r\n")
                    # A server with a password rejects the PING, but it is up.
                    if connection.recv(16).startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not respond on port {self.port} within {timeout_s} s")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=10)
        self._process = None

    def kill(self) -> None:
        """Stop the server at once with SIGKILL, as a crash would."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)
        self._process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._work_dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
