"""The operator's own Prometheus metrics, on their own registry (served on --metrics-port, 8080).

The dashboards and alerts use exactly these names:

    modelship_operator_reconciles_total{result}                 counter; result = success |
                                                                rejected (bad spec, no placement) |
                                                                retry (transient API error) | error
    modelship_operator_reconcile_duration_seconds               histogram of one reconcile
    modelship_operator_model_deployments{phase}                 gauge: ModelDeployments per phase
    modelship_operator_planned_accelerators{model_deployment,namespace,instance_type}
                                                                gauge: accelerators per replica
    modelship_operator_planned_cost_usd_per_hour{model_deployment,namespace,instance_type}
                                                                gauge: on-demand USD/h per replica
    modelship_operator_planned_kv_cache_tokens{model_deployment,namespace,instance_type}
                                                                gauge: predicted KV-cache tokens
    modelship_operator_measured_kv_cache_tokens{model_deployment,namespace,instance_type}
                                                                gauge: KV-cache tokens vLLM
                                                                allocated (kvfeedback.py)
    modelship_activator_pending_requests{namespace,model_deployment}
                                                                gauge: requests the activator
                                                                holds; KEDA wakes a ModelDeployment
                                                                from zero on it

Liveness and readiness are the operator's /healthz (`--health-port`), not this registry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .activator import pending_gauge
from .plan import Placement
from .status import PHASES

_PLAN_LABELS = ("model_deployment", "namespace", "instance_type")


@dataclass
class OperatorMetrics:
    """The operator's metrics and the per-object bookkeeping behind the gauges."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _phases: dict[str, str] = field(default_factory=dict)
    _plans: dict[tuple[str, str], str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.activator_pending = pending_gauge(self.registry)
        self.reconciles = Counter(
            "modelship_operator_reconciles_total",
            "Reconciles of ModelDeployments, by result.",
            ["result"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "modelship_operator_reconcile_duration_seconds",
            "Time one reconcile took (inspect, plan, render, apply, status).",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.deployments = Gauge(
            "modelship_operator_model_deployments",
            "ModelDeployments by phase.",
            ["phase"],
            registry=self.registry,
        )
        for phase in PHASES:
            self.deployments.labels(phase).set(0)
        self.accelerators = Gauge(
            "modelship_operator_planned_accelerators",
            "Accelerators per replica in the chosen plan.",
            _PLAN_LABELS,
            registry=self.registry,
        )
        self.cost = Gauge(
            "modelship_operator_planned_cost_usd_per_hour",
            "On-demand cost of one replica of the chosen plan, USD per hour.",
            _PLAN_LABELS,
            registry=self.registry,
        )
        self.kv_cache_tokens = Gauge(
            "modelship_operator_planned_kv_cache_tokens",
            "Predicted KV-cache capacity of one replica in tokens.",
            _PLAN_LABELS,
            registry=self.registry,
        )

        self.measured_kv_cache_tokens = Gauge(
            "modelship_operator_measured_kv_cache_tokens",
            "KV-cache tokens vLLM allocated (smallest replica), next to the planned figure.",
            _PLAN_LABELS,
            registry=self.registry,
        )

    @contextmanager
    def reconcile(self) -> Iterator[list[str]]:
        """Time a reconcile; the body sets outcome[0] to its result (default 'error')."""
        outcome = ["error"]
        started = time.perf_counter()
        try:
            yield outcome
        finally:
            self.duration.observe(time.perf_counter() - started)
            self.reconciles.labels(outcome[0]).inc()

    def set_phase(self, key: str, phase: str | None) -> None:
        """Record one ModelDeployment's phase (None: it is gone)."""
        with self._lock:
            if phase is None:
                self._phases.pop(key, None)
            else:
                self._phases[key] = phase
            counts = dict.fromkeys(PHASES, 0)
            for value in self._phases.values():
                counts[value] = counts.get(value, 0) + 1
            for name, count in counts.items():
                self.deployments.labels(name).set(count)

    def set_plan(self, namespace: str, name: str, placement: Placement | None) -> None:
        """Publish the chosen placement of one ModelDeployment (None: remove its series)."""
        with self._lock:
            old_instance = self._plans.pop((namespace, name), None)
            if old_instance is not None:
                gauges = (
                    self.accelerators,
                    self.cost,
                    self.kv_cache_tokens,
                    self.measured_kv_cache_tokens,
                )
                for gauge in gauges:
                    with suppress(KeyError):  # cost is absent when the catalog has no price
                        gauge.remove(name, namespace, old_instance)
            if placement is None:
                return
            labels = (name, namespace, placement.instance_type)
            self.accelerators.labels(*labels).set(placement.accelerator_count)
            if placement.cost_per_hour_usd is not None:
                self.cost.labels(*labels).set(placement.cost_per_hour_usd)
            self.kv_cache_tokens.labels(*labels).set(placement.kv_cache_tokens)
            self._plans[(namespace, name)] = placement.instance_type

    def set_measured_kv(self, namespace: str, name: str, tokens: int) -> None:
        """Publish the KV-cache tokens vLLM allocated for a planned ModelDeployment."""
        with self._lock:
            instance = self._plans.get((namespace, name))
            if instance is not None:
                self.measured_kv_cache_tokens.labels(name, namespace, instance).set(tokens)

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        """Serve /metrics on `port` in a background thread."""
        start_http_server(port, addr=address, registry=self.registry)


METRICS = OperatorMetrics()
