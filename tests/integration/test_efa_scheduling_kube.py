"""A spread placement's pods on the real Kubernetes control plane (tests/servers/kubeplane.py):
the real kube-scheduler places them on the EFA pool's nodes because of what the plan asked for.

The plan for Llama-3-70B bf16 at 8k is 2 x g6.12xlarge (TP 4 x PP 2). Rendered, its NodePool is
the EFA pool; the test plays Karpenter (a Node with the catalog's capacity, EFA devices
included) and creates the LeaderWorkerSet's leader pod as the LWS controller would. The scheduler
binds it to that node; the same pod asking for more EFA devices than the node has stays Pending
with the scheduler's reason, so the request is what decides.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from modelship.operator.api import load_spec
from modelship.operator.apply import Kind
from modelship.operator.catalog import load_catalog
from modelship.operator.config import OperatorConfig
from modelship.operator.modelinfo import model_info_from_config
from modelship.operator.render import ModelDeploymentRef, render
from modelship.operator.sizing import make_plan

from tests.servers.kubeplane import POD, ControlPlane, Karpenter, wait_for
from tests.unit import configs

pytestmark = [pytest.mark.integration]

NAMESPACE = "serving"
NODE = Kind("v1", "Node", "nodes", False)
SERVICE_ACCOUNT = Kind("v1", "ServiceAccount", "serviceaccounts", True)
CONFIG = OperatorConfig(cluster_name="prod-eks", node_role="KarpenterNodeRole-prod-eks")


def _pod(template: dict[str, Any], name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, **template.get("metadata", {})},
        "spec": copy.deepcopy(template["spec"]),
    }


def _scheduled(kube: Any, name: str) -> dict[str, str] | None:
    pod = kube.get(POD, NAMESPACE, name) or {}
    for condition in pod.get("status", {}).get("conditions", []):
        if condition["type"] == "PodScheduled":
            return {
                "status": condition["status"],
                "message": condition.get("message", ""),
                "node": pod["spec"].get("nodeName", ""),
            }
    return None


def test_spread_placement_pods_land_on_the_efa_pool(control_plane: ControlPlane) -> None:
    info = model_info_from_config(
        configs.LLAMA_3_70B, weights=None, parameters=70_553_706_496, files=None
    )
    body = {"model": {"uri": "s3://models-prod/llama-3-70b/"}, "serving": {"maxModelLen": 8192}}
    plan = make_plan(info, load_spec(body), load_catalog())
    chosen = plan.chosen
    assert chosen is not None and (chosen.instance_type, chosen.nodes) == ("g6.12xlarge", 2)
    ref = ModelDeploymentRef(
        name="llama-70b", namespace=NAMESPACE, uid="", generation=1, spec=load_spec(body)
    )
    rendered = render(ref, chosen, CONFIG)
    assert rendered.pool_name == "modelship-g6-12xlarge-od-efa"

    kube = control_plane.kube()
    control_plane.ensure_namespace(NAMESPACE)
    account = rendered.children[0]["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"][
        "serviceAccountName"
    ]
    if kube.get(SERVICE_ACCOUNT, NAMESPACE, account) is None:
        kube.request(
            "POST",
            SERVICE_ACCOUNT.path(NAMESPACE),
            body={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account}},
        )
    for obj in rendered.node_pool_objects:
        kube.apply(obj)
    node = Karpenter(kube).launch(rendered.pool_name)
    # The API server taints a new Node not-ready (TaintNodesByCondition); the node lifecycle
    # controller, off in this plane, would lift it once the node reports Ready. Lift it here.
    taints = (kube.get(NODE, None, node) or {})["spec"].get("taints", [])
    kube.merge_patch(
        NODE,
        None,
        node,
        {"spec": {"taints": [t for t in taints if t["key"] != "node.kubernetes.io/not-ready"]}},
    )

    workload = rendered.children[0]
    assert workload["kind"] == "LeaderWorkerSet"
    leader = workload["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
    (container,) = leader["spec"]["containers"]
    assert container["resources"]["limits"]["vpc.amazonaws.com/efa"] == "1"
    kube.request("POST", POD.path(NAMESPACE), body=_pod(leader, "llama-70b-0"))
    placed = wait_for(
        "the leader pod bound", lambda: (_scheduled(kube, "llama-70b-0") or {}).get("node")
    )
    assert placed == node

    # The same pod asking for more EFA devices than any node of the pool has is not placed.
    greedy = _pod(leader, "llama-70b-greedy")
    for key in ("requests", "limits"):
        greedy["spec"]["containers"][0]["resources"][key]["vpc.amazonaws.com/efa"] = "64"
    kube.request("POST", POD.path(NAMESPACE), body=greedy)
    pending = wait_for(
        "the greedy pod judged unschedulable",
        lambda: (
            state
            if (state := _scheduled(kube, "llama-70b-greedy")) and state["status"] == "False"
            else None
        ),
    )
    assert "vpc.amazonaws.com/efa" in pending["message"]
    for name in ("llama-70b-0", "llama-70b-greedy"):
        kube.delete(POD, NAMESPACE, name)
    kube.delete(NODE, None, node)
