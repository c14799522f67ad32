"""Every Envoy bootstrap the project ships is accepted by `envoy --mode validate`."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import certifi
import pytest

from extguard.testing.stack import ENVOY_DIR, REPO_ROOT, envoy_binary, render_bootstrap

BOOTSTRAPS = sorted(ENVOY_DIR.glob("*.yaml")) + [REPO_ROOT / "benchmarks" / "envoy-bench.yaml"]


def placeholder_value(name: str, index: int) -> object:
    """Return a value Envoy accepts for a placeholder: a host, a CA bundle, or a port number."""
    if name.endswith("_HOST"):
        return "127.0.0.1"
    if name.endswith("_CA_FILE"):
        return certifi.where()  # Envoy reads the file, so it must exist and hold certificates
    return 10000 + index


@pytest.mark.parametrize("template", BOOTSTRAPS, ids=lambda path: path.name)
def test_bootstrap_validates(template: Path, tmp_path: Path) -> None:
    names = set(re.findall(r"\$\{([A-Z_]+)\}", template.read_text(encoding="utf-8")))
    values = {name: placeholder_value(name, index) for index, name in enumerate(sorted(names))}
    config = render_bootstrap(template, tmp_path / template.name, values)

    result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config)],
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr
