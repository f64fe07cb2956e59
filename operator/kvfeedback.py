"""Measured against predicted: the KV cache vLLM really allocated, fed back into status.

The runtime exports `modelship_runtime_kv_cache_tokens{source="engine"}` (what vLLM allocated:
num_gpu_blocks x block_size, read from vLLM at start-up) beside `{source="plan"}`, and the
PodMonitor copies each pod's `modelship.dev/model-deployment` label onto the series. The operator
asks Prometheus (MODELSHIP_PROMETHEUS_URL, the one KEDA's triggers use) for the smallest engine
figure of a ModelDeployment's replicas and compares it with the plan:

- within 10%: the condition KVCacheAsPredicted is True;
- otherwise it is False (BelowPlan / AbovePlan, with a Warning Event), and its message says how
  much memory per accelerator vLLM used beyond the model of it, in the unit the catalog takes
  (`extraOverheadGiB` of that accelerator in a catalog override), so later plans use it.

The condition is its own, not Degraded: the model serves either way; the plan was off.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Literal

from .catalog import GIB
from .plan import Placement

TOLERANCE = 0.10  # more than this apart is worth a condition and an Event
QUERY_TIMEOUT_SECONDS = 3.0


class PrometheusError(RuntimeError):
    """Prometheus did not answer, or answered with an error."""


def measured_kv_tokens(prometheus_url: str, namespace: str, name: str) -> int | None:
    """The smallest KV-cache capacity (tokens) vLLM allocated among the replicas, or None when
    no replica has reported one yet."""
    selector = f'source="engine",namespace="{namespace}",modelship_dev_model_deployment="{name}"'
    query = f"min(modelship_runtime_kv_cache_tokens{{{selector}}})"
    url = f"{prometheus_url.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(url, timeout=QUERY_TIMEOUT_SECONDS) as response:
            answer = json.loads(response.read())
    except (OSError, ValueError) as error:
        raise PrometheusError(f"{prometheus_url}: {error}") from error
    if answer.get("status") != "success":
        raise PrometheusError(f"{prometheus_url}: {answer.get('error', answer)}")
    result = answer.get("data", {}).get("result") or []
    if not result:
        return None
    return int(float(result[0]["value"][1]))


@dataclass(frozen=True)
class KVVerdict:
    """The KVCacheAsPredicted condition: status, reason and message."""

    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str


def verdict(placement: Placement, measured_tokens: int | None) -> KVVerdict:
    """Compare the plan's KV-cache tokens with what vLLM allocated."""
    predicted = placement.kv_cache_tokens
    if measured_tokens is None:
        return KVVerdict("Unknown", "NotMeasured", "no replica has reported its KV cache yet")
    ratio = measured_tokens / predicted if predicted else 0.0
    summary = (
        f"vLLM allocated {measured_tokens} KV-cache tokens, the plan predicted {predicted} "
        f"({(ratio - 1) * 100:+.0f}%)"
    )
    if abs(ratio - 1) <= TOLERANCE:
        return KVVerdict("True", "AsPredicted", summary)
    # Tokens the plan counted on but did not get, in bytes per accelerator: what vLLM spent
    # beyond the model of it (activations, runtime, graphs) on each worker.
    extra_gib = (predicted - measured_tokens) * placement.kv_cache_bytes_per_token / GIB
    accelerator = placement.accelerator_type
    if extra_gib > 0:
        return KVVerdict(
            "False",
            "BelowPlan",
            f"{summary}: vLLM used about {extra_gib:.2f} GiB per accelerator more than modelled "
            f"on {accelerator}; record extraOverheadGiB: {extra_gib:.2f} for it in a catalog "
            "override (docs/sizing.md) so later plans count it, and check the concurrency served",
        )
    return KVVerdict(
        "False",
        "AbovePlan",
        f"{summary}: the plan is conservative on {accelerator} by about {-extra_gib:.2f} GiB per "
        "accelerator; a smaller instance may serve the same load",
    )
