"""The Helm chart in helm/extguard lints, renders and produces valid, hardened objects.

Helm runs in-process through helm-python-sdk (Helm's Go library behind ctypes), so no `helm`
binary and no cluster are needed. The chart is checked with its default values and with
tests/data/helm-values-full.yaml, which turns on every optional part.

Rendered core objects are validated with kubernetes-validate's strict schemas (unknown fields
fail) for the oldest Kubernetes version that the chart supports. Envoy Gateway objects are
validated against their CRDs (tests/crd_schemas.py). The CRDs of the ServiceMonitor and the
ReferenceGrant are not available here, so the tests check their shape by hand.
"""

from __future__ import annotations

import copy
import functools
import json
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from crd_schemas import CRD_DIR, crd_errors
from extguard.config.loader import load_policy
from extguard.scan.detectors import default_detectors

REPO_ROOT = Path(__file__).resolve().parents[1]
CHART = REPO_ROOT / "helm" / "extguard"
FULL_VALUES = Path(__file__).resolve().parent / "data" / "helm-values-full.yaml"
# The chart's kubeVersion floor: fields newer than this would be rejected by older clusters.
KUBERNETES_VERSION = "1.30.0"
RELEASE = "guard"
NAMESPACE = "llm"
FULLNAME = f"{RELEASE}-extguard"

CORE_GROUPS = {"v1", "apps/v1", "autoscaling/v2", "policy/v1", "networking.k8s.io/v1"}
ENVOY_GATEWAY_GROUP = "gateway.envoyproxy.io"

Manifest = dict[str, Any]


@functools.cache
def full_values() -> dict[str, Any]:
    return yaml.safe_load(FULL_VALUES.read_text(encoding="utf-8"))


VALUE_SETS = ["default", "full"]


def values_of(value_set: str) -> dict[str, Any]:
    """Return a copy of the named values: the chart's defaults ({}) or the full values file."""
    return copy.deepcopy(full_values()) if value_set == "full" else {}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any]) -> list[Manifest]:
    """Render the chart as `helm install` would and return every object, NOTES.txt left out."""
    files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(document for document in yaml.safe_load_all(text) if document)
    return objects


def one(objects: list[Manifest], kind: str) -> Manifest:
    found = [item for item in objects if item["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(objects: list[Manifest]) -> Manifest:
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def args_of(objects: list[Manifest]) -> dict[str, str]:
    """Return the `--name=value` arguments of `extguard serve` as a dict (the last one wins)."""
    args = container(objects)["args"]
    assert args[0] == "serve"
    return dict(arg.removeprefix("--").split("=", 1) for arg in args[1:])


def env_of(objects: list[Manifest]) -> dict[str, Manifest]:
    return {item["name"]: item for item in container(objects).get("env", [])}


def rendered_policy(objects: list[Manifest]) -> dict[str, Any]:
    configmap = next(item for item in objects if item["kind"] == "ConfigMap" and item["metadata"]["name"] == f"{FULLNAME}-policy")
    return yaml.safe_load(configmap["data"]["policy.yaml"])


# Lint


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_lint_strict_passes(value_set: str) -> None:
    report = helm.lint(CHART, values_of(value_set), strict=True, namespace=NAMESPACE, kube_version=f"v{KUBERNETES_VERSION}")

    # Severity 1 is information, such as "icon is recommended". 2 is a warning and 3 an error.
    assert report["errors"] == []
    assert [message for message in report["messages"] if message["severity"] >= 2] == []


@pytest.mark.parametrize(
    ("typo", "key"),
    [({"replicaCont": 3}, "replicaCont"), ({"redis": {"enabeld": True}}, "enabeld"), ({"server": {"gracePeriodSecond": 5}}, "gracePeriodSecond")],
    ids=["top-level", "redis", "server"],
)
def test_schema_rejects_misspelt_key(chart: helm.Chart, typo: dict[str, Any], key: str) -> None:
    report = helm.lint(CHART, typo, strict=True, namespace=NAMESPACE)

    assert report["errors"] != []
    assert any(key in error for error in report["errors"])
    with pytest.raises(helm.HelmValuesError, match=key):
        chart.render(typo, name=RELEASE, namespace=NAMESPACE)


# Validation of every rendered object


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_core_objects_match_kubernetes_schema(chart: helm.Chart, value_set: str) -> None:
    objects = [item for item in render(chart, values_of(value_set)) if item["apiVersion"] in CORE_GROUPS]

    assert objects
    for item in objects:
        # strict: unknown fields fail, as with the API server's strict field validation.
        kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)


@pytest.mark.skipif(not CRD_DIR.is_dir(), reason=f"the CRDs are not at {CRD_DIR}")
def test_gateway_objects_match_crds(chart: helm.Chart) -> None:
    objects = [item for item in render(chart, full_values()) if item["apiVersion"].startswith(f"{ENVOY_GATEWAY_GROUP}/")]

    assert {item["kind"] for item in objects} == {"SecurityPolicy", "EnvoyExtensionPolicy", "ClientTrafficPolicy", "BackendTrafficPolicy"}
    for item in objects:
        assert crd_errors(item) == [], item["kind"]


def test_ext_authz_gets_no_request_body(chart: helm.Chart) -> None:
    # Envoy Gateway rejects a body larger than bodyToExtAuth's limit with 413, so a limit there
    # would reject large prompts. ext_proc checks the model from the body instead.
    shipped = yaml.safe_load_all((REPO_ROOT / "envoy" / "gateway" / "extguard-policies.yaml").read_text(encoding="utf-8"))
    policies = [one(render(chart, full_values()), "SecurityPolicy")]
    policies += [item for item in shipped if item and item["kind"] == "SecurityPolicy"]

    assert len(policies) == 2
    for policy in policies:
        assert "bodyToExtAuth" not in policy["spec"]["extAuth"]


def test_every_object_is_checked(chart: helm.Chart) -> None:
    objects = render(chart, full_values())
    unchecked = {
        (item["apiVersion"], item["kind"])
        for item in objects
        if item["apiVersion"] not in CORE_GROUPS and not item["apiVersion"].startswith(f"{ENVOY_GATEWAY_GROUP}/")
    }

    # These two have no CRD in the CRD folder; the tests below check their shape by hand.
    assert unchecked == {("monitoring.coreos.com/v1", "ServiceMonitor"), ("gateway.networking.k8s.io/v1beta1", "ReferenceGrant")}


def test_service_monitor_scrapes_metrics_port(chart: helm.Chart) -> None:
    objects = render(chart, full_values())
    monitor = one(objects, "ServiceMonitor")
    service = one(objects, "Service")

    assert set(monitor["spec"]) == {"selector", "endpoints"}
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    [endpoint] = monitor["spec"]["endpoints"]
    assert set(endpoint) == {"port", "path", "interval", "scrapeTimeout"}
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    assert "metrics" in {port["name"] for port in service["spec"]["ports"]}


def test_reference_grant_admits_gateway_policies(chart: helm.Chart) -> None:
    objects = render(chart, full_values())
    grant = one(objects, "ReferenceGrant")
    gateway_namespace = full_values()["gateway"]["namespace"]

    assert grant["metadata"]["namespace"] == NAMESPACE
    assert grant["spec"]["from"] == [
        {"group": ENVOY_GATEWAY_GROUP, "kind": "SecurityPolicy", "namespace": gateway_namespace},
        {"group": ENVOY_GATEWAY_GROUP, "kind": "EnvoyExtensionPolicy", "namespace": gateway_namespace},
    ]
    assert grant["spec"]["to"] == [{"group": "", "kind": "Service", "name": FULLNAME}]


def test_no_reference_grant_in_release_namespace(chart: helm.Chart) -> None:
    objects = render(chart, {"gateway": {"enabled": True}})
    policy = one(objects, "SecurityPolicy")

    assert "ReferenceGrant" not in {item["kind"] for item in objects}
    assert policy["metadata"]["namespace"] == NAMESPACE
    assert policy["spec"]["extAuth"]["grpc"]["backendRefs"] == [{"name": FULLNAME, "port": 50051}]


# What users rely on


def test_default_values_render_core_objects_only(chart: helm.Chart) -> None:
    kinds = sorted(item["kind"] for item in render(chart, {}))

    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"]


def test_labels_on_every_object(chart: helm.Chart) -> None:
    for item in render(chart, full_values()):
        labels = item["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "extguard", item["kind"]
        assert labels["app.kubernetes.io/instance"] == RELEASE, item["kind"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm", item["kind"]
        assert labels["app.kubernetes.io/part-of"] == "extguard", item["kind"]
        assert labels["app.kubernetes.io/component"] == "guard", item["kind"]
        assert labels["app.kubernetes.io/version"] == chart.metadata["appVersion"], item["kind"]
        assert labels["helm.sh/chart"] == f"extguard-{chart.metadata['version']}", item["kind"]


def test_autoscaler_owns_replicas(chart: helm.Chart) -> None:
    fixed = one(render(chart, {}), "Deployment")
    objects = render(chart, full_values())
    autoscaler = one(objects, "HorizontalPodAutoscaler")

    assert fixed["spec"]["replicas"] == 2
    assert "replicas" not in one(objects, "Deployment")["spec"]
    assert autoscaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    assert autoscaler["spec"]["minReplicas"] == full_values()["autoscaling"]["minReplicas"]


def test_app_version_is_package_version(chart: helm.Chart) -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))

    assert chart.metadata["appVersion"] == pyproject["project"]["version"]


def test_default_policy_is_example_policy(chart: helm.Chart) -> None:
    original = (REPO_ROOT / "examples" / "policy.yaml").read_text(encoding="utf-8")
    configmap = one(render(chart, {}), "ConfigMap")

    assert (CHART / "files" / "policy.yaml").read_text(encoding="utf-8") == original
    # Rendered as it is, so the ConfigMap keeps the file's comments.
    assert configmap["data"]["policy.yaml"] == original


def test_policy_value_replaces_default(chart: helm.Chart) -> None:
    policy = {"version": 1, "default": {"rules": {"secrets": {"action": "block"}}}}

    assert rendered_policy(render(chart, {"policy": policy})) == policy


def test_dashboard_copy_equals_original(chart: helm.Chart) -> None:
    original = (REPO_ROOT / "grafana" / "extguard-dashboard.json").read_text(encoding="utf-8")
    configmap = next(item for item in render(chart, full_values()) if item["metadata"]["name"] == f"{FULLNAME}-dashboard")

    assert (CHART / "dashboards" / "extguard-dashboard.json").read_text(encoding="utf-8") == original
    assert json.loads(configmap["data"]["extguard-dashboard.json"]) == json.loads(original)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_pod_runs_hardened(chart: helm.Chart, value_set: str) -> None:
    objects = render(chart, values_of(value_set))
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    security = container(objects)["securityContext"]
    resources = container(objects)["resources"]

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["runAsGroup"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert one(objects, "ServiceAccount")["automountServiceAccountToken"] is False
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert set(resources["limits"]) == {"cpu", "memory"}
    # The only writable paths are volumes.
    assert "/tmp" in {mount["mountPath"] for mount in container(objects)["volumeMounts"]}


def test_deep_engines_get_more_memory(chart: helm.Chart) -> None:
    inline = container(render(chart, {}))
    deep = container(render(chart, {"deepEngines": {"enabled": True}}))

    assert deep["resources"]["limits"]["memory"] == "4Gi"
    assert inline["resources"]["limits"]["memory"] == "512Mi"
    assert deep["startupProbe"]["failureThreshold"] > inline["startupProbe"]["failureThreshold"]


@pytest.mark.parametrize(
    "values",
    [{}, {"server": {"grpcPort": 6000}}, {"server": {"grpcPort": 6001}, "service": {"grpcPort": 443}}],
    ids=["default", "server-port", "both-ports"],
)
def test_probes_are_grpc_on_listen_port(chart: helm.Chart, values: dict[str, Any]) -> None:
    objects = render(chart, values)
    grpc_port = int(args_of(objects)["listen"].rsplit(":", 1)[1])
    ports = {port["name"]: port["containerPort"] for port in container(objects)["ports"]}
    service_port = next(port for port in one(objects, "Service")["spec"]["ports"] if port["name"] == "grpc")

    assert ports["grpc"] == grpc_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container(objects)[probe]["grpc"] == {"port": grpc_port}, probe
    assert service_port["targetPort"] == "grpc"
    assert service_port["appProtocol"] == "kubernetes.io/h2c"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_grace_period_outlasts_drain(chart: helm.Chart, value_set: str) -> None:
    objects = render(chart, values_of(value_set))
    drain_seconds = float(args_of(objects)["grace-period-seconds"])
    pre_stop = container(objects).get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    termination = one(objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]

    assert drain_seconds > 0
    assert termination > drain_seconds + pre_stop


def test_short_grace_period_fails(chart: helm.Chart) -> None:
    values = {"terminationGracePeriodSeconds": 20, "server": {"gracePeriodSeconds": 20}, "preStopSleepSeconds": 0}

    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_policy_change_rolls_pods(chart: helm.Chart) -> None:
    def checksum(values: dict[str, Any]) -> str:
        return one(render(chart, values), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/policy"]

    changed_policy = yaml.safe_load((CHART / "files" / "policy.yaml").read_text(encoding="utf-8"))
    changed_policy["default"]["rules"]["secrets"]["action"] = "mask"

    assert checksum({"policy": changed_policy}) != checksum({})
    assert checksum({"replicaCount": 5}) == checksum({})
    # Settings that the chart writes into the policy count too.
    assert checksum(full_values()) != checksum({**full_values(), "redis": {**full_values()["redis"], "timeoutMs": 90}})


def test_existing_policy_config_map(chart: helm.Chart) -> None:
    objects = render(chart, {"existingPolicy": {"configMap": "my-policy", "key": "guard.yaml"}})
    deployment = one(objects, "Deployment")
    policy_volume = next(volume for volume in deployment["spec"]["template"]["spec"]["volumes"] if volume["name"] == "policy")
    policy_mount = next(mount for mount in container(objects)["volumeMounts"] if mount["name"] == "policy")

    assert "ConfigMap" not in {item["kind"] for item in objects}
    assert policy_volume["configMap"]["name"] == "my-policy"
    assert policy_mount["subPath"] == "guard.yaml"
    assert policy_mount["mountPath"] == args_of(objects)["config"]
    assert "checksum/policy" not in deployment["spec"]["template"]["metadata"].get("annotations", {})


# The rendered policy and extguard's own validation

def test_default_policy_passes_check_config(chart: helm.Chart, tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(rendered_policy(render(chart, {}))), encoding="utf-8")

    policies = load_policy(path, default_detectors())

    assert policies.tenancy is None
    assert len(policies.default.request_rules) == 3


def test_full_policy_passes_check_config(chart: helm.Chart, tmp_path: Path) -> None:
    policy = rendered_policy(render(chart, full_values()))
    # The loader reads the hashes file: give it one in place of the mounted Secret.
    local_keys = tmp_path / "api-keys.yaml"
    local_keys.write_text(yaml.safe_dump({"acme": [{"sha256": "0" * 64, "user": "ci-bot"}]}), encoding="utf-8")
    policy["tenancy"]["api_keys_file"] = str(local_keys)
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy), encoding="utf-8")

    policies = load_policy(path, default_detectors())

    assert policies.tenancy is not None
    assert policies.tenancy.store.backend.value == "redis"
    assert policies.tenancy.store.url == full_values()["redis"]["url"]
    assert policies.tenancy.store.mode.value == "cluster"
    assert [key.user for key in policies.tenancy.tenants["acme"].api_keys][-1] == "ci-bot"
    assert policies.tenancy.store.spool_max == full_values()["redis"]["spoolMax"]


def test_policy_names_mounted_files_and_env(chart: helm.Chart) -> None:
    objects = render(chart, full_values())
    policy = rendered_policy(objects)
    store = policy["tenancy"]["store"]
    env = env_of(objects)
    mounts = {mount["mountPath"] for mount in container(objects)["volumeMounts"]}
    values = full_values()

    assert store["mode"] == "cluster"
    assert env[store["password_env"]]["valueFrom"]["secretKeyRef"] == {"name": "extguard-redis", "key": "redis-password"}
    assert env[store["username_env"]]["valueFrom"]["secretKeyRef"] == {"name": "extguard-redis", "key": "redis-username"}
    assert env[policy["hash_key_env"]]["valueFrom"]["secretKeyRef"] == {"name": "extguard-hash-key", "key": "key"}
    assert str(Path(store["spool_file"]).parent) in mounts
    assert str(Path(policy["tenancy"]["api_keys_file"]).parent) in mounts
    assert Path(policy["tenancy"]["api_keys_file"]).name == values["apiKeys"]["key"]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == values["tracing"]["endpoint"]
    assert args_of(objects)["admin-listen"] == "[::]:50052"


def test_sentinel_mode_writes_sentinels(chart: helm.Chart) -> None:
    values = full_values()
    auth = {**values["redis"]["auth"], "sentinelPasswordKey": "sentinel-password"}
    values = {**values, "redis": {
        **values["redis"], "mode": "sentinel", "sentinelMaster": "guard", "sentinels": ["s1:26379", "s2:26379"], "auth": auth,
    }}  # fmt: skip
    objects = render(chart, values)
    store = rendered_policy(objects)["tenancy"]["store"]
    redis_rule = one(objects, "NetworkPolicy")["spec"]["egress"][1]

    assert store["mode"] == "sentinel"
    assert store["sentinel_master"] == "guard"
    assert store["sentinels"] == ["s1:26379", "s2:26379"]
    assert {port["port"] for port in redis_rule["ports"]} == {6379, 26379}
    secret = env_of(objects)[store["sentinel_password_env"]]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": "extguard-redis", "key": "sentinel-password"}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"redis": {"enabled": True}}, "tenancy"),
        ({"redis": {"enabled": True, "mode": "sentinel"}, "policy": {"tenancy": {"tenants": {"a": {}}}}}, "sentinel"),
        ({"spool": {"existingClaim": "spool"}, "redis": {"enabled": True}, "policy": {"tenancy": {"tenants": {"a": {}}}}}, "existingClaim"),
        ({"tracing": {"enabled": True}}, "tracing.endpoint"),
    ],
    ids=["redis-without-tenancy", "sentinel-without-sentinels", "shared-spool-claim", "tracing-without-endpoint"],
)
def test_inconsistent_values_fail(chart: helm.Chart, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_network_policy_admits_gateway_and_monitoring(chart: helm.Chart) -> None:
    objects = render(chart, full_values())
    spec = one(objects, "NetworkPolicy")["spec"]
    container_ports = {port["name"] for port in container(objects)["ports"]}
    ingress_ports = [{port["port"] for port in rule["ports"]} for rule in spec["ingress"]]
    egress_ports = [{port["port"] for port in rule["ports"]} for rule in spec["egress"]]

    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert ingress_ports == [{"grpc"}, {"metrics"}, {"admin"}]
    assert {"grpc", "metrics", "admin"} <= container_ports
    assert spec["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "envoy-gateway-system"}
    assert spec["ingress"][1]["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert egress_ports == [{53}, {6379}, {4317}, {443}]


# The chart's README


def value_paths(values: Any, schema: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Yield the dotted path of each value that the schema fixes the keys of, leaf by leaf."""
    closed = schema.get("additionalProperties") is False
    if not (isinstance(values, dict) and closed and values):
        yield prefix
        return
    for key, item in values.items():
        yield from value_paths(item, schema["properties"][key], f"{prefix}.{key}" if prefix else key)


def test_readme_lists_every_value(chart: helm.Chart) -> None:
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    paths = list(value_paths(chart.values, chart.schema))

    assert len(paths) > 50
    assert [path for path in paths if f"| `{path}` |" not in readme] == []
