"""status.py: conditions, phase and transitions computed from plain observations."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from modelship.operator.api import load_spec
from modelship.operator.apply import Observation
from modelship.operator.catalog import load_catalog
from modelship.operator.modelinfo import inspect_model
from modelship.operator.plan import Placement
from modelship.operator.sizing import make_plan
from modelship.operator.status import Failure, ReconcileFacts, build_status, estimate_fetch_seconds
from modelship.runtime.tinymodel import build_tiny_model

NOW = datetime.datetime(2025, 6, 1, 12, 0, 0, tzinfo=datetime.UTC)


@pytest.fixture(scope="module")
def placement(tmp_path_factory: pytest.TempPathFactory) -> Placement:
    directory = build_tiny_model(tmp_path_factory.mktemp("m") / "tiny")
    spec = load_spec({"model": {"uri": f"file://{directory}"}})
    plan = make_plan(inspect_model(spec.model.source), spec, load_catalog())
    assert plan.chosen is not None
    return plan.chosen


def neuron(placement: Placement) -> Placement:
    return placement.model_copy(update={"accelerator_vendor": "inferentia"})


WORKLOAD = {"spec": {"replicas": 1}, "status": {}}


def pod(
    *, scheduled: bool = True, message: str = "", ready: bool = False, **container: Any
) -> dict[str, Any]:
    conditions = [
        {"type": "PodScheduled", "status": "True" if scheduled else "False", "message": message}
    ]
    conditions.append({"type": "Ready", "status": "True" if ready else "False"})
    status: dict[str, Any] = {
        "phase": "Running" if scheduled else "Pending",
        "conditions": conditions,
    }
    if container:
        status["containerStatuses"] = [{"name": "runtime", "restartCount": 0, **container}]
    spec = {"nodeName": "node-1"} if scheduled else {}
    return {"metadata": {"name": "p-1"}, "spec": spec, "status": status}


def facts(placement: Placement, *pods: dict[str, Any], **changes: Any) -> ReconcileFacts:
    observation = Observation(
        workload=changes.pop("workload", WORKLOAD),
        pods=list(pods),
        node_claims=changes.pop("node_claims", []),
        node_group_status=changes.pop("node_group_status", None),
    )
    return ReconcileFacts(
        generation=changes.pop("generation", 3),
        placement=placement,
        pool_name="modelship-g4dn-xlarge-od",
        observation=observation,
        endpoint="http://m.ns.svc.cluster.local:8000/v1",
        **changes,
    )


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def started(seconds_ago: float) -> dict[str, Any]:
    moment = NOW - datetime.timedelta(seconds=seconds_ago)
    return {"running": {"startedAt": moment.strftime("%Y-%m-%dT%H:%M:%SZ")}}


def test_nothing_applied_is_pending(placement: Placement) -> None:
    status = build_status(facts(placement, workload=None), None, NOW).status
    assert status["phase"] == "Pending"
    assert conditions(status)["Planned"]["status"] == "True"
    assert conditions(status)["Planned"]["observedGeneration"] == 3
    assert status["plan"]["instanceType"] == placement.instance_type
    assert status["plan"]["nodePool"] == "modelship-g4dn-xlarge-od"


def test_unschedulable_for_the_accelerator_is_node_provisioning(placement: Placement) -> None:
    waiting = pod(
        scheduled=False,
        message=f"0/2 nodes are available: 2 Insufficient {placement.resource_name}.",
    )
    status = build_status(facts(placement, waiting), None, NOW).status
    assert status["phase"] == "NodeProvisioning"
    assert conditions(status)["CapacityReady"]["status"] == "False"


def test_unready_node_claim_is_node_provisioning(placement: Placement) -> None:
    claim = {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}
    waiting = pod(scheduled=False, message="0/2 nodes: node(s) had untolerated taint")
    assert build_status(facts(placement, waiting, node_claims=[claim]), None, NOW).status[
        "phase"
    ] == ("NodeProvisioning")
    assert build_status(facts(placement, waiting), None, NOW).status["phase"] == "Scheduling"


def test_creating_node_group_is_node_provisioning(placement: Placement) -> None:
    waiting = pod(scheduled=False, message="0/1 nodes available")
    status = build_status(facts(placement, waiting, node_group_status="CREATING"), None, NOW).status
    assert status["phase"] == "NodeProvisioning"
    assert conditions(status)["CapacityReady"]["reason"] == "NodeGroupCreating"


def test_running_not_ready_is_weights_loading_then_compiling_on_neuron(
    placement: Placement,
) -> None:
    fetch = estimate_fetch_seconds(placement.weight_bytes)
    early = pod(state=started(fetch / 2))
    late = pod(state=started(fetch + 30))
    assert build_status(facts(placement, early), None, NOW).status["phase"] == "WeightsLoading"
    assert (
        build_status(facts(placement, late), None, NOW).status["phase"] == "WeightsLoading"
    )  # GPU
    assert build_status(facts(neuron(placement), late), None, NOW).status["phase"] == "Compiling"


def test_container_not_started_is_scheduling(placement: Placement) -> None:
    creating = pod(state={"waiting": {"reason": "ContainerCreating"}})
    assert build_status(facts(placement, creating), None, NOW).status["phase"] == "Scheduling"


def test_ready_replicas_make_it_ready_and_available(placement: Placement) -> None:
    workload = {"spec": {"replicas": 2}, "status": {"readyReplicas": 2}}
    status = build_status(facts(placement, pod(ready=True), workload=workload), None, NOW).status
    assert status["phase"] == "Ready"
    assert (status["replicas"], status["readyReplicas"]) == (2, 2)
    assert conditions(status)["Available"]["status"] == "True"
    assert conditions(status)["Degraded"]["status"] == "False"


def test_crash_loop_is_failed_or_degraded(placement: Placement) -> None:
    crashing = pod(
        state={"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}}, restartCount=5
    )
    status = build_status(facts(placement, crashing), None, NOW).status
    assert status["phase"] == "Failed"
    assert "CrashLoopBackOff" in status["message"]
    workload = {"spec": {"replicas": 2}, "status": {"readyReplicas": 1}}
    status = build_status(
        facts(placement, crashing, pod(ready=True), workload=workload), None, NOW
    ).status
    assert status["phase"] == "Degraded"
    assert conditions(status)["Degraded"]["reason"] == "ReplicasFailing"


def test_invalid_spec_with_a_running_workload_is_degraded(placement: Placement) -> None:
    failure = Failure(
        "InvalidSpec", "spec.serving.concurrency: Input should be greater than or equal to 1"
    )
    status = build_status(facts(placement, pod(ready=True), failure=failure), None, NOW).status
    assert status["phase"] == "Degraded"
    validated = conditions(status)["Validated"]
    assert (validated["status"], validated["reason"]) == ("False", "InvalidSpec")
    assert "spec.serving.concurrency" in validated["message"]
    assert conditions(status)["Planned"]["status"] == "Unknown"
    assert conditions(status)["Degraded"]["reason"] == "SpecRejected"


def test_no_placement_without_a_workload_is_failed() -> None:
    failure = Failure("NoPlacement", "nothing fits: spec.model.quantization fp8 fits on g6e.xlarge")
    update = build_status(ReconcileFacts(generation=1, failure=failure), None, NOW)
    assert update.status["phase"] == "Failed"
    planned = conditions(update.status)["Planned"]
    assert (planned["status"], planned["reason"]) == ("False", "NoPlacement")
    assert "fp8" in planned["message"]
    assert update.status["plan"] is None
    warnings = [e for e in update.events if e.type == "Warning"]
    assert {e.reason for e in warnings} >= {"NoPlacement", "PhaseFailed"}


def test_last_transition_time_kept_while_status_unchanged(placement: Placement) -> None:
    first = build_status(facts(placement, workload=None), None, NOW).status
    later = NOW + datetime.timedelta(minutes=5)
    second = build_status(facts(placement, workload=None), first, later)
    assert conditions(second.status)["Planned"]["lastTransitionTime"] == "2025-06-01T12:00:00Z"
    assert second.events == []  # nothing changed: no Events

    ready = {"spec": {"replicas": 1}, "status": {"readyReplicas": 1}}
    third = build_status(facts(placement, pod(ready=True), workload=ready), second.status, later)
    assert conditions(third.status)["Available"]["lastTransitionTime"] == "2025-06-01T12:05:00Z"
    assert conditions(third.status)["Planned"]["lastTransitionTime"] == "2025-06-01T12:00:00Z"
    # One Event per transition: Available=True restates the phase, so only PhaseReady is posted.
    assert [(e.reason, e.type) for e in third.events] == [("PhaseReady", "Normal")]


def test_a_new_model_deployment_posts_its_placement_only(placement: Placement) -> None:
    """Validated=True, Degraded=False and phase Pending are where every new ModelDeployment
    starts, and Available=False says what the phase says: each would be one more write to the
    API server per new object. The placement is the news."""
    update = build_status(facts(placement, workload=None), None, NOW)
    assert update.status["phase"] == "Pending"
    assert [(e.reason, e.type) for e in update.events] == [("PlacementChosen", "Normal")]


def test_losing_availability_is_a_warning(placement: Placement) -> None:
    ready = {"spec": {"replicas": 1}, "status": {"readyReplicas": 1}}
    before = build_status(facts(placement, pod(ready=True), workload=ready), None, NOW).status
    after = build_status(facts(placement, pod(state=started(5))), before, NOW)
    available = [e for e in after.events if e.message.startswith("Available=False")]
    assert available and available[0].type == "Warning"


def test_phase_comes_from_real_pod_state(placement: Placement) -> None:
    """A pod the scheduler has not placed yet has no node and may have no PodScheduled condition
    at all; one with a node but no running container is starting there."""
    unplaced = {"metadata": {"name": "p-1"}, "spec": {}, "status": {"phase": "Pending"}}
    status = build_status(facts(placement, unplaced), None, NOW).status
    assert status["phase"] == "Scheduling"
    assert "waiting for the scheduler" in status["message"]
    bound = {**unplaced, "spec": {"nodeName": "ip-10-0-0-1"}}
    status = build_status(facts(placement, bound), None, NOW).status
    assert status["phase"] == "Scheduling"
    assert "on node ip-10-0-0-1, containers starting" in status["message"]


def test_pods_that_cannot_be_created_are_a_failure_with_the_reason(placement: Placement) -> None:
    message = (
        'pods "chat-1" is forbidden: error looking up service account team/modelship-runtime: '
        'serviceaccount "modelship-runtime" not found'
    )
    workload = {
        "spec": {"replicas": 1},
        "status": {
            "conditions": [
                {
                    "type": "ReplicaFailure",
                    "status": "True",
                    "reason": "FailedCreate",
                    "message": message,
                }
            ]
        },
    }
    status = build_status(facts(placement, workload=workload), None, NOW).status
    assert status["phase"] == "Failed"
    assert conditions(status)["Degraded"]["reason"] == "PodCreationFailed"
    assert message in status["message"]


def test_transient_failures_are_retried_not_final(placement: Placement) -> None:
    failure = Failure("ModelUnreachable", "spec.model.uri: cannot list s3://m/ for now")
    status = build_status(ReconcileFacts(generation=1, failure=failure), None, NOW).status
    assert status["phase"] == "Pending" and "retrying" in status["message"]
    assert conditions(status)["Validated"]["status"] == "Unknown"
    assert conditions(status)["Degraded"]["reason"] == "ModelUnreachable"
