"""Every dashboard query, recording rule and alert expression returns data from a real Prometheus
scraping the real operator (`modelship operator`, on the real control plane with its chart's RBAC),
the runtime and vLLM (CPU build).

Alerts are checked with their thresholds removed (a numeric comparison dropped, a comparison
between two vectors turned into arithmetic), so the question is "do these series exist with
matching labels", not "is the system unhealthy right now".
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from modelship.operator.apply import Kind, Kube

from tests.servers.kubeplane import (
    ControlPlane,
    ensure_runtime_service_account,
    start_operator,
)
from tests.servers.prometheus import MODEL_DEPLOYMENT, NAMESPACE, Prometheus

pytestmark = pytest.mark.integration

CHART = Path(__file__).resolve().parents[2] / "helm" / "modelship"
MD = Kind("modelship.dev/v1alpha1", "ModelDeployment", "modeldeployments", True)
OPERATOR_ENV = {
    "MODELSHIP_CLUSTER_NAME": "test-cluster",
    "MODELSHIP_NODE_ROLE": "KarpenterNodeRole-test",
    "MODELSHIP_RESYNC_SECONDS": "2",
    "MODELSHIP_LEASE_SECONDS": "3",
    "MODELSHIP_ACTIVATOR_PORT": "0",
    "MODELSHIP_ALLOW_FILE_SOURCES": "true",
}
# Expressions that cannot return data on one CPU box, and why (checked to be exactly these).
NO_DATA_HERE = {
    "ModelshipReconcileErrors": "no reconcile ended in error or retry: the API server never failed",
    "ModelshipOperatorDown": "absent() is empty while the operator is scraped, which it is",
}


def dashboard_queries() -> dict[str, str]:
    """'dashboard / panel / refId' -> PromQL, with the template variables set to match all."""
    queries = {}
    for path in sorted((CHART / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$namespace", ".*").replace("$model_deployment", ".*")
                queries[f"{path.stem} / {panel['title']} / {target['refId']}"] = expr
    return queries


def without_threshold(expr: str) -> str:
    """The alert's expression minus its thresholds (see the module docstring)."""
    end = r"(?=\s*(?:$|\n|\band\b|\bor\b|\bunless\b|\)))"
    expr = re.sub(r"\s(?:==|!=|>=|<=|>|<)\s*[0-9][0-9.e+]*" + end, "", expr)
    return re.sub(r"\s(?:==|!=|>=|<=|>|<)\s", " + ", expr)


def rule_expressions() -> tuple[dict[str, str], dict[str, str]]:
    rules = yaml.safe_load((CHART / "rules" / "modelship.rules.yaml").read_text())
    records, alerts = {}, {}
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                records[rule["record"]] = rule["record"]  # the recorded series itself
            else:
                alerts[rule["alert"]] = without_threshold(rule["expr"].strip())
    return records, alerts


@pytest.fixture(scope="module")
def operator_with_model(
    modelship_installed: ControlPlane,
    operator_kubeconfig: Path,
    prometheus: Prometheus,
    runtime_vllm: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Kube]:
    """The operator, serving its metrics where Prometheus scrapes them, with one ModelDeployment
    for the tiny model vLLM serves."""
    kube = modelship_installed.kube()
    modelship_installed.ensure_namespace(NAMESPACE)
    ensure_runtime_service_account(modelship_installed, NAMESPACE)
    log = tmp_path_factory.mktemp("observability") / "operator.log"
    env = {**OPERATOR_ENV, "MODELSHIP_PROMETHEUS_URL": prometheus.url}
    operator = start_operator(
        operator_kubeconfig, env, log, metrics_port=prometheus.operator_metrics_port
    )
    try:
        body = {
            "apiVersion": "modelship.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": MODEL_DEPLOYMENT, "namespace": NAMESPACE},
            "spec": {"model": {"uri": f"file://{runtime_vllm.source_dir}"}},
        }
        kube.request("POST", MD.path(NAMESPACE), body=body)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            md = kube.get(MD, NAMESPACE, MODEL_DEPLOYMENT) or {}
            if (md.get("status") or {}).get("plan"):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"{MODEL_DEPLOYMENT} was never planned: {operator.log()}")
        yield kube
        kube.delete(MD, NAMESPACE, MODEL_DEPLOYMENT)
        deadline = time.monotonic() + 30
        while kube.get(MD, NAMESPACE, MODEL_DEPLOYMENT) and time.monotonic() < deadline:
            time.sleep(0.2)  # the delete handler removes the finalizer before the operator stops
    finally:
        assert operator.stop() == 0, operator.log()


def complete(base_url: str, model: str, prompt: str) -> None:
    request = urllib.request.Request(
        f"{base_url}/v1/completions",
        data=json.dumps({"model": model, "prompt": prompt, "max_tokens": 12}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200


def wait_for(prometheus: Prometheus, expr: str, timeout_seconds: float = 60) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not prometheus.query(expr):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no data for {expr} in {timeout_seconds:.0f} s: {prometheus.targets_up()}"
            )
        time.sleep(1)


@pytest.fixture(scope="module")
def scraped(prometheus: Prometheus, operator_with_model: Kube, runtime_vllm: Any) -> Prometheus:
    """Prometheus after a few completions have been served and scraped."""
    wait_for(
        prometheus, 'modelship_operator_planned_cost_usd_per_hour{model_deployment="tiny-llama"}'
    )
    wait_for(prometheus, "vllm:num_requests_running")
    for index in range(6):
        complete(runtime_vllm.base_url, runtime_vllm.served_model_name, f"Request {index}: hello")
        time.sleep(1)
    wait_for(prometheus, "modelship:cost_usd_per_1m_generated_tokens")
    time.sleep(5)  # a few more scrapes and rule evaluations
    return prometheus


def test_every_target_is_scraped(scraped: Prometheus) -> None:
    assert scraped.targets_up() == {"modelship-operator": "up", "vllm": "up", "runtime": "up"}


def test_every_dashboard_query_returns_data(scraped: Prometheus) -> None:
    empty = [
        f"{name}: {expr}" for name, expr in dashboard_queries().items() if not scraped.query(expr)
    ]
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_every_recording_rule_has_data(scraped: Prometheus) -> None:
    records, _ = rule_expressions()
    empty = [name for name in records if not scraped.query(name)]
    assert not empty, f"recording rules without data: {empty}"


def test_cost_per_million_tokens_is_the_plan_over_the_token_rate(scraped: Prometheus) -> None:
    cost = float(scraped.query("modelship:cost_usd_per_hour")[0]["value"][1])
    rate = float(scraped.query("modelship:vllm_generation_tokens:rate5m")[0]["value"][1])
    per_million = float(scraped.query("modelship:cost_usd_per_1m_generated_tokens")[0]["value"][1])
    assert cost > 0 and rate > 0
    # Rules are evaluated at different instants: allow the rate to move a little between them.
    assert per_million == pytest.approx(cost / (rate * 3600) * 1e6, rel=0.3)


def test_every_alert_expression_has_data_without_its_threshold(scraped: Prometheus) -> None:
    _, alerts = rule_expressions()
    empty = {name for name, expr in alerts.items() if not scraped.query(expr)}
    assert empty == set(NO_DATA_HERE), {name: alerts[name] for name in empty ^ set(NO_DATA_HERE)}
    # Their inputs exist all the same.
    assert scraped.query("modelship_operator_reconciles_total")
    assert scraped.query("modelship_operator_model_deployments")


def test_measured_kv_cache_is_fed_back_into_status(
    scraped: Prometheus, operator_with_model: Kube
) -> None:
    """The operator reads what vLLM allocated (the runtime's engine figure, through Prometheus)
    into status beside the prediction, and says how far apart they are."""
    (engine,) = scraped.query('modelship_runtime_kv_cache_tokens{source="engine"}')
    measured = int(float(engine["value"][1]))
    deadline = time.monotonic() + 60
    md: dict[str, Any] = {}
    while time.monotonic() < deadline:
        md = operator_with_model.get(MD, NAMESPACE, MODEL_DEPLOYMENT) or {}
        if ((md.get("status") or {}).get("kvCache") or {}).get("measuredTokens") == measured:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"measured KV cache never reached status: {md.get('status')}")
    kv_cache = md["status"]["kvCache"]
    (condition,) = [c for c in md["status"]["conditions"] if c["type"] == "KVCacheAsPredicted"]
    predicted = kv_cache["predictedTokens"]
    # The plan is for a GPU; vLLM here allocated what its CPU build was given.
    apart = abs(measured - predicted) / predicted > 0.10
    assert condition["status"] == ("False" if apart else "True"), condition
    assert str(measured) in condition["message"] and str(predicted) in condition["message"]
    if condition["reason"] == "BelowPlan":
        assert "extraOverheadGiB" in condition["message"]
    exported = (
        f'modelship_operator_measured_kv_cache_tokens{{model_deployment="{MODEL_DEPLOYMENT}"}}'
    )
    wait_for(scraped, exported)


def test_threshold_removal() -> None:
    assert without_threshold("a > 0.9") == "a"
    assert (
        without_threshold("a / b > 8\nand on (x)\nderiv(c[10m]) > 0")
        == "a / b\nand on (x)\nderiv(c[10m])"
    )
    assert without_threshold('a{s="e"} < ignoring (s) 0.8 * b') == 'a{s="e"} + ignoring (s) 0.8 * b'
    assert without_threshold('x{phase=~"A|B"} > 0') == 'x{phase=~"A|B"}'
