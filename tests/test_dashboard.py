"""The Grafana dashboard queries only metrics that extguard exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest

from extguard.telemetry.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "grafana" / "extguard-dashboard.json"


def exported_names() -> set[str]:
    metrics = Metrics()
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        # Families without samples yet still expose their suffixed series once used.
        names.update({f"{family.name}_total", f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"})
    assert generate_latest(metrics.registry)  # the registry renders
    return names


def test_dashboard_queries_known_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    known = exported_names()

    # Label names (after "by (") look like metric names too; drop them.
    labels = {name for expression in expressions for group in re.findall(r"by \(([^)]*)\)", expression) for name in re.split(r",\s*", group)}
    queried = {name for expression in expressions for name in re.findall(r"\b(?:gen_ai|extguard)_\w+", expression)} - labels
    assert len(dashboard["panels"]) == 9
    assert queried, "no metric in the dashboard"
    assert sorted(queried - known) == []
