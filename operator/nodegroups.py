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

from .config import OperatorConfig
from .nodepool import NodeGroupRequest, merge_node_group_requests

USER_TAG_PREFIX = "users.modelship.dev/"
MANAGED_TAG = "modelship.dev/managed-by"


class NodeGroupError(RuntimeError):
    """A node group operation failed; the message names the group and what to check."""


def eks_client(config: OperatorConfig, endpoint_url: str | None = None) -> Any:
    """An EKS client for the configured region (endpoint override for tests / private APIs)."""
    return boto3.client("eks", region_name=config.aws_region, endpoint_url=endpoint_url)


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

    def __init__(self, config: OperatorConfig, client: Any | None = None) -> None:
        if not config.cluster_name:
            raise NodeGroupError(
                "MODELSHIP_CLUSTER_NAME is empty; eks-nodegroup mode needs the EKS cluster's name."
            )
        self.config = config
        self.client = client or eks_client(config)
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
            self.client.create_nodegroup(
                clusterName=self.config.cluster_name,
                nodegroupName=request.name,
                scalingConfig={
                    "minSize": sized.min_size,
                    "maxSize": sized.max_size,
                    "desiredSize": sized.desired_size,
                },
                diskSize=request.disk_size_gib,
                subnets=list(self.config.subnet_ids),
                instanceTypes=list(request.instance_types),
                amiType=request.ami_type,
                nodeRole=self.config.node_role,
                labels=labels,
                taints=[dict(t) for t in request.taints],
                capacityType=request.capacity_type,
                tags={MANAGED_TAG: "modelship"},
            )
        else:
            users = {**_users(group.get("labels") or {}), key: _user_value(request)}
            self._relabel(group, labels, request.taints)
            self._resize(group, self._combined(request, users))
        state = self.state(request.name)
        assert state is not None
        return state

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
