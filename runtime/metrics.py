"""Prometheus metrics of the runtime pod, in their own registry.

The dashboards and alerts use exactly these names; do not rename them.

    modelship_runtime_fetch_bytes_total                    counter  bytes transferred by the fetch
    modelship_runtime_fetch_expected_bytes                 gauge    bytes the current fetch needs
    modelship_runtime_fetch_seconds                        gauge    duration of the last fetch
    modelship_runtime_fetch_rate_bytes_per_second          gauge    current fetch rate
    modelship_runtime_fetch_cache_hits_total               counter  files already complete locally
    modelship_runtime_fetch_retries_total                  counter  retried requests
    modelship_runtime_fetch_verification_failures_total    counter  checksum or size mismatches
    modelship_runtime_fetch_files_skipped_total{reason}    counter  files left out, by reason
    modelship_runtime_phase{phase}                         gauge    1 for the current phase:
                                                                    fetching, verifying,
                                                                    starting, ready
    modelship_runtime_time_to_ready_seconds                gauge    pod start to engine ready

vLLM's own /metrics (prefix `vllm:`) is served by the engine, not here.
"""

from __future__ import annotations

from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

Phase = Literal["fetching", "verifying", "starting", "ready"]
PHASES: tuple[Phase, ...] = ("fetching", "verifying", "starting", "ready")


class RuntimeMetrics:
    """The runtime's metrics, registered in `registry` (a fresh one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        prefix = "modelship_runtime_"
        self.fetch_bytes = Counter(
            f"{prefix}fetch_bytes",
            "Bytes transferred by the weight fetch (not counting cache hits).",
            registry=self.registry,
        )
        self.fetch_expected_bytes = Gauge(
            f"{prefix}fetch_expected_bytes",
            "Bytes the current fetch needs in total, cache hits included.",
            registry=self.registry,
        )
        self.fetch_seconds = Gauge(
            f"{prefix}fetch_seconds",
            "Duration of the last completed fetch.",
            registry=self.registry,
        )
        self.fetch_rate_bytes_per_second = Gauge(
            f"{prefix}fetch_rate_bytes_per_second",
            "Current fetch rate (over the last progress interval).",
            registry=self.registry,
        )
        self.fetch_cache_hits = Counter(
            f"{prefix}fetch_cache_hits",
            "Files already complete in the local directory and not fetched again.",
            registry=self.registry,
        )
        self.fetch_retries = Counter(
            f"{prefix}fetch_retries",
            "Requests retried after a transient error (throttling, 5xx, reset, timeout).",
            registry=self.registry,
        )
        self.fetch_verification_failures = Counter(
            f"{prefix}fetch_verification_failures",
            "Fetched files whose size or checksum did not match the store's.",
            registry=self.registry,
        )
        self.fetch_files_skipped = Counter(
            f"{prefix}fetch_files_skipped",
            "Files of the model source left out, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.phase = Gauge(
            f"{prefix}phase",
            "1 for the runtime's current phase, 0 for the others.",
            ["phase"],
            registry=self.registry,
        )
        self.time_to_ready_seconds = Gauge(
            f"{prefix}time_to_ready_seconds",
            "Seconds from runtime start to the engine answering its health check.",
            registry=self.registry,
        )
        for phase in PHASES:
            self.phase.labels(phase=phase).set(0)

    def set_phase(self, phase: Phase) -> None:
        """Mark `phase` as the current one (1) and every other phase 0."""
        for other in PHASES:
            self.phase.labels(phase=other).set(1 if other == phase else 0)


def start_metrics_server(port: int, registry: CollectorRegistry, addr: str = "0.0.0.0") -> None:
    """Serve `registry` on http://addr:port/metrics from a daemon thread."""
    start_http_server(port, addr=addr, registry=registry)
