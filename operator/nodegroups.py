"""EKS managed node groups (node_pool_mode = eks-nodegroup), through boto3's EKS client.

A node group is shared by every ModelDeployment on the same hardware, like a Karpenter pool.
Each user records its own request as a Kubernetes label of the node group (UpdateNodegroupConfig
addOrUpdateLabels / removeLabels): `users.modelship.dev/<hash of namespace/name>` =
`<max>.<desired>.<disk GiB>` — one key per user, so concurrent reconciles do not overwrite each
other. (EKS tags would keep the nodes' labels clean, but moto, the test server, tags only
clusters; labels work on both, and on the nodes they say which ModelDeployments asked for them.)
The group's size is the sum of its users' requests (`nodepool.merge_node_group_requests`); the
group is deleted when its last user leaves.

What EKS can change in place is changed in place (scaling config, Kubernetes labels and taints);
instance types, AMI type, capacity type and disk size are fixed at creation, so a change there
needs a new group (a new pool name, which render derives from the instance and capacity type).

A multi-node placement's group (`efa_interfaces` > 0, an `-efa` pool) gets its EFA interfaces the
only way a managed node group can: from an EC2 launch template (EKS user guide,
device-management-efa and launch-templates). modelship creates one named after the pool with one
EFA interface per network card (card 0 at device index 0, the others at device index 1), the root
volume (a group with a launch template may not set diskSize) and a cluster placement group of the
same name; the interfaces carry MODELSHIP_EFA_SECURITY_GROUP_IDS, else the EKS cluster security
group (a launch template with network interfaces names its groups on each interface), and one of
them must allow all traffic to and from itself. EFA does not cross Availability Zones, so the group
gets only the configured subnets of the first zone that offers its instance type. Both are reused
by name, and deleted with the group (a placement group its instances still occupy goes at a later
release, once they are gone).

The endpoint is overridable (`endpoint_url` argument, or boto3's own AWS_ENDPOINT_URL), which is
how the tests talk to moto's server.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from .config import OperatorConfig
from .nodepool import EFA_LABEL, ROOT_DEVICE, NodeGroupRequest, merge_node_group_requests

USER_TAG_PREFIX = "users.modelship.dev/"
MANAGED_TAG = "modelship.dev/managed-by"
_MANAGED_EC2_TAG = {"Key": MANAGED_TAG, "Value": "modelship"}


class NodeGroupError(RuntimeError):
    """A node group operation failed; the message names the group and what to check."""


def eks_client(config: OperatorConfig, endpoint_url: str | None = None) -> Any:
    """An EKS client for the configured region (endpoint override for tests / private APIs)."""
    return boto3.client("eks", region_name=config.aws_region, endpoint_url=endpoint_url)


def ec2_client(config: OperatorConfig, endpoint_url: str | None = None) -> Any:
    """An EC2 client (launch templates, placement groups, subnets) for the configured region."""
    return boto3.client("ec2", region_name=config.aws_region, endpoint_url=endpoint_url)


def efa_launch_template_data(
    request: NodeGroupRequest, security_groups: list[str]
) -> dict[str, Any]:
    """The launch template of an EFA node group: one EFA interface per network card (card 0 is
    the primary interface, device index 0; the others device index 1, as the EC2 user guide lays
    out multi-card EFA), the pool's cluster placement group and the root volume. No subnets, no
    instance profile, no instance type: EKS takes those from the node group."""
    interfaces = [
        {
            "DeviceIndex": 0 if card == 0 else 1,
            "NetworkCardIndex": card,
            "InterfaceType": "efa",
            "Groups": list(security_groups),
            "DeleteOnTermination": True,
        }
        for card in range(request.efa_interfaces)
    ]
    return {
        "NetworkInterfaces": interfaces,
        "Placement": {"GroupName": request.name},
        "BlockDeviceMappings": [
            {
                "DeviceName": ROOT_DEVICE,
                "Ebs": {
                    "VolumeSize": request.disk_size_gib,
                    "VolumeType": "gp3",
                    "DeleteOnTermination": True,
                },
            }
        ],
    }


def _allows_itself(group: Mapping[str, Any]) -> bool:
    """All traffic in from its own members and out to them (or anywhere): EFA's rule."""

    def all_traffic_to_self(permissions: list[Mapping[str, Any]], anywhere_ok: bool) -> bool:
        for permission in permissions:
            if str(permission.get("IpProtocol")) != "-1":
                continue
            if any(
                pair.get("GroupId") == group["GroupId"]
                for pair in permission.get("UserIdGroupPairs") or []
            ):
                return True
            if anywhere_ok and any(
                r.get("CidrIp") == "0.0.0.0/0" for r in permission.get("IpRanges") or []
            ):
                return True
        return False

    return all_traffic_to_self(group.get("IpPermissions") or [], False) and all_traffic_to_self(
        group.get("IpPermissionsEgress") or [], True
    )


def user_tag(namespace: str, name: str) -> str:
    """The label key one ModelDeployment writes on a node group it uses."""
    return USER_TAG_PREFIX + hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:24]


def _user_value(request: NodeGroupRequest) -> str:
    return f"{request.max_size}.{request.desired_size}.{request.disk_size_gib}"


def _parse_user_value(base: NodeGroupRequest, value: str) -> NodeGroupRequest:
    try:
        max_size, desired, disk = (int(part) for part in value.split("."))
    except ValueError:  # a hand-written label: count the user, add nothing
        max_size, desired, disk = 0, 0, 0
    return replace(base, max_size=max_size, desired_size=desired, disk_size_gib=disk)


def _users(labels: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if k.startswith(USER_TAG_PREFIX)}


@dataclass(frozen=True)
class NodeGroupState:
    """A node group as EKS reports it."""

    name: str
    status: str  # CREATING, ACTIVE, UPDATING, DELETING, CREATE_FAILED, DEGRADED, ...
    min_size: int
    max_size: int
    desired_size: int
    users: tuple[str, ...]  # the users' label keys (see user_tag)
    health: str


class NodeGroups:
    """Create, resize and delete the shared node groups of one EKS cluster."""

    def __init__(
        self, config: OperatorConfig, client: Any | None = None, ec2: Any | None = None
    ) -> None:
        if not config.cluster_name:
            raise NodeGroupError(
                "MODELSHIP_CLUSTER_NAME is empty; eks-nodegroup mode needs the EKS cluster's name."
            )
        self.config = config
        self.client = client or eks_client(config)
        self._ec2 = ec2
        # A group's size is read, combined over its users and written back: serialize that, or
        # two reconciles at once would each write a size without the other's share.
        self._lock = threading.RLock()

    def _describe(self, name: str) -> dict[str, Any] | None:
        try:
            answer = self.client.describe_nodegroup(
                clusterName=self.config.cluster_name, nodegroupName=name
            )
        except self.client.exceptions.ResourceNotFoundException:
            return None
        return dict(answer["nodegroup"])

    def state(self, name: str) -> NodeGroupState | None:
        """The node group's status (for CapacityReady), or None when it does not exist."""
        group = self._describe(name)
        if group is None:
            return None
        scaling = group.get("scalingConfig") or {}
        issues = (group.get("health") or {}).get("issues") or []
        return NodeGroupState(
            name=name,
            status=str(group.get("status")),
            min_size=int(scaling.get("minSize", 0)),
            max_size=int(scaling.get("maxSize", 0)),
            desired_size=int(scaling.get("desiredSize", 0)),
            users=tuple(sorted(_users(group.get("labels") or {}))),
            health="; ".join(f"{i.get('code')}: {i.get('message')}" for i in issues),
        )

    def _combined(self, base: NodeGroupRequest, users: Mapping[str, str]) -> NodeGroupRequest:
        """The group's size for all its users: sizes add up, the disk is the largest."""
        requests = [_parse_user_value(base, value) for value in users.values()]
        merged = merge_node_group_requests(requests)[0] if requests else base
        return replace(merged, max_size=max(merged.max_size, merged.min_size, 1))

    def ensure(self, request: NodeGroupRequest, namespace: str, name: str) -> NodeGroupState:
        """Create the group, or record this user and resize it to all its users' needs."""
        with self._lock:
            return self._ensure(request, namespace, name)

    def _ensure(self, request: NodeGroupRequest, namespace: str, name: str) -> NodeGroupState:
        key = user_tag(namespace, name)
        labels = {**request.labels, key: _user_value(request)}
        group = self._describe(request.name)
        if group is None:
            if not self.config.subnet_ids or not self.config.node_role:
                raise NodeGroupError(
                    f"node group {request.name}: MODELSHIP_SUBNET_IDS and MODELSHIP_NODE_ROLE must "
                    "be set to create EKS managed node groups."
                )
            sized = replace(request, max_size=max(request.max_size, 1))
            placement: dict[str, Any] = {
                "diskSize": request.disk_size_gib,
                "subnets": list(self.config.subnet_ids),
            }
            if request.efa_interfaces:
                placement = self._efa_placement(request)
            self.client.create_nodegroup(
                clusterName=self.config.cluster_name,
                nodegroupName=request.name,
                scalingConfig={
                    "minSize": sized.min_size,
                    "maxSize": sized.max_size,
                    "desiredSize": sized.desired_size,
                },
                instanceTypes=list(request.instance_types),
                amiType=request.ami_type,
                nodeRole=self.config.node_role,
                labels=labels,
                taints=[dict(t) for t in request.taints],
                capacityType=request.capacity_type,
                tags={MANAGED_TAG: "modelship"},
                **placement,
            )
        else:
            users = {**_users(group.get("labels") or {}), key: _user_value(request)}
            self._relabel(group, labels, request.taints)
            self._resize(group, self._combined(request, users))
        state = self.state(request.name)
        assert state is not None
        return state

    @property
    def ec2(self) -> Any:
        """The EC2 client, made on first use (only EFA groups need it)."""
        if self._ec2 is None:
            self._ec2 = ec2_client(self.config)
        return self._ec2

    def _efa_placement(self, request: NodeGroupRequest) -> dict[str, Any]:
        """CreateNodegroup's subnets and launchTemplate for an EFA group, after making its
        placement group and launch template (or finding them from an earlier try)."""
        where = f"node group {request.name}"
        try:
            self._sweep_efa_leftovers()
            subnets = self._one_zone_subnets(request)
            groups = self._efa_security_groups(where)
            self._ensure_placement_group(request.name)
            version = self._ensure_launch_template(request, groups)
        except (BotoCoreError, ClientError) as error:
            raise NodeGroupError(
                f"{where}: the EC2 API refused the EFA setup ({error}); check that "
                "MODELSHIP_SUBNET_IDS and MODELSHIP_EFA_SECURITY_GROUP_IDS exist, and that the "
                "operator's IAM role may ec2:DescribeSubnets, ec2:DescribeInstanceTypeOfferings, "
                "ec2:DescribeSecurityGroups, ec2:*LaunchTemplate* and ec2:*PlacementGroup* "
                "(docs/quickstart.md)."
            ) from None
        return {"subnets": subnets, "launchTemplate": {"name": request.name, "version": version}}

    def _one_zone_subnets(self, request: NodeGroupRequest) -> list[str]:
        """The configured subnets of the first Availability Zone (in MODELSHIP_SUBNET_IDS order)
        that offers the instance type: EFA traffic does not cross zones."""
        described = self.ec2.describe_subnets(SubnetIds=list(self.config.subnet_ids))["Subnets"]
        zone_of = {s["SubnetId"]: s["AvailabilityZone"] for s in described}
        offered = {
            offer["Location"]
            for offer in self.ec2.describe_instance_type_offerings(
                LocationType="availability-zone",
                Filters=[{"Name": "instance-type", "Values": list(request.instance_types)}],
            )["InstanceTypeOfferings"]
        }
        zones = list(dict.fromkeys(zone_of[s] for s in self.config.subnet_ids if s in zone_of))
        for zone in zones:
            if zone in offered:
                return [s for s in self.config.subnet_ids if zone_of.get(s) == zone]
        raise NodeGroupError(
            f"node group {request.name}: none of the zones of MODELSHIP_SUBNET_IDS "
            f"({', '.join(zones) or 'none found'}) offers {', '.join(request.instance_types)}; "
            "add a subnet in a zone that does (Helm: nodePools.subnetIds)."
        )

    def _efa_security_groups(self, where: str) -> list[str]:
        groups = list(self.config.efa_security_group_ids)
        if not groups:
            cluster = self.client.describe_cluster(name=self.config.cluster_name)["cluster"]
            default = (cluster.get("resourcesVpcConfig") or {}).get("clusterSecurityGroupId")
            if not default:
                raise NodeGroupError(
                    f"{where}: EKS reports no cluster security group for cluster "
                    f"{self.config.cluster_name}, and the EFA interfaces need one; set "
                    "MODELSHIP_EFA_SECURITY_GROUP_IDS (Helm: nodePools.efaSecurityGroupIds)."
                )
            groups = [default]
        described = self.ec2.describe_security_groups(GroupIds=groups)["SecurityGroups"]
        if not any(_allows_itself(group) for group in described):
            raise NodeGroupError(
                f"{where}: EFA needs a security group that allows all inbound and outbound "
                f"traffic to and from itself, and none of {', '.join(groups)} does; add such "
                "rules, or name a group that has them in MODELSHIP_EFA_SECURITY_GROUP_IDS (Helm: "
                "nodePools.efaSecurityGroupIds)."
            )
        return groups

    def _ensure_placement_group(self, name: str) -> None:
        found = self.ec2.describe_placement_groups(
            Filters=[{"Name": "group-name", "Values": [name]}]
        )["PlacementGroups"]
        if found:
            return
        self.ec2.create_placement_group(
            GroupName=name,
            Strategy="cluster",
            TagSpecifications=[
                {"ResourceType": "placement-group", "Tags": [_MANAGED_EC2_TAG]},
            ],
        )

    def _ensure_launch_template(self, request: NodeGroupRequest, groups: list[str]) -> str:
        """The version of the pool's launch template that says what this request needs: the
        existing latest one when it already does, else a new version (or a new template)."""
        data = efa_launch_template_data(request, groups)
        existing = self.ec2.describe_launch_templates(
            Filters=[{"Name": "launch-template-name", "Values": [request.name]}]
        )["LaunchTemplates"]
        if not existing:
            created = self.ec2.create_launch_template(
                LaunchTemplateName=request.name,
                LaunchTemplateData=data,
                TagSpecifications=[
                    {"ResourceType": "launch-template", "Tags": [_MANAGED_EC2_TAG]},
                ],
            )
            return str(created["LaunchTemplate"]["LatestVersionNumber"])
        latest = self.ec2.describe_launch_template_versions(
            LaunchTemplateName=request.name, Versions=["$Latest"]
        )["LaunchTemplateVersions"][0]
        stored = latest.get("LaunchTemplateData") or {}
        if all(stored.get(key) == value for key, value in data.items()):
            return str(latest["VersionNumber"])
        version = self.ec2.create_launch_template_version(
            LaunchTemplateName=request.name, LaunchTemplateData=data
        )
        return str(version["LaunchTemplateVersion"]["VersionNumber"])

    def _delete_efa_resources(self, name: str) -> None:
        """The launch template at once (EKS keeps its own copy); the placement group when its
        instances are gone, which takes minutes after DeleteNodegroup: until then, a later
        release or EFA group creation sweeps it (_sweep_efa_leftovers)."""
        try:
            self.ec2.delete_launch_template(LaunchTemplateName=name)
        except ClientError as error:
            if "NotFound" not in error.response.get("Error", {}).get("Code", ""):
                raise
        self._sweep_efa_leftovers()

    def _sweep_efa_leftovers(self) -> None:
        """Delete modelship's placement groups whose node group is gone."""
        groups = self.ec2.describe_placement_groups(
            Filters=[{"Name": f"tag:{MANAGED_TAG}", "Values": ["modelship"]}]
        )["PlacementGroups"]
        for group in groups:
            name = group["GroupName"]
            if self._describe(name) is not None:
                continue
            try:
                self.ec2.delete_placement_group(GroupName=name)
            except ClientError as error:  # InvalidPlacementGroup.InUse: instances still there
                if "InUse" not in error.response.get("Error", {}).get("Code", ""):
                    raise

    def _resize(self, group: Mapping[str, Any], wanted: NodeGroupRequest) -> None:
        scaling = group.get("scalingConfig") or {}
        target = {
            "minSize": wanted.min_size,
            "maxSize": wanted.max_size,
            "desiredSize": wanted.desired_size,
        }
        if all(scaling.get(k) == v for k, v in target.items()):
            return
        self.client.update_nodegroup_config(
            clusterName=self.config.cluster_name,
            nodegroupName=group["nodegroupName"],
            scalingConfig=target,
        )

    def _relabel(
        self, group: Mapping[str, Any], wanted: Mapping[str, str], taints: list[dict[str, str]]
    ) -> None:
        """Add or update `wanted` labels (other users' keys are left alone) and set the taints."""
        labels = dict(group.get("labels") or {})
        update: dict[str, Any] = {}
        if any(labels.get(k) != v for k, v in wanted.items()):
            update["labels"] = {"addOrUpdateLabels": dict(wanted)}
        current_taints = [dict(t) for t in group.get("taints") or []]
        wanted_taints = [dict(t) for t in taints]
        if sorted(map(str, current_taints)) != sorted(map(str, wanted_taints)):
            update["taints"] = {"addOrUpdateTaints": wanted_taints}
            removed = [t for t in current_taints if t not in wanted_taints]
            if removed:
                update["taints"]["removeTaints"] = removed
        if update:
            self.client.update_nodegroup_config(
                clusterName=self.config.cluster_name, nodegroupName=group["nodegroupName"], **update
            )

    def release(self, namespace: str, name: str, keep: str | None = None) -> list[str]:
        """Drop this user from every group but `keep`; delete groups left without users,
        shrink the others. Returns the groups deleted."""
        with self._lock:
            return self._release(namespace, name, keep)

    def _release(self, namespace: str, name: str, keep: str | None) -> list[str]:
        key = user_tag(namespace, name)
        cluster = self.config.cluster_name
        deleted = []
        paginator = self.client.get_paginator("list_nodegroups")
        for page in paginator.paginate(clusterName=cluster):
            for group_name in page.get("nodegroups", []):
                group = None if group_name == keep else self._describe(group_name)
                users = _users((group or {}).get("labels") or {})
                if group is None or key not in users:
                    continue
                others = {k: v for k, v in users.items() if k != key}
                if not others:
                    self.client.delete_nodegroup(clusterName=cluster, nodegroupName=group_name)
                    deleted.append(group_name)
                    if (group.get("labels") or {}).get(EFA_LABEL) == "true":
                        self._delete_efa_resources(group_name)
                    continue
                self.client.update_nodegroup_config(
                    clusterName=cluster, nodegroupName=group_name, labels={"removeLabels": [key]}
                )
                scaling = group.get("scalingConfig") or {}
                base = NodeGroupRequest(
                    name=group_name,
                    instance_types=list(group.get("instanceTypes") or []),
                    capacity_type=str(group.get("capacityType")),
                    ami_type=str(group.get("amiType")),
                    disk_size_gib=int(group.get("diskSize") or 0),
                    min_size=int(scaling.get("minSize", 0)),
                    max_size=0,
                    desired_size=0,
                )
                self._resize(group, self._combined(base, others))
        return deleted
