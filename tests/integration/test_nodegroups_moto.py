"""eks-nodegroup mode against moto's EKS server on 127.0.0.1 (real HTTP, boto3 unchanged)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
from modelship.operator.config import load_config
from modelship.operator.nodegroups import NodeGroupError, NodeGroups, user_tag
from modelship.operator.nodepool import EFA_LABEL, NodeGroupRequest

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


# --- EFA node groups ---------------------------------------------------------------------------


class PlacementGroupsMotoLacks:
    """moto 5.2.5 does not implement EC2 placement groups (DescribePlacementGroups raises
    NotImplementedError in its server). Those three calls are answered here, from a dict, after
    botocore has validated and serialized them against the real EC2 API model; every other call
    (subnets, zones, security groups, launch templates, node groups) goes to moto."""

    def __init__(self, ec2: Any) -> None:
        self.groups: dict[str, dict[str, Any]] = {}
        self.in_use: set[str] = set()  # groups whose instances are still terminating
        for operation in (
            "CreatePlacementGroup",
            "DescribePlacementGroups",
            "DeletePlacementGroup",
        ):
            ec2.meta.events.register(f"before-call.ec2.{operation}", self.answer)

    def answer(self, model: Any, params: dict[str, Any], **_: Any) -> tuple[Any, dict[str, Any]]:
        body = params["body"]
        if model.name == "CreatePlacementGroup":
            tags = {
                body[k]: body[k.replace(".Key", ".Value")]
                for k in body
                if k.startswith("TagSpecification.1.Tag.") and k.endswith(".Key")
            }
            self.groups[body["GroupName"]] = {
                "GroupName": body["GroupName"],
                "Strategy": body["Strategy"],
                "State": "available",
                "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
            }
            return _ok({"PlacementGroup": self.groups[body["GroupName"]]})
        if model.name == "DeletePlacementGroup":
            name = body["GroupName"]
            if name in self.in_use:
                return _error("InvalidPlacementGroup.InUse", f"{name} is in use")
            del self.groups[name]
            return _ok({})
        name, values = body["Filter.1.Name"], [v for k, v in body.items() if ".Value." in k]
        if name == "group-name":
            found = [g for n, g in self.groups.items() if n in values]
        else:  # tag:<key>
            key = name.removeprefix("tag:")
            found = [
                g
                for g in self.groups.values()
                if any(t["Key"] == key and t["Value"] in values for t in g["Tags"])
            ]
        return _ok({"PlacementGroups": found})


def _ok(parsed: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    return SimpleNamespace(status_code=200), {**parsed, "ResponseMetadata": {"HTTPStatusCode": 200}}


def _error(code: str, message: str) -> tuple[Any, dict[str, Any]]:
    return SimpleNamespace(status_code=400), {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": 400},
    }


@dataclass
class EfaSetup:
    node_groups: NodeGroups
    ec2: Any
    placement_groups: PlacementGroupsMotoLacks
    subnets: dict[str, str]  # zone -> subnet
    security_group: str


@pytest.fixture
def efa(moto_eks: str, eks_cluster: str) -> EfaSetup:
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto_eks)
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    subnets = {
        zone: ec2.create_subnet(VpcId=vpc, CidrBlock=cidr, AvailabilityZone=zone)["Subnet"][
            "SubnetId"
        ]
        for zone, cidr in (("us-east-1b", "10.20.1.0/24"), ("us-east-1c", "10.20.2.0/24"))
    }
    extra_b = ec2.create_subnet(VpcId=vpc, CidrBlock="10.20.3.0/24", AvailabilityZone="us-east-1b")
    group = ec2.create_security_group(GroupName="efa", Description="EFA", VpcId=vpc)["GroupId"]
    # EFA's rule: all traffic from the group's own members (moto's default egress is all).
    ec2.authorize_security_group_ingress(
        GroupId=group,
        IpPermissions=[{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group}]}],
    )
    config = load_config(
        {
            "MODELSHIP_NODE_POOL_MODE": "eks-nodegroup",
            "MODELSHIP_CLUSTER_NAME": eks_cluster,
            "MODELSHIP_NODE_ROLE": "arn:aws:iam::123456789012:role/nodes",
            "MODELSHIP_SUBNET_IDS": ",".join(
                [subnets["us-east-1b"], subnets["us-east-1c"], extra_b["Subnet"]["SubnetId"]]
            ),
            "MODELSHIP_EFA_SECURITY_GROUP_IDS": group,
            "MODELSHIP_AWS_REGION": REGION,
        }
    )
    eks = boto3.client("eks", region_name=REGION, endpoint_url=moto_eks)
    return EfaSetup(
        NodeGroups(config, eks, ec2),
        ec2,
        PlacementGroupsMotoLacks(ec2),
        {**subnets, "us-east-1b-2": extra_b["Subnet"]["SubnetId"]},
        group,
    )


def efa_request(name: str, interfaces: int = 4, disk: int = 300) -> NodeGroupRequest:
    return replace(
        request(name, disk=disk),
        instance_types=["p4d.24xlarge"],
        labels={"modelship.dev/pool": name, EFA_LABEL: "true"},
        efa_interfaces=interfaces,
    )


def test_a_multi_node_group_gets_efa_interfaces_from_a_launch_template(efa: EfaSetup) -> None:
    eks, ec2 = efa.node_groups.client, efa.ec2
    cluster = efa.node_groups.config.cluster_name
    name = "modelship-p4d-24xlarge-od-efa"
    efa.node_groups.ensure(efa_request(name), "team-e", "llama-405b")

    group = eks.describe_nodegroup(clusterName=cluster, nodegroupName=name)["nodegroup"]
    # One zone's subnets (us-east-1b, the first configured zone offering p4d), the EFA label,
    # and the launch template instead of diskSize (moto rejects both together, as EKS does).
    assert group["subnets"] == [efa.subnets["us-east-1b"], efa.subnets["us-east-1b-2"]]
    assert group["labels"][EFA_LABEL] == "true"
    assert group["launchTemplate"]["name"] == name and group["launchTemplate"]["version"] == "1"
    (version,) = ec2.describe_launch_template_versions(LaunchTemplateName=name)[
        "LaunchTemplateVersions"
    ]
    data = version["LaunchTemplateData"]
    assert [
        (i["NetworkCardIndex"], i["DeviceIndex"], i["InterfaceType"], i["Groups"])
        for i in data["NetworkInterfaces"]
    ] == [
        (0, 0, "efa", [efa.security_group]),
        (1, 1, "efa", [efa.security_group]),
        (2, 1, "efa", [efa.security_group]),
        (3, 1, "efa", [efa.security_group]),
    ]
    assert data["Placement"] == {"GroupName": name}
    assert data["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] == 300
    assert efa.placement_groups.groups[name]["Strategy"] == "cluster"

    # A second user reuses the group, template and placement group as they are.
    efa.node_groups.ensure(efa_request(name), "team-f", "llama-405b")
    assert (
        len(
            ec2.describe_launch_template_versions(LaunchTemplateName=name)["LaunchTemplateVersions"]
        )
        == 1
    )
    assert list(efa.placement_groups.groups) == [name]

    # The last user leaves: the group and its template go; the placement group waits while its
    # instances terminate, and goes at the next sweep.
    efa.node_groups.release("team-f", "llama-405b")
    efa.placement_groups.in_use.add(name)
    assert efa.node_groups.release("team-e", "llama-405b") == [name]
    assert (
        ec2.describe_launch_templates(Filters=[{"Name": "launch-template-name", "Values": [name]}])[
            "LaunchTemplates"
        ]
        == []
    )
    assert name in efa.placement_groups.groups
    efa.placement_groups.in_use.clear()
    efa.node_groups.ensure(efa_request("modelship-p4d-24xlarge-spot-efa"), "team-e", "x")
    assert list(efa.placement_groups.groups) == ["modelship-p4d-24xlarge-spot-efa"]
    efa.node_groups.release("team-e", "x")


def test_a_leftover_template_is_reused_with_a_new_version_when_it_differs(efa: EfaSetup) -> None:
    # A template left by an earlier try with a smaller disk: modelship adds the version it needs
    # rather than failing on the name.
    name = "modelship-p5-48xlarge-od-efa"
    efa.ec2.create_launch_template(
        LaunchTemplateName=name, LaunchTemplateData={"Placement": {"GroupName": name}}
    )
    efa.node_groups.ensure(efa_request(name, interfaces=2), "team-g", "m")
    group = efa.node_groups.client.describe_nodegroup(
        clusterName=efa.node_groups.config.cluster_name, nodegroupName=name
    )["nodegroup"]
    assert group["launchTemplate"]["version"] == "2"
    latest = efa.ec2.describe_launch_template_versions(
        LaunchTemplateName=name, Versions=["$Latest"]
    )["LaunchTemplateVersions"][0]["LaunchTemplateData"]
    assert len(latest["NetworkInterfaces"]) == 2
    efa.node_groups.release("team-g", "m")


def test_efa_setup_errors_name_the_setting(efa: EfaSetup) -> None:
    vpc = efa.ec2.describe_security_groups(GroupIds=[efa.security_group])["SecurityGroups"][0][
        "VpcId"
    ]
    closed = efa.ec2.create_security_group(GroupName="closed", Description="x", VpcId=vpc)
    config = efa.node_groups.config.model_copy(
        update={"efa_security_group_ids": (closed["GroupId"],)}
    )
    node_groups = NodeGroups(config, efa.node_groups.client, efa.ec2)
    with pytest.raises(NodeGroupError, match="MODELSHIP_EFA_SECURITY_GROUP_IDS"):
        node_groups.ensure(efa_request("modelship-p4de-24xlarge-od-efa"), "team-h", "m")
    # No security group configured and none from EKS (moto's clusters have no cluster
    # security group): the error says which setting supplies one.
    bare = NodeGroups(
        config.model_copy(update={"efa_security_group_ids": ()}), efa.node_groups.client, efa.ec2
    )
    with pytest.raises(NodeGroupError, match="no cluster security group"):
        bare.ensure(efa_request("modelship-p4de-24xlarge-od-efa"), "team-h", "m")
