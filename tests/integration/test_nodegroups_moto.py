"""eks-nodegroup mode against moto's EKS server on 127.0.0.1 (real HTTP, boto3 unchanged)."""

from __future__ import annotations

import boto3
import pytest
from modelship.operator.config import load_config
from modelship.operator.nodegroups import NodeGroups, user_tag
from modelship.operator.nodepool import NodeGroupRequest

from tests.servers.moto_eks import REGION

pytestmark = pytest.mark.integration


@pytest.fixture
def node_groups(moto_eks: str, eks_cluster: str) -> NodeGroups:
    config = load_config(
        {
            "MODELSHIP_NODE_POOL_MODE": "eks-nodegroup",
            "MODELSHIP_CLUSTER_NAME": eks_cluster,
            "MODELSHIP_NODE_ROLE": "arn:aws:iam::123456789012:role/nodes",
            "MODELSHIP_SUBNET_IDS": "subnet-aaaa,subnet-bbbb",
            "MODELSHIP_AWS_REGION": REGION,
        }
    )
    return NodeGroups(config, boto3.client("eks", region_name=REGION, endpoint_url=moto_eks))


def request(name: str, *, max_size: int = 2, desired: int = 1, disk: int = 200) -> NodeGroupRequest:
    return NodeGroupRequest(
        name=name,
        instance_types=["g6e.xlarge"],
        capacity_type="ON_DEMAND",
        ami_type="AL2023_x86_64_NVIDIA",
        disk_size_gib=disk,
        min_size=0,
        max_size=max_size,
        desired_size=desired,
        labels={"modelship.dev/pool": name},
        taints=[{"key": "nvidia.com/gpu", "value": "true", "effect": "NO_SCHEDULE"}],
    )


def test_create_share_resize_and_delete(node_groups: NodeGroups) -> None:
    eks = node_groups.client
    cluster = node_groups.config.cluster_name

    state = node_groups.ensure(request("pool-a"), "team-a", "chat")
    assert state.status in ("CREATING", "ACTIVE")  # moto reports ACTIVE at once
    group = eks.describe_nodegroup(clusterName=cluster, nodegroupName="pool-a")["nodegroup"]
    assert group["instanceTypes"] == ["g6e.xlarge"]
    assert group["amiType"] == "AL2023_x86_64_NVIDIA"
    assert group["scalingConfig"] == {"minSize": 0, "maxSize": 2, "desiredSize": 1}
    assert group["labels"][user_tag("team-a", "chat")] == "2.1.200"
    assert group["labels"]["modelship.dev/pool"] == "pool-a"
    assert state.users == (user_tag("team-a", "chat"),)

    # A second user of the same hardware: sizes add up, both are recorded.
    state = node_groups.ensure(request("pool-a", max_size=3, desired=2), "team-b", "code")
    assert (state.max_size, state.desired_size) == (5, 3)
    assert set(state.users) == {user_tag("team-a", "chat"), user_tag("team-b", "code")}
    # Re-applying the same request changes nothing.
    assert node_groups.ensure(request("pool-a", max_size=3, desired=2), "team-b", "code") == state

    # The first user leaves: the group shrinks to the second user's needs and stays.
    assert node_groups.release("team-a", "chat") == []
    state_after = node_groups.state("pool-a")
    assert state_after is not None
    assert (state_after.max_size, state_after.desired_size) == (3, 2)
    assert state_after.users == (user_tag("team-b", "code"),)

    # The last user leaves: the group is deleted.
    assert node_groups.release("team-b", "code") == ["pool-a"]
    remaining = eks.list_nodegroups(clusterName=cluster)["nodegroups"]
    assert "pool-a" not in remaining or node_groups.state("pool-a").status == "DELETING"  # type: ignore[union-attr]


def test_replan_to_other_hardware_releases_the_old_group(node_groups: NodeGroups) -> None:
    node_groups.ensure(request("pool-old"), "team-c", "m")
    node_groups.ensure(request("pool-new"), "team-c", "m")
    assert node_groups.release("team-c", "m", keep="pool-new") == ["pool-old"]
    new = node_groups.state("pool-new")
    assert new is not None and new.users == (user_tag("team-c", "m"),)
    node_groups.release("team-c", "m")


def test_missing_settings_name_the_variable(moto_eks: str) -> None:
    config = load_config({"MODELSHIP_NODE_POOL_MODE": "eks-nodegroup"})
    with pytest.raises(Exception, match="MODELSHIP_CLUSTER_NAME"):
        NodeGroups(config, boto3.client("eks", region_name=REGION, endpoint_url=moto_eks))
