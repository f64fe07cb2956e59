"""The Helm chart, rendered and linted by Helm's own engine (helm-python-sdk, Helm's Go library).

Every rendered object is checked against the Kubernetes OpenAPI schema or the upstream CRD schema
(tests/unit/schemas.py); RBAC is checked against the kinds the operator really calls (apply.py)."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml
from modelship.operator import apply
from modelship.operator.config import ENV_PREFIX, OperatorConfig, load_config

from tests.unit.schemas import validate_object

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "modelship"
_spec = importlib.util.spec_from_file_location(
    "manifests_generate", ROOT / "manifests" / "generate.py"
)
assert _spec is not None and _spec.loader is not None
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)

WRITE_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}
READ_VERBS = {"list", "watch"}
INTEGRATIONS: list[dict[str, Any]] = [
    {},
    {"nodePools": {"mode": "eks-nodegroup"}, "autoscaler": "hpa"},
    {"nodePools": {"mode": "none"}, "autoscaler": "none", "leaderWorkerSet": {"enabled": False}},
    {
        "monitoring": {
            "podMonitor": False,
            "serviceMonitor": {"enabled": False},
            "prometheusRule": {"enabled": False},
            "dashboards": {"enabled": False},
        }
    },
    {
        "nodePools": {
            "clusterName": "prod",
            "nodeRole": "KarpenterNodeRole-prod",
            "defaultNodeClass": {"create": True},
        },
        "catalog": "instances: []\n",
        "operator": {"replicas": 1},
    },
    {"watchNamespaces": ["team-a", "team-b"]},
]


@functools.cache
def _objects(values_json: str) -> tuple[dict[str, Any], ...]:
    return tuple(generate.chart_objects(json.loads(values_json)))


def objects(values: dict[str, Any]) -> list[dict[str, Any]]:
    """The chart's objects for `values` (rendered once per distinct values)."""
    return copy.deepcopy(list(_objects(json.dumps(values, sort_keys=True))))


def of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def rules_by_resource(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def group_of(kind: apply.Kind) -> str:
    return "" if kind.api_version == "v1" else kind.api_version.split("/")[0]


@pytest.mark.parametrize("values", INTEGRATIONS, ids=lambda v: json.dumps(v)[:60])
def test_renders_and_validates(values: dict[str, Any]) -> None:
    objs = objects(values)
    assert of_kind(objs, "Deployment"), "the operator Deployment is missing"
    assert not [o for o in objs if o["apiVersion"].startswith("kopf.dev")], "kopf peering is gone"
    for obj in objs:
        validate_object(obj)


@pytest.mark.parametrize("values", INTEGRATIONS, ids=lambda v: json.dumps(v)[:60])
def test_lint_is_clean(values: dict[str, Any]) -> None:
    report = helm_python.lint(CHART, values, strict=True, namespace="modelship-system")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("values", INTEGRATIONS, ids=lambda v: json.dumps(v)[:60])
def test_rbac_is_least_privilege(values: dict[str, Any]) -> None:
    objs = objects(values)
    for role in of_kind(objs, "ClusterRole") + of_kind(objs, "Role"):
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], f"{role['kind']} {role['metadata']['name']}: {rule}"
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
            assert "secrets" not in rule["resources"], "the operator reads no Secrets"
    for binding in of_kind(objs, "ClusterRoleBinding") + of_kind(objs, "RoleBinding"):
        assert binding["roleRef"]["name"] not in ("cluster-admin", "admin", "edit"), binding


def operator_deployment(objs: list[dict[str, Any]]) -> dict[str, Any]:
    """The operator's Deployment (the activator has its own)."""
    (deployment,) = [
        o for o in of_kind(objs, "Deployment") if not o["metadata"]["name"].endswith("-activator")
    ]
    return deployment


def granted_in(
    objs: list[dict[str, Any]], namespace: str | None
) -> dict[tuple[str, str], set[str]]:
    """What the operator may do in `namespace` (None: cluster-scoped); the activator's own
    read-only role is not the operator's."""
    rules = [
        r
        for role in of_kind(objs, "ClusterRole")
        if not role["metadata"]["name"].endswith("-activator")
        for r in role["rules"]
    ]
    if namespace is not None:
        rules += [
            r
            for role in of_kind(objs, "Role")
            if role["metadata"]["namespace"] == namespace
            for r in role["rules"]
        ]
    return rules_by_resource(rules)


@pytest.mark.parametrize("values", INTEGRATIONS, ids=lambda v: json.dumps(v)[:60])
def test_rbac_covers_every_kind_the_operator_calls(values: dict[str, Any]) -> None:
    objs = objects(values)
    chart = helm_python.Chart.load(CHART)
    effective = chart.merge_values(values)
    namespaces = effective["watchNamespaces"] or [None]
    enabled = {
        apply.LEADER_WORKER_SET: effective["leaderWorkerSet"]["enabled"],
        apply.SCALED_OBJECT: effective["autoscaler"] == "keda",
        apply.HPA: effective["autoscaler"] == "hpa",
        apply.POD_MONITOR: effective["monitoring"]["podMonitor"],
        apply.NODE_POOL: effective["nodePools"]["mode"] == "karpenter",
        apply.EC2_NODE_CLASS: effective["nodePools"]["mode"] == "karpenter",
    }
    for namespace in namespaces:
        for kind in (*apply.CHILD_KINDS, *apply.POOL_KINDS, apply.POD, apply.NODE_CLAIM):
            granted = granted_in(objs, namespace if kind.namespaced else None)
            verbs = granted.get((group_of(kind), kind.plural), set())
            # Pruning lists and the watches (handlers.py) watch every kind, enabled or not.
            assert verbs >= READ_VERBS, f"{kind.kind}: no list/watch in {namespace or 'cluster'}"
            if kind in (apply.POD, apply.NODE_CLAIM):
                assert verbs == READ_VERBS, f"{kind.kind}: only read, got {verbs}"
            elif enabled.get(kind, True):
                assert verbs == WRITE_VERBS, f"{kind.kind}: {verbs}"
            else:
                assert verbs == READ_VERBS, f"{kind.kind} is disabled but may {verbs}"
        granted = granted_in(objs, namespace)
        assert granted[("modelship.dev", "modeldeployments")] == {"get", "list", "watch", "patch"}
        assert granted[("modelship.dev", "modeldeployments/status")] == {"get", "patch"}
        assert granted[("", "events")] == {"create"}
    # Leader election: one Lease in the release namespace, nothing cluster-wide.
    (lease_role,) = [
        r for r in of_kind(objs, "Role") if r["metadata"]["name"].endswith("-leader-election")
    ]
    assert lease_role["metadata"]["namespace"] == "modelship-system"
    assert rules_by_resource(lease_role["rules"]) == {
        ("coordination.k8s.io", "leases"): {"get", "create", "update"}
    }
    assert ("coordination.k8s.io", "leases") not in granted_in(objs, None)
    if effective["watchNamespaces"]:
        cluster = granted_in(objs, None)
        assert ("modelship.dev", "modeldeployments") not in cluster, (
            "namespaced mode is cluster-wide"
        )


def test_crd_copy_is_byte_identical() -> None:
    source = ROOT / "crds" / "modeldeployments.modelship.dev.yaml"
    copy = CHART / "crds" / "modeldeployments.modelship.dev.yaml"
    assert copy.read_bytes() == source.read_bytes(), (
        f"{copy} differs from {source}: cp {source} {copy}"
    )


def test_config_map_sets_exactly_the_operators_variables() -> None:
    objs = objects({"catalog": "x: 1\n", "aws": {"s3EndpointUrl": "http://s3.local"}})
    data = next(o for o in of_kind(objs, "ConfigMap") if o["metadata"]["name"].endswith("-config"))[
        "data"
    ]
    known = {ENV_PREFIX + name.upper() for name in OperatorConfig.model_fields}
    assert set(data) <= known, f"unknown variables: {set(data) - known}"
    config = load_config(data)
    assert config.node_pool_mode == "karpenter" and config.autoscaler == "keda"
    assert config.catalog_path == "/etc/modelship/catalog.yaml"
    efa = objects({"nodePools": {"efaSecurityGroupIds": ["sg-0a1", "sg-0b2"]}})
    efa_data = next(
        o for o in of_kind(efa, "ConfigMap") if o["metadata"]["name"].endswith("-config")
    )
    assert load_config(efa_data["data"]).efa_security_group_ids == ("sg-0a1", "sg-0b2")
    deployment = operator_deployment(objs)
    mounts = deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any(m["mountPath"] == "/etc/modelship" for m in mounts), "catalog not mounted"


def test_activator_url_reaches_the_activator_pods() -> None:
    """The URL the operator writes into status.endpoint (scale to zero) is the chart's Service,
    whose port leads to the port the activator's own Deployment listens on; the operator itself
    serves no activator."""
    objs = objects({"operator": {"activatorPort": 9090}})
    data = next(o for o in of_kind(objs, "ConfigMap") if o["metadata"]["name"].endswith("-config"))[
        "data"
    ]
    config = load_config(data)
    assert config.activator_port == 0  # the operator's copy: no in-process activator
    service = next(
        o for o in of_kind(objs, "Service") if o["metadata"]["name"].endswith("-activator")
    )
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    port = next(p for p in service["spec"]["ports"] if p["name"] == "http")
    assert config.activator_url == f"http://{name}.{namespace}.svc.cluster.local:{port['port']}"
    deployment = next(
        o for o in of_kind(objs, "Deployment") if o["metadata"]["name"].endswith("-activator")
    )
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "activator"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert ports[port["targetPort"]] == int(env["MODELSHIP_ACTIVATOR_PORT"]) == 9090
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    operator = operator_deployment(objs)
    assert (
        not service["spec"]["selector"].items()
        <= operator["spec"]["template"]["metadata"]["labels"].items()
    )


def test_the_activator_may_only_read_model_deployments() -> None:
    objs = objects({})
    (role,) = [
        o for o in of_kind(objs, "ClusterRole") if o["metadata"]["name"].endswith("-activator")
    ]
    assert role["rules"] == [
        {
            "apiGroups": ["modelship.dev"],
            "resources": ["modeldeployments"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    deployment = next(
        o for o in of_kind(objs, "Deployment") if o["metadata"]["name"].endswith("-activator")
    )
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"].endswith("-activator")
    assert pod["containers"][0]["resources"]["limits"]["memory"] == "512Mi"
    scoped = objects({"watchNamespaces": ["team-a"]})
    assert not [
        o
        for o in of_kind(scoped, "ClusterRoleBinding")
        if o["metadata"]["name"].endswith("-activator")
    ]
    (binding,) = [
        o for o in of_kind(scoped, "RoleBinding") if o["metadata"]["name"].endswith("-activator")
    ]
    assert binding["metadata"]["namespace"] == "team-a"
    hpa = objects({"activator": {"autoscaling": {"enabled": True}}})
    assert [
        o["spec"]["scaleTargetRef"]["name"] for o in of_kind(hpa, "HorizontalPodAutoscaler")
    ] == [deployment["metadata"]["name"]]

    # The default install matches the operator's built-in default (used by `modelship render`).
    default = load_config(
        next(
            o
            for o in of_kind(objects({}), "ConfigMap")
            if o["metadata"]["name"].endswith("-config")
        )["data"]
    )
    assert default.activator_url == OperatorConfig().activator_url


def test_operator_deployment_is_restricted_and_probed() -> None:
    deployment = operator_deployment(objects({}))
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    # Two replicas by default: a Lease elects the one that reconciles (operator/leader.py).
    assert deployment["spec"]["replicas"] == 2
    env = {
        e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        for e in container["env"]
    }
    assert env["POD_NAME"] == "metadata.name" and env["POD_NAMESPACE"] == "metadata.namespace"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["args"][container["args"].index("--health-port") + 1] == str(ports["health"])


def test_runtime_service_account_with_irsa_in_every_namespace() -> None:
    arn = "arn:aws:iam::123456789012:role/modelship-s3-read"
    objs = objects(
        {
            "watchNamespaces": ["team-a"],
            "runtimeServiceAccount": {"annotations": {"eks.amazonaws.com/role-arn": arn}},
        }
    )
    runtime = [
        sa
        for sa in of_kind(objs, "ServiceAccount")
        if sa["metadata"]["name"] == "modelship-runtime"
    ]
    assert {sa["metadata"]["namespace"] for sa in runtime} == {"modelship-system", "team-a"}
    assert all(sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == arn for sa in runtime)


def test_dashboards_and_rules_are_carried_verbatim() -> None:
    objs = objects({})
    dashboards = [
        o for o in of_kind(objs, "ConfigMap") if "grafana_dashboard" in o["metadata"]["labels"]
    ]
    files = sorted((CHART / "dashboards").glob("*.json"))
    assert len(dashboards) == len(files) >= 3
    for cm in dashboards:
        ((name, text),) = cm["data"].items()
        assert json.loads(text) == json.loads((CHART / "dashboards" / name).read_text())
    rule = of_kind(objs, "PrometheusRule")[0]
    assert rule["spec"] == yaml.safe_load((CHART / "rules" / "modelship.rules.yaml").read_text())


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"autoscaler": "cluster-autoscaler"}, "autoscaler"),
        ({"nodePools": {"mode": "fargate"}}, "mode"),
        ({"operator": {"replicas": 0}}, "replicas"),
        ({"operator": {"replicaCount": 2}}, "replicaCount"),
        ({"watchNamespaces": ["Team_A"]}, "watchNamespaces"),
        ({"monitoring": {"podMonitor": "yes"}}, "podMonitor"),
        ({"aws": {"region": "virginia"}}, "region"),
        (
            {"operator": {"extraEnv": [{"name": "MODELSHIP_AUTOSCALER", "value": "none"}]}},
            "extraEnv",
        ),
        ({"nodePools": {"subnetIds": ["vpc-123"]}}, "subnetIds"),
        ({"nodePools": {"efaSecurityGroupIds": ["subnet-123"]}}, "efaSecurityGroupIds"),
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any], field: str) -> None:
    chart = helm_python.Chart.load(CHART)
    with pytest.raises(helm_python.HelmValuesError) as error:
        chart.render(values, name="modelship", namespace="modelship-system", is_install=True)
    assert field in str(error.value), str(error.value)


def test_default_node_class_needs_cluster_and_role() -> None:
    chart = helm_python.Chart.load(CHART)
    with pytest.raises(helm_python.HelmError, match=r"nodePools\.clusterName is required"):
        chart.render({"nodePools": {"defaultNodeClass": {"create": True}}}, name="m", namespace="n")


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed: scripts/install-prometheus.sh"
)
def test_promtool_checks_the_rules() -> None:
    result = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(CHART / "rules" / "modelship.rules.yaml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed: scripts/install-prometheus.sh"
)
def test_promtool_unit_tests_of_the_alerts() -> None:
    result = subprocess.run(
        [str(PROMTOOL), "test", "rules", str(CHART / "rules" / "modelship.rules.test.yaml")],
        capture_output=True,
        text=True,
        cwd=CHART / "rules",
    )
    assert result.returncode == 0, result.stdout + result.stderr
