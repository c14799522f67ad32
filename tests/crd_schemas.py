"""Validation of custom resources against the OpenAPI schemas of their CRDs.

The CRDs (schemas only) come from ../shared/crds beside the clone, or the folder that
EXTGUARD_CRD_DIR names. Like the Kubernetes API server's strict field validation, every field
must be known to the schema, because a misspelt field would otherwise be dropped without a
word. The CEL rules (`x-kubernetes-validations`) of the CRDs are not evaluated.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
# The CRDs are not part of the repository: EXTGUARD_CRD_DIR, or ../shared/crds beside the clone.
CRD_DIR = Path(os.environ.get("EXTGUARD_CRD_DIR") or REPO_ROOT.parent / "shared" / "crds")


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


def crd_errors(resource: dict[str, Any]) -> list[str]:
    """Return the schema errors and unknown spec fields of a custom resource, or [] when it is valid.

    Raises KeyError when no CRD in CRD_DIR defines the resource's apiVersion and kind.
    """
    group, version = resource["apiVersion"].split("/")
    schema = crd_schemas()[(group, version, resource["kind"])]

    # The API server fills apiVersion, kind and metadata itself; the schema covers spec.
    errors = [error.message for error in jsonschema.Draft7Validator(schema).iter_errors(resource)]
    errors.extend(f"unknown field {path}" for path in unknown_fields(resource["spec"], schema["properties"]["spec"], "spec"))
    return errors
