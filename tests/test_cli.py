"""The `extguard` command line: check-config and serve start-up errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from extguard.testing.stack import EXAMPLE_POLICY


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extguard", *args], capture_output=True, text=True, timeout=60)


def test_check_config_accepts_example() -> None:
    result = run_cli("check-config", str(EXAMPLE_POLICY))

    assert result.returncode == 0
    assert "valid" in result.stdout


def test_check_config_lists_every_error(tmp_path: Path) -> None:
    policy = tmp_path / "bad.yaml"
    policy.write_text("default:\n  on_bad_input: maybe\n  rules:\n    pii: {action: blok}\n", encoding="utf-8")
    result = run_cli("check-config", str(policy))

    assert result.returncode == 2
    assert f"{policy}:2: default.on_bad_input" in result.stderr
    assert f"{policy}:4: default.rules.pii.action" in result.stderr


def test_check_config_notes_empty_policy(tmp_path: Path) -> None:
    policy = tmp_path / "empty.yaml"
    policy.write_text("version: 1\n", encoding="utf-8")
    result = run_cli("check-config", str(policy))

    assert result.returncode == 0
    assert "note: no rule is enabled" in result.stdout


def test_check_config_notes_missing_model_folder(tmp_path: Path) -> None:
    policy = tmp_path / "llm-guard.yaml"
    policy.write_text(
        f"deep_engines:\n  llm_guard: {{model_path: {tmp_path / 'absent'}, deadline_ms: 1000}}\n"
        "default:\n  rules:\n    classifier: {detector: llm_guard, action: block}\n",
        encoding="utf-8",
    )
    result = run_cli("check-config", str(policy))

    assert result.returncode == 0
    assert f"model_path {tmp_path / 'absent'} is not a folder here" in result.stdout


def test_check_config_notes_organization_setting(tmp_path: Path) -> None:
    policy = tmp_path / "org.yaml"
    policy.write_text(
        "default:\n  rules:\n    names: {detector: presidio, entities: [PERSON, ORGANIZATION], action: mask}\n",
        encoding="utf-8",
    )
    result = run_cli("check-config", str(policy))

    assert result.returncode == 0
    assert "ORGANIZATION, which Presidio reports only with deep_engines.presidio.organizations: true" in result.stdout


def test_serve_refuses_invalid_policy(tmp_path: Path) -> None:
    policy = tmp_path / "bad.yaml"
    policy.write_text("routes: {}\n", encoding="utf-8")
    result = run_cli("serve", "--config", str(policy), "--listen", "127.0.0.1:0", "--metrics-listen", "off")

    assert result.returncode == 2
    assert "routes" in result.stderr


def test_serve_reports_missing_policy(tmp_path: Path) -> None:
    result = run_cli("serve", "--config", str(tmp_path / "absent.yaml"), "--metrics-listen", "off")

    assert result.returncode == 2
    assert "cannot read the file" in result.stderr


def test_serve_rejects_invalid_listen_address() -> None:
    result = run_cli("serve", "--config", str(EXAMPLE_POLICY), "--listen", "nonsense", "--metrics-listen", "off")

    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: --listen: invalid address 'nonsense': expected HOST:PORT with a port from 0 to 65535"
    )


def test_serve_rejects_port_only_metrics_address() -> None:
    result = run_cli("serve", "--config", str(EXAMPLE_POLICY), "--listen", "127.0.0.1:0", "--metrics-listen", "9464")

    assert result.returncode == 1
    assert "error: --metrics-listen: invalid address '9464'" in result.stderr


def test_otlp_protos_are_the_exporters() -> None:
    """xds-protos ships an old copy of opentelemetry/proto; the installed one must be the exporter's."""
    from opentelemetry.proto.trace.v1 import trace_pb2

    assert "scope_spans" in trace_pb2.ResourceSpans.DESCRIPTOR.fields_by_name
