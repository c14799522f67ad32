"""The Envoy Gateway and AI Gateway resources in envoy/gateway/ validate against their CRDs.

tests/crd_schemas.py finds the CRDs (schemas only) and checks each resource with its version's
OpenAPI schema and, like the API server's strict field validation, for unknown fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from crd_schemas import CRD_DIR, crd_schemas, unknown_fields

REPO_ROOT = Path(__file__).resolve().parents[1]
RESOURCES = sorted((REPO_ROOT / "envoy" / "gateway").glob("*.yaml"))

pytestmark = pytest.mark.skipif(not CRD_DIR.is_dir(), reason=f"the CRDs are not at {CRD_DIR}")


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in RESOURCES:
        for index, document in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if document:
                found.append((f"{path.name}#{index}", document))
    return found


@pytest.mark.parametrize(("name", "resource"), documents(), ids=[name for name, _ in documents()])
def test_resource_matches_crd(name: str, resource: dict[str, Any]) -> None:
    group, version = resource["apiVersion"].split("/")
    schema = crd_schemas().get((group, version, resource["kind"]))
    assert schema is not None, f"no CRD for {resource['apiVersion']} {resource['kind']}"

    # The API server fills apiVersion, kind and metadata itself; the schema covers spec.
    errors = [error.message for error in jsonschema.Draft7Validator(schema).iter_errors(resource)]
    assert errors == []
    assert list(unknown_fields(resource["spec"], schema["properties"]["spec"], "spec")) == []


def test_every_kind_shipped() -> None:
    kinds = {resource["kind"] for _, resource in documents()}

    assert kinds == {"SecurityPolicy", "EnvoyExtensionPolicy", "ClientTrafficPolicy", "BackendTrafficPolicy", "AIGatewayRoute", "AIServiceBackend"}


def test_strict_check_catches_a_misspelt_field() -> None:
    schema = crd_schemas()[("gateway.envoyproxy.io", "v1alpha1", "EnvoyExtensionPolicy")]
    spec = {"extProc": [{"backendRefs": [{"name": "extguard", "port": 50051}], "messageTimeOut": "2s"}]}

    assert list(unknown_fields(spec, schema["properties"]["spec"], "spec")) == ["spec.extProc[0].messageTimeOut"]
