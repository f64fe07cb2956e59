"""Write the Grafana dashboards (fleet, model serving, cold start) as JSON beside this file.

    .venv/bin/python helm/modelship/dashboards/generate.py

The chart ships the JSON (ConfigMaps for Grafana's sidecar); this script is their source, so a
panel is one line here. Every query uses only series the operator, the runtime or vLLM export,
or the recording rules in ../rules/modelship.rules.yaml; tests/integration/test_observability.py
evaluates each one against a real Prometheus scraping a real vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Raw vLLM / runtime series: the PodMonitor's copy of the pod label modelship.dev/model-deployment.
RAW = 'namespace=~"$namespace", modelship_dev_model_deployment=~"$model_deployment"'
# Operator series and recording rules: the operator's own label names.
OWN = 'namespace=~"$namespace", model_deployment=~"$model_deployment"'


def panel(
    title: str,
    targets: list[tuple[str, str]],
    unit: str = "short",
    kind: str = "timeseries",
    width: int = 12,
    description: str = "",
) -> dict[str, Any]:
    """One panel; targets are (PromQL, legend)."""
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"w": width, "h": 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}}
        if kind == "timeseries"
        else {"reduceOptions": {"calcs": ["lastNotNull"]}},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "expr": expr,
                "legendFormat": legend,
                "datasource": DATASOURCE,
            }
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def variables(with_model: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}
    ]
    if with_model:
        for name, query in (
            ("namespace", "label_values(modelship_operator_planned_accelerators, namespace)"),
            (
                "model_deployment",
                'label_values(modelship_operator_planned_accelerators{namespace=~"$namespace"}, '
                "model_deployment)",
            ),
        ):
            out.append(
                {
                    "name": name,
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {"query": query, "refId": name},
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "refresh": 2,
                }
            )
    return out


def dashboard(
    uid: str, title: str, panels: list[dict[str, Any]], with_model: bool
) -> dict[str, Any]:
    x = y = 0
    for index, item in enumerate(panels):
        item["id"] = index + 1
        width = item["gridPos"]["w"]
        if x + width > 24:
            x, y = 0, y + 8
        item["gridPos"].update({"x": x, "y": y})
        x += width
    return {
        "uid": uid,
        "title": title,
        "tags": ["modelship"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": variables(with_model)},
        "panels": panels,
    }


def fleet() -> dict[str, Any]:
    planned = "max by (namespace, model_deployment, instance_type) (modelship_operator_planned_accelerators)"
    return dashboard(
        "modelship-fleet",
        "modelship / fleet",
        [
            panel(
                "ModelDeployments by phase",
                [("max by (phase) (modelship_operator_model_deployments)", "{{phase}}")],
                kind="bargauge",
                width=8,
            ),
            panel(
                "Fleet cost (USD/h, on-demand)",
                [("modelship:fleet_cost_usd_per_hour", "USD/h")],
                "currencyUSD",
                "stat",
                4,
            ),
            panel(
                "Fleet USD per 1M generated tokens",
                [("modelship:fleet_cost_usd_per_1m_generated_tokens", "USD/1M")],
                "currencyUSD",
                "stat",
                4,
            ),
            panel(
                "Accelerators in use",
                [
                    (
                        f"sum({planned} * on (namespace, model_deployment) group_left modelship:serving_replicas:count)",
                        "accelerators",
                    )
                ],
                kind="stat",
                width=4,
            ),
            panel(
                "Generated tokens/s (fleet)",
                [("sum(modelship:vllm_generation_tokens:rate5m)", "tokens/s")],
                kind="stat",
                width=4,
            ),
            panel(
                "Serving replicas per model",
                [("modelship:serving_replicas:count", "{{namespace}}/{{model_deployment}}")],
            ),
            panel(
                "Cost per model (USD/h)",
                [("modelship:cost_usd_per_hour", "{{namespace}}/{{model_deployment}}")],
                "currencyUSD",
            ),
            panel(
                "USD per 1M generated tokens, per model",
                [
                    (
                        "modelship:cost_usd_per_1m_generated_tokens",
                        "{{namespace}}/{{model_deployment}}",
                    )
                ],
                "currencyUSD",
                description="Planned on-demand cost of the serving replicas over vLLM's generated-token rate (5m).",
            ),
            panel(
                "Generated tokens/s per model",
                [("modelship:vllm_generation_tokens:rate5m", "{{namespace}}/{{model_deployment}}")],
            ),
            panel(
                "Planned accelerators per replica",
                [(planned, "{{namespace}}/{{model_deployment}} {{instance_type}}")],
                kind="table",
            ),
            panel(
                "Planned cost per replica (USD/h)",
                [
                    (
                        "modelship:planned_cost_usd_per_hour:replica",
                        "{{namespace}}/{{model_deployment}}",
                    )
                ],
                "currencyUSD",
                "table",
            ),
            panel(
                "Reconciles/s by result",
                [("sum by (result) (rate(modelship_operator_reconciles_total[5m]))", "{{result}}")],
                "ops",
            ),
            panel(
                "Reconcile duration p50 / p95",
                [
                    (
                        "histogram_quantile(0.5, sum by (le) (rate(modelship_operator_reconcile_duration_seconds_bucket[5m])))",
                        "p50",
                    ),
                    (
                        "histogram_quantile(0.95, sum by (le) (rate(modelship_operator_reconcile_duration_seconds_bucket[5m])))",
                        "p95",
                    ),
                ],
                "s",
            ),
        ],
        with_model=False,
    )


def serving() -> dict[str, Any]:
    def quantiles(metric: str) -> list[tuple[str, str]]:
        return [
            (
                f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{RAW}}}[5m])))",
                f"p{round(q * 100)}",
            )
            for q in (0.5, 0.95, 0.99)
        ]

    return dashboard(
        "modelship-serving",
        "modelship / model serving",
        [
            panel(
                "Requests/s by finish reason",
                [
                    (
                        f"sum by (finished_reason) (rate(vllm:request_success_total{{{RAW}}}[5m]))",
                        "{{finished_reason}}",
                    )
                ],
                "reqps",
            ),
            panel(
                "Tokens/s",
                [
                    (f"sum(rate(vllm:generation_tokens_total{{{RAW}}}[5m]))", "generated"),
                    (f"sum(rate(vllm:prompt_tokens_total{{{RAW}}}[5m]))", "prompt"),
                ],
            ),
            panel(
                "Time to first token", quantiles("vllm:time_to_first_token_seconds"), "s", width=8
            ),
            panel(
                "Inter-token latency", quantiles("vllm:inter_token_latency_seconds"), "s", width=8
            ),
            panel(
                "End-to-end request latency",
                quantiles("vllm:e2e_request_latency_seconds"),
                "s",
                width=8,
            ),
            panel(
                "Requests running / waiting",
                [
                    (f"sum(vllm:num_requests_running{{{RAW}}})", "running"),
                    (f"sum(vllm:num_requests_waiting{{{RAW}}})", "waiting"),
                ],
            ),
            panel(
                "KV-cache usage per replica",
                [(f"max by (pod) (vllm:kv_cache_usage_perc{{{RAW}}})", "{{pod}}")],
                "percentunit",
            ),
            panel(
                "KV-cache capacity: engine vs plan (tokens)",
                [
                    (
                        f"max by (source) (modelship_runtime_kv_cache_tokens{{{RAW}}})",
                        "runtime {{source}}",
                    ),
                    (f"max(modelship_operator_planned_kv_cache_tokens{{{OWN}}})", "operator plan"),
                    (
                        f"max(modelship_operator_measured_kv_cache_tokens{{{OWN}}})",
                        "operator measured",
                    ),
                ],
                description="What vLLM allocated (engine) next to the plan's prediction; the "
                "operator reads the engine figure back into status (condition KVCacheAsPredicted).",
            ),
            panel(
                "Preemptions/s",
                [(f"sum(rate(vllm:num_preemptions_total{{{RAW}}}[5m]))", "preemptions")],
                "ops",
            ),
            panel(
                "Prefix-cache hit rate",
                [
                    (
                        f"sum(rate(vllm:prefix_cache_hits_total{{{RAW}}}[5m])) / sum(rate(vllm:prefix_cache_queries_total{{{RAW}}}[5m]))",
                        "hit rate",
                    )
                ],
                "percentunit",
            ),
            panel(
                "USD per 1M generated tokens",
                [(f"modelship:cost_usd_per_1m_generated_tokens{{{OWN}}}", "{{model_deployment}}")],
                "currencyUSD",
            ),
            panel(
                "Serving replicas",
                [(f"modelship:serving_replicas:count{{{OWN}}}", "{{model_deployment}}")],
            ),
        ],
        with_model=True,
    )


def cold_start() -> dict[str, Any]:
    return dashboard(
        "modelship-cold-start",
        "modelship / cold start",
        [
            panel(
                "Runtime phase per pod",
                [
                    (
                        f"max by (pod, phase) (modelship_runtime_phase{{{RAW}}}) == 1",
                        "{{pod}} {{phase}}",
                    )
                ],
                kind="table",
            ),
            panel(
                "Time to ready per pod",
                [(f"max by (pod) (modelship_runtime_time_to_ready_seconds{{{RAW}}})", "{{pod}}")],
                "s",
                "bargauge",
            ),
            panel(
                "Fetch rate",
                [
                    (
                        f"sum by (pod) (modelship_runtime_fetch_rate_bytes_per_second{{{RAW}}})",
                        "{{pod}}",
                    )
                ],
                "Bps",
            ),
            panel(
                "Bytes fetched / needed",
                [
                    (
                        f"sum by (pod) (modelship_runtime_fetch_bytes_total{{{RAW}}})",
                        "{{pod}} fetched",
                    ),
                    (
                        f"sum by (pod) (modelship_runtime_fetch_expected_bytes{{{RAW}}})",
                        "{{pod}} needed",
                    ),
                ],
                "bytes",
            ),
            panel(
                "Last fetch duration",
                [(f"max by (pod) (modelship_runtime_fetch_seconds{{{RAW}}})", "{{pod}}")],
                "s",
                "bargauge",
            ),
            panel(
                "Fetch retries, verification failures, cache hits (1h)",
                [
                    (
                        f"sum(increase(modelship_runtime_fetch_retries_total{{{RAW}}}[1h]))",
                        "retries",
                    ),
                    (
                        f"sum(increase(modelship_runtime_fetch_verification_failures_total{{{RAW}}}[1h]))",
                        "verification failures",
                    ),
                    (
                        f"sum(increase(modelship_runtime_fetch_cache_hits_total{{{RAW}}}[1h]))",
                        "cache hits",
                    ),
                ],
            ),
            panel(
                "ModelDeployments waiting for nodes or weights",
                [
                    (
                        'max by (phase) (modelship_operator_model_deployments{phase=~"NodeProvisioning|Scheduling|WeightsLoading|Compiling"})',
                        "{{phase}}",
                    )
                ],
            ),
        ],
        with_model=True,
    )


def main() -> None:
    for name, build in (("fleet", fleet), ("serving", serving), ("cold-start", cold_start)):
        path = HERE / f"{name}.json"
        path.write_text(json.dumps(build(), indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
