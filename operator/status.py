"""A ModelDeployment's status, computed as plain data from what the reconcile learned.

Pure: `build_status(inputs, previous_status, now)` returns the status dict to write and the
transitions that deserve a Kubernetes Event. Nothing here talks to the cluster.

Conditions follow the Kubernetes convention (type, status, reason, message, lastTransitionTime,
observedGeneration); lastTransitionTime is kept when a condition's status does not change.

    Validated      the spec parses and the model can be inspected (False: InvalidSpec, ModelUnreadable)
    Planned        a placement fits (False: NoPlacement, with what would fit)
    CapacityReady  nodes for the pool exist (False: NodeProvisioning, NodeGroupCreating)
    Available      at least one replica serves requests
    Degraded       something is wrong: a rejected edit, crashing pods, fewer ready replicas than
                   wanted, pods that cannot be created (PodCreationFailed: a missing ServiceAccount,
                   a PodSecurity rejection), children that cannot be applied (ApplyFailed), or a
                   model store that does not answer (ModelUnreachable); the last two are retried
    Compiled       Neuron placements that compile on a larger instance (compilejob.py) only:
                   False while the compile Job runs (Compiling) or when it failed (CompileFailed,
                   with the Job's reason and message), True once the artifacts are published

The phase comes from the pods, because the runtime has no permission to write to the API:

    Pending           nothing applied yet, or no pod exists yet
    NodeProvisioning  a pod is unschedulable and the pool's node is being made: a NodeClaim of
                      the pool is not Ready, the EKS node group is CREATING/UPDATING, or the
                      scheduler's message names the accelerator resource (Karpenter acts on it)
    Scheduling        a pod is unschedulable for another reason, or is bound to a node but its
                      containers are not started yet (image pull, volume attach)
    WeightsLoading    the runtime container (or a fetch init container) is running but not ready:
                      it is fetching, verifying and loading weights
    Compiling         Neuron only: running but not ready for longer than the weights take to
                      fetch (estimate_fetch_seconds), so neuronx is compiling the graphs; or the
                      compile Job on a larger instance runs and the serving workload waits for it
    Ready             every wanted replica is ready
    Degraded          some replicas are ready but others crash, or a bad edit was rejected while
                      the last good workload keeps serving
    Failed            nothing serves and the spec/plan is rejected, or pods crash repeatedly
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .api import PlanSummary
from .apply import Observation
from .compilejob import CompileProgress
from .plan import Placement

ConditionStatus = Literal["True", "False", "Unknown"]
CONDITION_TYPES = (
    "Validated",
    "Planned",
    "CapacityReady",
    "Available",
    "Degraded",
    "KVCacheAsPredicted",
    "Compiled",
)
PHASES = (
    "Pending",
    "NodeProvisioning",
    "Scheduling",
    "WeightsLoading",
    "Compiling",
    "Ready",
    "Degraded",
    "Failed",
)
# Restarts after which a crashing runtime counts as failing rather than still starting.
CRASH_RESTARTS = 3
# Waiting reasons that will not fix themselves without a change.
STUCK_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)
# Sustained S3 ranged-GET rate one runtime pod reaches (shared/reference/s3-on-loopback.md's
# rates are higher on loopback; in-region S3 to one node is commonly 0.5-1 GB/s).
FETCH_BYTES_PER_SECOND = 500 * 10**6
# Time to load fetched weights into device memory, on top of the fetch.
LOAD_SECONDS = 60
RUNTIME_CONTAINER = "runtime"


@dataclass(frozen=True)
class Failure:
    """Why the current spec could not be acted on."""

    reason: Literal[
        "InvalidSpec",
        "ModelUnreadable",
        "ModelUnreachable",
        "NoPlacement",
        "RenderFailed",
        "ApplyFailed",
    ]
    message: str

    @property
    def transient(self) -> bool:
        """Retried with backoff (the store or the API server failed), not a verdict on the spec."""
        return self.reason in ("ModelUnreachable", "ApplyFailed")


@dataclass(frozen=True)
class ReconcileFacts:
    """Everything the status is computed from."""

    generation: int
    failure: Failure | None = None
    placement: Placement | None = None  # the placement the running workload was made from
    pool_name: str | None = None
    observation: Observation | None = None
    endpoint: str | None = None
    desired_replicas: int | None = None
    selector: str | None = None
    measured_kv_cache_tokens: int | None = None  # what vLLM allocated (kvfeedback.py)
    # Neuron: the compile Job's progress when the serving node cannot compile (compilejob.py).
    compile: CompileProgress | None = None


@dataclass(frozen=True)
class Transition:
    """A change worth a Kubernetes Event."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class StatusUpdate:
    status: dict[str, Any]
    events: list[Transition] = field(default_factory=list)


def rfc3339(moment: datetime.datetime) -> str:
    """Kubernetes' timestamp format (UTC, seconds)."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime.datetime | None:
    """An RFC 3339 timestamp from the API, or None."""
    if not value:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def estimate_fetch_seconds(weight_bytes: int) -> float:
    """How long one pod takes to fetch and load its weights (drives WeightsLoading vs Compiling)."""
    return weight_bytes / FETCH_BYTES_PER_SECOND + LOAD_SECONDS


def plan_summary(placement: Placement, pool_name: str | None) -> PlanSummary:
    """The status.plan block of a placement."""
    cost = placement.cost_per_hour_usd
    return PlanSummary(
        instance_type=placement.instance_type,
        accelerator_type=placement.accelerator_type,
        accelerator_count=placement.accelerator_count,
        tensor_parallel_size=placement.tensor_parallel_size,
        pipeline_parallel_size=placement.pipeline_parallel_size,
        nodes=placement.nodes,
        kv_cache_tokens=placement.kv_cache_tokens,
        max_concurrent_sequences=placement.max_concurrent_sequences,
        cost_per_hour_usd=None if cost is None else f"{cost:.4f}",
        node_pool=pool_name,
    )


def describe_placement(placement: Placement) -> str:
    """'g6e.xlarge: 1x NVIDIA L40S, TP 1, 123456 KV tokens, $1.8610/h' for condition messages."""
    cost = "" if placement.cost_per_hour_usd is None else f", ${placement.cost_per_hour_usd:.4f}/h"
    nodes = f" x {placement.nodes} nodes" if placement.nodes > 1 else ""
    return (
        f"{placement.instance_type}{nodes}: {placement.accelerator_count}x "
        f"{placement.accelerator_type}, TP {placement.tensor_parallel_size}, "
        f"PP {placement.pipeline_parallel_size}, {placement.kv_cache_tokens} KV-cache tokens{cost}"
    )


# ---- pods ------------------------------------------------------------------------------------


def _conditions_of(obj: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {str(c.get("type")): c for c in (obj.get("status") or {}).get("conditions") or [] if c}


def _is_ready(pod: Mapping[str, Any]) -> bool:
    return _conditions_of(pod).get("Ready", {}).get("status") == "True"


def _container_statuses(pod: Mapping[str, Any], init: bool = False) -> list[Mapping[str, Any]]:
    key = "initContainerStatuses" if init else "containerStatuses"
    return list((pod.get("status") or {}).get(key) or [])


def _stuck_reason(pod: Mapping[str, Any]) -> str | None:
    """Why a pod will not start without a change (crash loop, bad image), or None."""
    for status in _container_statuses(pod, init=True) + _container_statuses(pod):
        waiting = (status.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_REASONS:
            return f"container {status.get('name')}: {waiting['reason']} {waiting.get('message', '')}".strip()
        if int(status.get("restartCount") or 0) >= CRASH_RESTARTS:
            last = (status.get("lastState") or {}).get("terminated") or {}
            detail = f" (last exit {last.get('exitCode')}: {last.get('reason')})" if last else ""
            return (
                f"container {status.get('name')} restarted {status['restartCount']} times{detail}"
            )
    if (pod.get("status") or {}).get("phase") == "Failed":
        return f"pod failed: {(pod.get('status') or {}).get('message', 'no message')}"
    return None


def _claims_ready(node_claims: Iterable[Mapping[str, Any]]) -> tuple[int, int]:
    claims = list(node_claims)
    ready = sum(
        1 for claim in claims if _conditions_of(claim).get("Ready", {}).get("status") == "True"
    )
    return ready, len(claims)


def pod_phase(
    pod: Mapping[str, Any],
    *,
    node_claims: Iterable[Mapping[str, Any]],
    node_group_status: str | None,
    resource_name: str | None,
    fetch_seconds: float,
    neuron: bool,
    now: datetime.datetime,
) -> tuple[str, str]:
    """(phase, message) of one runtime pod that is not ready."""
    name = (pod.get("metadata") or {}).get("name", "pod")
    stuck = _stuck_reason(pod)
    if stuck:
        return "Failed", f"{name}: {stuck}"
    scheduled = _conditions_of(pod).get("PodScheduled", {})
    if scheduled.get("status") == "False":
        message = str(scheduled.get("message") or "")
        ready_claims, claims = _claims_ready(node_claims)
        if claims > ready_claims:
            return "NodeProvisioning", f"{name}: waiting for a node ({ready_claims}/{claims} ready)"
        if node_group_status in ("CREATING", "UPDATING"):
            return "NodeProvisioning", f"{name}: the EKS node group is {node_group_status}"
        if resource_name and resource_name in message:
            return "NodeProvisioning", f"{name}: no node with {resource_name} yet; {message}"
        return "Scheduling", f"{name}: unschedulable: {message or 'no reason given'}"
    for status in _container_statuses(pod, init=True):
        if (status.get("state") or {}).get("running"):
            return "WeightsLoading", f"{name}: init container {status.get('name')} is fetching"
    runtime = next(
        (s for s in _container_statuses(pod) if s.get("name") == RUNTIME_CONTAINER),
        next(iter(_container_statuses(pod)), None),
    )
    running = ((runtime or {}).get("state") or {}).get("running")
    node = (pod.get("spec") or {}).get("nodeName")
    if not node:
        return "Scheduling", f"{name}: waiting for the scheduler to place it"
    if running is None:
        return "Scheduling", f"{name}: on node {node}, containers starting"
    started = parse_time(running.get("startedAt"))
    elapsed = (now - started).total_seconds() if started else 0.0
    if neuron and elapsed > fetch_seconds:
        return "Compiling", f"{name}: compiling for Neuron ({elapsed:.0f}s since start)"
    return "WeightsLoading", f"{name}: fetching and loading weights ({elapsed:.0f}s since start)"


_PHASE_PROGRESS = {phase: index for index, phase in enumerate(PHASES)}
POD_CREATION_FAILED = "pods cannot be created: "


def pod_creation_failure(workload: Mapping[str, Any] | None) -> str | None:
    """Why the workload's controller cannot create pods (a missing ServiceAccount, a PodSecurity
    or quota rejection), from its ReplicaFailure condition, which the Deployment controller
    copies from the ReplicaSet's; None when it creates them."""
    condition = _conditions_of(workload or {}).get("ReplicaFailure") or {}
    if condition.get("status") != "True":
        return None
    return POD_CREATION_FAILED + str(condition.get("message") or condition.get("reason"))


def workload_phase(facts: ReconcileFacts, now: datetime.datetime) -> tuple[str, str, int, int]:
    """(phase, message, desired replicas, ready replicas) from the observation."""
    observation = facts.observation
    if observation is None or observation.workload is None:
        return "Pending", "the workload is not created yet", facts.desired_replicas or 0, 0
    spec = observation.workload.get("spec") or {}
    state = observation.workload.get("status") or {}
    desired = int(spec.get("replicas", facts.desired_replicas or 1))
    ready = int(state.get("readyReplicas") or 0)
    pods = [p for p in observation.pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    if desired == 0:
        return "Ready", "scaled to zero; the autoscaler starts a replica on demand", 0, 0
    cannot_create = pod_creation_failure(observation.workload)
    if cannot_create and len(pods) < desired:
        if ready > 0:
            return "Degraded", f"{ready}/{desired} replicas ready; {cannot_create}", desired, ready
        if not pods:
            return "Failed", cannot_create, desired, ready
    stuck = [reason for pod in pods if (reason := _stuck_reason(pod))]
    if ready >= desired:
        return "Ready", f"{ready}/{desired} replicas ready", desired, ready
    if ready > 0:
        if stuck:
            return "Degraded", f"{ready}/{desired} replicas ready; {stuck[0]}", desired, ready
        return "Ready", f"{ready}/{desired} replicas ready, more starting", desired, ready
    if not pods:
        return "Pending", "waiting for the first pod", desired, ready
    placement = facts.placement
    phases = [
        pod_phase(
            pod,
            node_claims=observation.node_claims,
            node_group_status=observation.node_group_status,
            resource_name=placement.resource_name if placement else None,
            fetch_seconds=estimate_fetch_seconds(placement.weight_bytes) if placement else 0.0,
            neuron=bool(placement and placement.accelerator_vendor != "nvidia"),
            now=now,
        )
        for pod in pods
        if not _is_ready(pod)
    ]
    if not phases:
        return "Pending", "pods are ready but the workload has not counted them yet", desired, ready
    failed = [p for p in phases if p[0] == "Failed"]
    if failed and len(failed) == len(phases):
        return failed[0][0], failed[0][1], desired, ready
    # Report the pod that got furthest: that is what the user waits for next.
    phase, message = max(
        (p for p in phases if p[0] != "Failed"), key=lambda p: _PHASE_PROGRESS[p[0]]
    )
    return phase, message, desired, ready


# ---- conditions ------------------------------------------------------------------------------


def _condition(
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    generation: int,
    previous: Mapping[str, Mapping[str, Any]],
    now: str,
) -> dict[str, Any]:
    old = previous.get(type_)
    unchanged = old is not None and old.get("status") == status
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": str(old.get("lastTransitionTime")) if unchanged and old else now,
        "observedGeneration": generation,
    }


def build_status(
    facts: ReconcileFacts,
    previous: Mapping[str, Any] | None,
    now: datetime.datetime,
) -> StatusUpdate:
    """The status to write, and the transitions (vs `previous`) that deserve an Event."""
    previous = previous or {}
    old_conditions = {str(c.get("type")): c for c in previous.get("conditions") or [] if c}
    stamp = rfc3339(now)
    failure = facts.failure
    gen = facts.generation

    def cond(type_: str, status: ConditionStatus, reason: str, message: str) -> dict[str, Any]:
        return _condition(type_, status, reason, message, gen, old_conditions, stamp)

    if failure and failure.reason == "ModelUnreachable":
        validated = cond("Validated", "Unknown", failure.reason, failure.message)
        planned = cond("Planned", "Unknown", "NotValidated", "the model is read again shortly")
    elif failure and failure.reason in ("InvalidSpec", "ModelUnreadable"):
        validated = cond("Validated", "False", failure.reason, failure.message)
        planned = cond("Planned", "Unknown", "NotValidated", "fix the spec to plan again")
    else:
        validated = cond(
            "Validated", "True", "SpecValid", "the spec is valid and the model was read"
        )
        if failure and failure.reason in ("NoPlacement", "RenderFailed"):
            planned = cond("Planned", "False", failure.reason, failure.message)
        elif facts.placement is not None:
            planned = cond(
                "Planned", "True", "PlacementChosen", describe_placement(facts.placement)
            )
        else:
            planned = cond("Planned", "Unknown", "NotPlanned", "not planned yet")

    phase, message, desired, ready = workload_phase(facts, now)
    running = facts.observation is not None and facts.observation.workload is not None
    compiling = facts.compile is not None and facts.compile.state != "Compiled"
    if compiling and ready == 0 and facts.compile is not None:
        # The serving workload waits for the compile Job (an earlier one may still serve).
        phase = "Compiling" if facts.compile.state == "Compiling" else "Failed"
        message = facts.compile.message

    observation = facts.observation
    if observation is None or not running:
        capacity = cond("CapacityReady", "Unknown", "NoWorkload", "no workload yet")
    elif observation.node_group_status in ("CREATING", "UPDATING"):
        capacity = cond(
            "CapacityReady",
            "False",
            "NodeGroupCreating",
            f"the EKS node group is {observation.node_group_status}",
        )
    elif phase == "NodeProvisioning":
        capacity = cond("CapacityReady", "False", "NodeProvisioning", message)
    elif (
        any(
            _conditions_of(p).get("PodScheduled", {}).get("status") == "True"
            for p in observation.pods
        )
        or observation.node_group_status == "ACTIVE"
    ):
        capacity = cond("CapacityReady", "True", "NodesReady", "runtime pods have nodes")
    else:
        capacity = cond("CapacityReady", "Unknown", "Waiting", message)

    if ready > 0:
        available = cond("Available", "True", "ReplicasReady", f"{ready}/{desired} replicas ready")
    else:
        available = cond("Available", "False", phase, message)

    if failure and running:
        kept = "SpecRejected" if not failure.transient else failure.reason
        degraded = cond(
            "Degraded",
            "True",
            kept,
            f"the last good workload keeps serving; {failure.reason}: {failure.message}",
        )
        phase, message = "Degraded", f"{failure.reason}: {failure.message}"
    elif failure:
        degraded = cond("Degraded", "True", failure.reason, failure.message)
        phase = "Pending" if failure.transient else "Failed"
        message = f"{failure.reason}: {failure.message}"
        if failure.transient:
            message += " (retrying)"
    elif facts.compile is not None and facts.compile.state == "Failed":
        degraded = cond("Degraded", "True", facts.compile.reason, facts.compile.message)
    elif message.startswith(POD_CREATION_FAILED):
        degraded = cond("Degraded", "True", "PodCreationFailed", message)
    elif phase in ("Degraded", "Failed"):
        degraded = cond("Degraded", "True", "ReplicasFailing", message)
    else:
        degraded = cond("Degraded", "False", "AsExpected", "")

    conditions = [validated, planned, capacity, available, degraded]
    if facts.compile is not None:
        compiled: ConditionStatus = "True" if facts.compile.state == "Compiled" else "False"
        conditions.append(cond("Compiled", compiled, facts.compile.reason, facts.compile.message))
    kv_cache: dict[str, Any] | None = None
    if facts.placement is not None:
        from .kvfeedback import verdict

        kv = verdict(facts.placement, facts.measured_kv_cache_tokens)
        conditions.append(cond("KVCacheAsPredicted", kv.status, kv.reason, kv.message))
        kv_cache = {"predictedTokens": facts.placement.kv_cache_tokens}
        if facts.measured_kv_cache_tokens is not None:
            kv_cache["measuredTokens"] = facts.measured_kv_cache_tokens
    status: dict[str, Any] = {
        "observedGeneration": gen,
        "phase": phase,
        "conditions": conditions,
        "plan": (
            plan_summary(facts.placement, facts.pool_name).to_k8s()
            if facts.placement is not None
            else previous.get("plan")
        ),
        "replicas": desired,
        "readyReplicas": ready,
        "endpoint": facts.endpoint or previous.get("endpoint"),
        "kvCache": kv_cache or previous.get("kvCache"),
        "message": message,
    }
    if facts.selector:
        status["selector"] = facts.selector
    return StatusUpdate(status=status, events=transitions(previous, status))


# Condition states that are bad news (a Warning Event); the rest is progress (Normal).
_WARNING_WHEN = {
    "Validated": "False",
    "Planned": "False",
    "Degraded": "True",
    "KVCacheAsPredicted": "False",
}


# Normal transitions of these conditions restate the phase (Available=False "Scheduling" next to
# phase Scheduling, CapacityReady=True next to Ready): with a phase change in the same write, the
# phase's Event says it. Each Event is a write to the API server; at 1000 new ModelDeployments the
# duplicates were a fifth of the operator's requests.
_SAID_BY_PHASE = frozenset({"Available", "CapacityReady"})


def transitions(previous: Mapping[str, Any], status: Mapping[str, Any]) -> list[Transition]:
    """What a reader of `kubectl describe` learns from this write, one Event per transition:
    a phase change, a Warning condition, and a Normal condition that says more than the phase
    (a chosen placement). The normal state from the start (validated, not degraded) is no news."""
    old = {str(c.get("type")): c for c in previous.get("conditions") or [] if c}
    phase_changed = previous.get("phase") != status.get("phase")
    events = []
    for condition in status.get("conditions") or []:
        before = old.get(condition["type"])
        if before and (before.get("status"), before.get("reason")) == (
            condition["status"],
            condition["reason"],
        ):
            continue
        if condition["status"] == "Unknown" or (
            before is None
            and (condition["type"], condition["status"])
            in (("Degraded", "False"), ("Validated", "True"))
        ):
            continue  # nothing learned yet / the normal state from the start: not news
        warning = condition["status"] == _WARNING_WHEN.get(condition["type"]) or (
            condition["type"] == "Available"
            and condition["status"] == "False"
            and (before or {}).get("status") == "True"
        )
        if not warning and phase_changed and condition["type"] in _SAID_BY_PHASE:
            continue
        events.append(
            Transition(
                type="Warning" if warning else "Normal",
                reason=str(condition["reason"]),
                message=f"{condition['type']}={condition['status']}: {condition['message']}".rstrip(
                    ": "
                ),
            )
        )
    if phase_changed and (previous.get("phase"), status.get("phase")) != (None, "Pending"):
        # A new ModelDeployment is Pending first, always: no news (its placement Event says
        # what was decided); every later phase is.
        phase = str(status.get("phase"))
        events.append(
            Transition(
                type="Warning" if phase in ("Failed", "Degraded") else "Normal",
                reason=f"Phase{phase}",
                message=f"phase {previous.get('phase') or 'None'} -> {phase}: {status.get('message')}",
            )
        )
    return events
