"""The Envoy Gateway and AI Gateway resources in envoy/gateway/ validate against their CRDs.

The CRDs (schemas only) come from ../shared/crds, or EXTGUARD_CRD_DIR. Each resource is checked with the version's
OpenAPI schema, and, like the Kubernetes API server's field validation, every field must be
known to the schema: a misspelt field would otherwise be dropped without a word. The CEL rules
(`x-kubernetes-validations`) of the CRDs are not evaluated here.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
# The CRDs are not part of the repository: EXTGUARD_CRD_DIR, or ../shared/crds beside the clone.
CRD_DIR = Path(os.environ.get("EXTGUARD_CRD_DIR") or REPO_ROOT.parent / "shared" / "crds")
RESOURCES = sorted((REPO_ROOT / "envoy" / "gateway").glob("*.yaml"))

pytestmark = pytest.mark.skipif(not CRD_DIR.is_dir(), reason=f"the CRDs are not at {CRD_DIR}")


@functools.cache
def crd_schemas() -> dict[tuple[str, str, str], dict[str, Any]]:
    """Return the OpenAPI schema of each (group, version, kind)."""
    schemas = {}
    for path in CRD_DIR.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text(encoding="utf-8"))
        spec = crd["spec"]
        for version in spec["versions"]:
            schemas[(spec["group"], version["name"], spec["names"]["kind"])] = version["schema"]["openAPIV3Schema"]
    return schemas


def unknown_fields(value: Any, schema: dict[str, Any], where: str = "") -> Iterator[str]:
    """Yield the paths of fields that the schema does not define (strict field validation)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key in schema["properties"]:
                yield from unknown_fields(item, schema["properties"][key], f"{where}.{key}")
            elif not schema.get("additionalProperties"):
                yield f"{where}.{key}"
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            yield from unknown_fields(item, schema["items"], f"{where}[{index}]")


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
