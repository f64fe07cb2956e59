"""nodepool: shared pool names, Karpenter/EKS sizing of the pool, and merging several
ModelDeployments' views of one pool."""

from __future__ import annotations

import pytest
from modelship.operator.config import OperatorConfig
from modelship.operator.nodepool import (
    NodeGroupRequest,
    NodePoolError,
    capacity_type_of,
    karpenter_objects,
    max_nodes,
    merge_node_group_requests,
    merge_node_pool_objects,
    node_capacity_resource,
    node_group_request,
    pool_name,
    root_volume_gib,
)

from tests.unit.schemas import validate_object
from tests.unit.test_render import (
    GIB,
    LLAMA_8B_INF2,
    LLAMA_8B_L4,
    LLAMA_8B_L4_SHARED,
    LLAMA_70B_A100,
    LLAMA_70B_TRN1,
    LLAMA_405B_H100,
)

CONFIG = OperatorConfig(cluster_name="prod-eks", node_role="KarpenterNodeRole-prod-eks")


@pytest.mark.parametrize(
    ("instance_type", "capacity_type", "expected"),
    [
        ("g6e.12xlarge", "on-demand", "modelship-g6e-12xlarge-od"),
        ("g6e.12xlarge", "spot", "modelship-g6e-12xlarge-spot"),
        ("p5.48xlarge", "ON_DEMAND", "modelship-p5-48xlarge-od"),
        ("inf2.8xlarge", "SPOT", "modelship-inf2-8xlarge-spot"),
        ("P4DE.24XLARGE", "on-demand", "modelship-p4de-24xlarge-od"),
    ],
)
def test_pool_name(instance_type: str, capacity_type: str, expected: str) -> None:
    assert pool_name(instance_type, capacity_type) == expected


def test_pool_name_refuses_what_cannot_be_a_name() -> None:
    with pytest.raises(NodePoolError, match="on-demand or spot"):
        pool_name("g6.xlarge", "reserved")
    with pytest.raises(NodePoolError, match="instance_type"):
        pool_name("...", "spot")
    with pytest.raises(NodePoolError, match="63"):
        pool_name("g" * 60, "spot")


def test_capacity_type_spellings() -> None:
    assert capacity_type_of("on-demand") == capacity_type_of("ON_DEMAND") == "on-demand"
    assert capacity_type_of(" Spot ") == "spot"


def test_node_capacity_is_the_whole_instance_from_the_catalog() -> None:
    assert node_capacity_resource(LLAMA_8B_L4, CONFIG) == ("nvidia.com/gpu", 1)
    assert node_capacity_resource(LLAMA_8B_L4_SHARED, CONFIG) == ("nvidia.com/gpu", 4)
    assert node_capacity_resource(LLAMA_70B_A100, CONFIG) == ("nvidia.com/gpu", 8)
    assert node_capacity_resource(LLAMA_8B_INF2, CONFIG) == ("aws.amazon.com/neuron", 1)
    assert node_capacity_resource(LLAMA_70B_TRN1, CONFIG) == ("aws.amazon.com/neuron", 16)
    unknown = LLAMA_8B_L4.model_copy(update={"instance_type": "g99.huge"})
    with pytest.raises(NodePoolError, match=r"g99\.huge.*catalog"):
        node_capacity_resource(unknown, CONFIG)


def test_max_nodes_include_one_surging_replica() -> None:
    assert max_nodes(LLAMA_8B_L4, 3) == 4
    assert max_nodes(LLAMA_405B_H100, 2) == 6


def test_root_volume_holds_the_weights_and_the_images() -> None:
    # 16 GiB x 1.2 = 19.2 GiB < the pod's 40 GiB of local disk; + 100 GiB.
    assert root_volume_gib(LLAMA_8B_L4) == 140
    # 756 GiB x 1.2 = 907.2 < 950 GiB; + 100.
    assert root_volume_gib(LLAMA_405B_H100) == 1050
    small_disk = LLAMA_70B_A100.model_copy(update={"ephemeral_storage_bytes": 10 * GIB})
    assert root_volume_gib(small_disk) == 170 + 100  # ceil(141 x 1.2) = 170


def test_karpenter_objects_validate_and_are_named_after_the_pool() -> None:
    node_class, node_pool = karpenter_objects(LLAMA_8B_INF2, CONFIG, max_replicas=4)
    assert (
        node_class["metadata"]["name"]
        == node_pool["metadata"]["name"]
        == "modelship-inf2-8xlarge-od"
    )
    assert (
        node_pool["spec"]["template"]["spec"]["nodeClassRef"]["name"]
        == node_class["metadata"]["name"]
    )
    assert node_pool["spec"]["limits"] == {"aws.amazon.com/neuron": "5"}
    for obj in (node_class, node_pool):
        validate_object(obj)
    shared = karpenter_objects(
        LLAMA_8B_INF2, CONFIG.model_copy(update={"node_class_name": "neuron"}), 1
    )
    assert [o["kind"] for o in shared] == ["NodePool"]
    assert shared[0]["spec"]["template"]["spec"]["nodeClassRef"]["name"] == "neuron"


def test_merge_adds_limits_and_keeps_the_largest_disk() -> None:
    small = karpenter_objects(LLAMA_8B_L4_SHARED, CONFIG, max_replicas=1)
    big = karpenter_objects(
        LLAMA_8B_L4_SHARED.model_copy(update={"weight_bytes": 300 * GIB}), CONFIG, max_replicas=2
    )
    other = karpenter_objects(LLAMA_70B_A100, CONFIG, max_replicas=1)
    merged = merge_node_pool_objects([small, big, other])
    assert [(o["kind"], o["metadata"]["name"]) for o in merged] == [
        ("EC2NodeClass", "modelship-g6-12xlarge-od"),
        ("NodePool", "modelship-g6-12xlarge-od"),
        ("EC2NodeClass", "modelship-p4de-24xlarge-od"),
        ("NodePool", "modelship-p4de-24xlarge-od"),
    ]
    assert merged[1]["spec"]["limits"] == {"nvidia.com/gpu": str(4 * 2 + 4 * 3)}
    assert merged[0]["spec"]["blockDeviceMappings"][0]["ebs"]["volumeSize"] == "460Gi"
    assert merged[3]["spec"]["limits"] == other[1]["spec"]["limits"]
    # The inputs are not changed.
    assert small[1]["spec"]["limits"] == {"nvidia.com/gpu": "8"}
    for obj in merged:
        validate_object(obj)


def test_node_group_requests_merge_by_name() -> None:
    first = node_group_request(LLAMA_8B_L4, CONFIG, min_replicas=1, max_replicas=2)
    second = node_group_request(
        LLAMA_8B_L4.model_copy(update={"weight_bytes": 200 * GIB}),
        CONFIG,
        min_replicas=0,
        max_replicas=4,
    )
    trn = node_group_request(LLAMA_70B_TRN1, CONFIG, min_replicas=1, max_replicas=1)
    merged = merge_node_group_requests([first, second, trn])
    assert [m.name for m in merged] == ["modelship-g6-xlarge-od", "modelship-trn1-32xlarge-od"]
    assert (merged[0].min_size, merged[0].desired_size, merged[0].max_size) == (0, 1, 3 + 5)
    assert merged[0].disk_size_gib == 340
    assert merged[1] == trn
    assert isinstance(merged[1], NodeGroupRequest)
    assert trn.ami_type == "AL2023_x86_64_NEURON" and trn.instance_types == ["trn1.32xlarge"]


def test_merge_refuses_limits_it_cannot_add() -> None:
    (_, pool) = karpenter_objects(LLAMA_8B_L4, CONFIG, max_replicas=1)
    odd = {**pool, "spec": {**pool["spec"], "limits": {"nvidia.com/gpu": "1k"}}}
    with pytest.raises(NodePoolError, match="1k"):
        merge_node_pool_objects([[pool], [odd]])


def test_multi_node_placements_get_their_own_efa_pool() -> None:
    # Multi-node replicas ask for EFA devices (vpc.amazonaws.com/efa); their nodes come from a
    # pool of their own, labelled, so a single-node replica never takes an EFA node.
    spread = LLAMA_405B_H100.model_copy(update={"efa_interfaces": 32})
    assert spread.nodes > 1
    node_class, node_pool = karpenter_objects(spread, CONFIG, max_replicas=1)
    assert node_pool["metadata"]["name"] == "modelship-p5-48xlarge-od-efa"
    assert node_pool["spec"]["template"]["metadata"]["labels"]["modelship.dev/efa"] == "true"
    for obj in (node_class, node_pool):
        validate_object(obj)
    request = node_group_request(spread, CONFIG, min_replicas=1, max_replicas=1)
    assert request.name == "modelship-p5-48xlarge-od-efa"
    assert request.labels["modelship.dev/efa"] == "true"
    # eks-nodegroup mode: the group's launch template carries one EFA interface per card.
    assert request.efa_interfaces == 32
    assert node_group_request(LLAMA_8B_L4, CONFIG, 1, 1).efa_interfaces == 0
    _, single = karpenter_objects(LLAMA_8B_L4, CONFIG, max_replicas=1)
    assert "modelship.dev/efa" not in single["spec"]["template"]["metadata"]["labels"]
    assert pool_name("p5.48xlarge", "spot", efa=True) == "modelship-p5-48xlarge-spot-efa"
