"""Node pools: one per (instance type, capacity type), shared by every ModelDeployment on that
hardware, as a Karpenter NodePool + EC2NodeClass or an EKS managed node group request.

Pure functions: nothing here talks to a cluster or to AWS. A ModelDeployment's render gives the
pool as *it* needs it (its own maximum replicas, its own weights); when several ModelDeployments
share a pool, the apply step combines their renders with `merge_node_pool_objects` /
`merge_node_group_requests` (limits and node counts add up, disks take the largest).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .catalog import RESOURCE_NAMES, Catalog, load_catalog
from .config import OperatorConfig, node_cache_enabled
from .plan import Placement

GIB = 1024**3

POOL_LABEL = "modelship.dev/pool"
MANAGED_BY = {"app.kubernetes.io/managed-by": "modelship"}
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
EFA_LABEL = "modelship.dev/efa"

KARPENTER_API = "karpenter.sh/v1"
NODE_CLASS_GROUP = "karpenter.k8s.aws"
NODE_CLASS_API = f"{NODE_CLASS_GROUP}/v1"

# The EKS-optimized Amazon Linux 2023 AMI. For the alias Karpenter looks up the standard, NVIDIA
# and Neuron x86_64 variants and gives each AMI its variant's instance requirements, so g/p types
# boot the NVIDIA image and inf/trn types the Neuron one (aws/karpenter-provider-aws,
# pkg/providers/amifamily/al2023.go, AL2023.DescribeImageQuery; also the AWS karpenter-blueprints
# "nvidia-gpu-workload" and "neuron-workload"). Pin a version (al2023@v2025...) to control drift.
AMI_ALIAS = "al2023@latest"
ROOT_DEVICE = "/dev/xvda"  # the AL2023 EKS AMI's root device

# Room on the root volume besides the weights: container images (vLLM + CUDA is ~10 GiB
# compressed, ~25 GiB unpacked, twice during an image update), logs and compile caches.
ROOT_VOLUME_OVERHEAD_BYTES = 100 * GIB
WEIGHT_DISK_FACTOR = 1.2  # headroom for partial downloads next to complete files

# The node's shared model cache (runtime/nodecache.py): a hostPath the runtime pods mount, owned
# by the runtime's user, on the instance-store RAID0 where the instance has one.
NODE_CACHE_DIR = "/var/lib/modelship/models"
NODE_CACHE_UID = 1000  # operator/render.py RUNTIME_UID
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def node_cache_key(source: str, identity: str = "") -> str:
    """The directory of a model under NODE_CACHE_DIR, for a source URL read by `identity`
    (namespace/service account): readable, and unique by a digest of both, so pods of two
    identities never share weights (neither reading nor poisoning each other's)."""
    readable = _UNSAFE_NAME.sub("-", source.split("://", 1)[-1]).strip("-.")[-60:] or "model"
    digest = hashlib.sha256(f"{identity}\n{source}".encode()).hexdigest()[:12]
    return f"{readable.lstrip('-.')}-{digest}"


CapacityType = Literal["on-demand", "spot"]


class NodePoolError(ValueError):
    """The node pool cannot be rendered as configured; the message names the setting to fix."""


@dataclass(frozen=True)
class NodeGroupRequest:
    """eks-nodegroup mode: what the boto3 code creates or updates (EKS CreateNodegroup shape)."""

    name: str
    instance_types: list[str]
    capacity_type: str  # "ON_DEMAND" | "SPOT"
    ami_type: str  # "AL2023_x86_64_NVIDIA" | "AL2023_x86_64_NEURON"
    disk_size_gib: int
    min_size: int
    max_size: int
    desired_size: int
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[dict[str, str]] = field(default_factory=list)  # {key, value, effect: NO_SCHEDULE}
    # EFA interfaces per node (multi-node placements): the group is launched from a launch
    # template of that name with that many EFA interfaces, in a cluster placement group of that
    # name, in one Availability Zone (operator/nodegroups.py).
    efa_interfaces: int = 0


def capacity_type_of(value: str) -> CapacityType:
    """'on-demand' / 'ON_DEMAND' / 'spot' / 'SPOT' -> Karpenter's spelling."""
    normalized = value.strip().lower().replace("_", "-")
    if normalized in ("on-demand", "ondemand", "od"):
        return "on-demand"
    if normalized == "spot":
        return "spot"
    raise NodePoolError(
        f"placement.capacity_type {value!r} is not a capacity type; use on-demand or spot "
        "(spec.accelerator.capacityType)."
    )


def pool_name(instance_type: str, capacity_type: str, efa: bool = False) -> str:
    """The shared pool's name: `modelship-<instance type>-<od|spot>[-efa]`, a valid DNS label
    and label value, the same for every ModelDeployment on that hardware. Multi-node replicas
    get their own EFA pool, so single-node replicas never hold its EFA-attached nodes."""
    slug = re.sub(r"[^a-z0-9]+", "-", instance_type.strip().lower()).strip("-")
    if not slug:
        raise NodePoolError(f"placement.instance_type {instance_type!r} is empty or not a name.")
    suffix = "od" if capacity_type_of(capacity_type) == "on-demand" else "spot"
    name = f"modelship-{slug}-{suffix}" + ("-efa" if efa else "")
    if len(name) > 63:
        raise NodePoolError(
            f"pool name {name!r} for instance type {instance_type!r} is longer than 63 characters."
        )
    return name


def placement_pool_name(placement: Placement) -> str:
    """The pool a placement's pods run on (an EFA pool when the replica spans nodes)."""
    return pool_name(
        placement.instance_type, placement.capacity_type, efa=placement.efa_interfaces > 0
    )


def accelerator_taint_key(placement: Placement) -> str:
    """The taint accelerated nodes carry so that only pods asking for accelerators land there."""
    return "nvidia.com/gpu" if placement.accelerator_vendor == "nvidia" else "aws.amazon.com/neuron"


@functools.lru_cache(maxsize=8)
def _catalog(path: str | None) -> Catalog:
    return load_catalog(path)


def node_capacity_resource(placement: Placement, config: OperatorConfig) -> tuple[str, int]:
    """The accelerator resource and how much of it one whole node has, as Karpenter counts
    capacity (a pod may use part of a node: 1 of the 4 GPUs of a g6.12xlarge)."""
    resource = RESOURCE_NAMES[placement.accelerator_vendor]
    instance = _catalog(config.catalog_path).get(placement.instance_type)
    if instance is None:
        raise NodePoolError(
            f"placement.instance_type {placement.instance_type!r} is not in the accelerator "
            "catalog, so the node pool's limits cannot be sized; add it to the catalog "
            "(MODELSHIP_CATALOG_PATH)."
        )
    return resource, instance.count


def max_nodes(placement: Placement, max_replicas: int) -> int:
    """Nodes the pool may need for one ModelDeployment: max replicas plus the one replica a
    rolling update surges (maxSurge 1, maxUnavailable 0), each `placement.nodes` nodes."""
    return placement.nodes * (max_replicas + 1)


def root_volume_gib(placement: Placement) -> int:
    """Root EBS volume: the weights (x1.2) or the pod's local-disk need, plus images and caches.

    With instanceStorePolicy RAID0 the local NVMe backs ephemeral storage where the instance has
    it; inf2 (and other types without instance store) keep ephemeral storage on this volume.
    """
    need_bytes = max(
        math.ceil(placement.weight_bytes * WEIGHT_DISK_FACTOR), placement.ephemeral_storage_bytes
    )
    return math.ceil((need_bytes + ROOT_VOLUME_OVERHEAD_BYTES) / GIB)


def _taints(placement: Placement, pool: str) -> list[tuple[str, str]]:
    return [(accelerator_taint_key(placement), "true"), (POOL_LABEL, pool)]


def node_class_name(pool: str, config: OperatorConfig) -> str:
    """The EC2NodeClass the pool uses: the configured shared one, or the pool's own."""
    return config.node_class_name or pool


def karpenter_objects(
    placement: Placement, config: OperatorConfig, max_replicas: int, pool: str | None = None
) -> list[dict[str, Any]]:
    """EC2NodeClass (unless config.node_class_name names an existing one) and NodePool, in apply
    order, for one ModelDeployment's view of the shared pool (or of the pool named `pool`)."""
    pool = pool or placement_pool_name(placement)
    objects: list[dict[str, Any]] = []
    if not config.node_class_name:
        objects.append(_ec2_node_class(placement, config, pool))
    objects.append(_node_pool(placement, config, pool, max_replicas))
    return objects


def _ec2_node_class(placement: Placement, config: OperatorConfig, pool: str) -> dict[str, Any]:
    missing = [
        env
        for env, value in (
            ("MODELSHIP_CLUSTER_NAME", config.cluster_name),
            ("MODELSHIP_NODE_ROLE", config.node_role),
        )
        if not value
    ]
    if missing:
        raise NodePoolError(
            f"{' and '.join(missing)} must be set for node_pool_mode=karpenter (the EC2NodeClass "
            "needs the cluster's discovery tag and the nodes' IAM role), or set "
            "MODELSHIP_NODE_CLASS_NAME to an existing EC2NodeClass."
        )

    def discovery() -> list[dict[str, Any]]:
        return [{"tags": {"karpenter.sh/discovery": config.cluster_name}}]

    return {
        "apiVersion": NODE_CLASS_API,
        "kind": "EC2NodeClass",
        "metadata": {"name": pool, "labels": {**MANAGED_BY, POOL_LABEL: pool}},
        "spec": {
            "role": config.node_role,
            "amiSelectorTerms": [{"alias": AMI_ALIAS}],
            "subnetSelectorTerms": discovery(),
            "securityGroupSelectorTerms": discovery(),
            # Local NVMe (p4de, p5, g6, g6e, trn1) striped into the kubelet's ephemeral storage,
            # which the model emptyDir lives on.
            "instanceStorePolicy": "RAID0",
            "blockDeviceMappings": [
                {
                    "deviceName": ROOT_DEVICE,
                    "rootVolume": True,
                    "ebs": {
                        "volumeSize": f"{root_volume_gib(placement)}Gi",
                        "volumeType": "gp3",
                        # gp3's 125 MiB/s baseline would make image pulls and weight reads crawl.
                        "iops": 16000,
                        "throughput": 1000,
                        "encrypted": True,
                        "deleteOnTermination": True,
                    },
                }
            ],
            **({"userData": node_cache_user_data()} if node_cache_enabled(config) else {}),
            # IMDSv2 with one hop: pods cannot borrow the node's role; they use their own
            # service account's (IRSA / EKS Pod Identity).
            "metadataOptions": {
                "httpEndpoint": "enabled",
                "httpProtocolIPv6": "disabled",
                "httpPutResponseHopLimit": 1,
                "httpTokens": "required",
            },
            "tags": {POOL_LABEL: pool, "app.kubernetes.io/managed-by": "modelship"},
        },
    }


def node_cache_user_data() -> str:
    """EC2NodeClass userData (MIME, which Karpenter merges with its own AL2023 NodeConfig) that
    prepares NODE_CACHE_DIR: a systemd unit ordered after the AMI's setup-local-disks (the
    instanceStorePolicy RAID0 array at /mnt/k8s-disks/0) and before the kubelet bind-mounts a
    directory of the array there, or leaves it on the root volume where the instance has no
    instance store, and hands it to the runtime's user."""
    base = NODE_CACHE_DIR.rsplit("/", 1)[0]
    script = f"""#!/bin/bash
set -euo pipefail
if mountpoint -q /mnt/k8s-disks/0; then
  install -d -m 0755 /mnt/k8s-disks/0/modelship {base}
  mountpoint -q {base} || mount --bind /mnt/k8s-disks/0/modelship {base}
fi
install -d -o {NODE_CACHE_UID} -g {NODE_CACHE_UID} -m 0750 {NODE_CACHE_DIR}
"""
    unit = """[Unit]
Description=modelship node model cache (one weights download per node)
Wants=setup-local-disks.service
After=setup-local-disks.service
Before=kubelet.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/bin/modelship-node-cache

[Install]
WantedBy=multi-user.target
"""
    return f"""MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="MODELSHIP"

--MODELSHIP
Content-Type: text/x-shellscript; charset="us-ascii"

#!/bin/bash
set -euo pipefail
cat > /usr/local/bin/modelship-node-cache <<'SCRIPT'
{script}SCRIPT
chmod 0755 /usr/local/bin/modelship-node-cache
cat > /etc/systemd/system/modelship-node-cache.service <<'UNIT'
{unit}UNIT
systemctl daemon-reload
systemctl enable modelship-node-cache.service
systemctl start --no-block modelship-node-cache.service

--MODELSHIP--
"""


def _efa_label(placement: Placement) -> dict[str, str]:
    # Karpenter attaches EFA interfaces to the nodes it launches for pods that request
    # vpc.amazonaws.com/efa (the AWS EFA device plugin advertises them); an EKS managed node group
    # gets them from its launch template (operator/nodegroups.py). The label lets the device
    # plugin's DaemonSet and people find the pool's EFA nodes.
    return {EFA_LABEL: "true"} if placement.efa_interfaces else {}


def _node_pool(
    placement: Placement, config: OperatorConfig, pool: str, max_replicas: int
) -> dict[str, Any]:
    resource, per_node = node_capacity_resource(placement, config)
    return {
        "apiVersion": KARPENTER_API,
        "kind": "NodePool",
        "metadata": {"name": pool, "labels": {**MANAGED_BY, POOL_LABEL: pool}},
        "spec": {
            "template": {
                "metadata": {"labels": {**MANAGED_BY, POOL_LABEL: pool, **_efa_label(placement)}},
                "spec": {
                    "nodeClassRef": {
                        "group": NODE_CLASS_GROUP,
                        "kind": "EC2NodeClass",
                        "name": node_class_name(pool, config),
                    },
                    "requirements": [
                        {
                            "key": INSTANCE_TYPE_LABEL,
                            "operator": "In",
                            "values": [placement.instance_type],
                        },
                        {
                            "key": "karpenter.sh/capacity-type",
                            "operator": "In",
                            "values": [capacity_type_of(placement.capacity_type)],
                        },
                        {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]},
                        {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
                    ],
                    "taints": [
                        {"key": key, "value": value, "effect": "NoSchedule"}
                        for key, value in _taints(placement, pool)
                    ],
                    # Nodes are replaced monthly (AMI and kernel fixes), one at a time, PDBs honoured.
                    "expireAfter": "720h",
                },
            },
            # Limits bound what this pool may launch: the accelerators of every node at max
            # replicas (+1 surge). Summed over ModelDeployments by merge_node_pool_objects.
            "limits": {resource: str(per_node * max_nodes(placement, max_replicas))},
            "disruption": {
                # Only empty nodes are consolidated: a serving pod is never evicted to repack.
                "consolidationPolicy": "WhenEmpty",
                "consolidateAfter": "10m",
                # At most one node of the pool is disrupted (drift, expiry, emptiness) at a time.
                "budgets": [{"nodes": "1"}],
            },
        },
    }


def node_group_request(
    placement: Placement, config: OperatorConfig, min_replicas: int, max_replicas: int
) -> NodeGroupRequest:
    """eks-nodegroup mode: the managed node group for one ModelDeployment's view of the pool."""
    pool = placement_pool_name(placement)
    return NodeGroupRequest(
        name=pool,
        instance_types=[placement.instance_type],
        capacity_type="ON_DEMAND"
        if capacity_type_of(placement.capacity_type) == "on-demand"
        else "SPOT",
        ami_type=(
            "AL2023_x86_64_NVIDIA"
            if placement.accelerator_vendor == "nvidia"
            else "AL2023_x86_64_NEURON"
        ),
        disk_size_gib=root_volume_gib(placement),
        min_size=0,
        max_size=max_nodes(placement, max_replicas),
        desired_size=placement.nodes * min_replicas,
        labels={POOL_LABEL: pool, **_efa_label(placement)},
        taints=[
            {"key": key, "value": value, "effect": "NO_SCHEDULE"}
            for key, value in _taints(placement, pool)
        ],
        efa_interfaces=placement.efa_interfaces,
    )


def _quantity(value: Any) -> int:
    text = str(value)
    if not text.isdigit():
        raise NodePoolError(f"NodePool limit {value!r} is not a whole count; cannot add it up.")
    return int(text)


def merge_node_pool_objects(renders: Iterable[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Combine the pool objects several ModelDeployments rendered into one set to apply.

    Objects with the same kind and name are one shared object: NodePool limits add up (each
    ModelDeployment asked for its own maximum), the EC2NodeClass root volume is the largest
    asked for. Order of first appearance is kept (EC2NodeClass before NodePool).
    """
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for objects in renders:
        for obj in objects:
            key = (obj["kind"], obj["metadata"]["name"])
            if key not in merged:
                merged[key] = copy.deepcopy(obj)
                continue
            current = merged[key]
            if obj["kind"] == "NodePool":
                limits = current["spec"].setdefault("limits", {})
                for resource, amount in obj["spec"].get("limits", {}).items():
                    limits[resource] = str(_quantity(limits.get(resource, 0)) + _quantity(amount))
            elif obj["kind"] == "EC2NodeClass":
                for mine, theirs in zip(
                    current["spec"].get("blockDeviceMappings", []),
                    obj["spec"].get("blockDeviceMappings", []),
                    strict=False,
                ):
                    mine_gib = int(str(mine["ebs"]["volumeSize"]).removesuffix("Gi"))
                    theirs_gib = int(str(theirs["ebs"]["volumeSize"]).removesuffix("Gi"))
                    mine["ebs"]["volumeSize"] = f"{max(mine_gib, theirs_gib)}Gi"
    return list(merged.values())


def merge_node_group_requests(requests: Iterable[NodeGroupRequest]) -> list[NodeGroupRequest]:
    """Combine node group requests by name: sizes add up, the disk is the largest asked for."""
    merged: dict[str, NodeGroupRequest] = {}
    for request in requests:
        current = merged.get(request.name)
        if current is None:
            merged[request.name] = request
            continue
        merged[request.name] = replace(
            current,
            max_size=current.max_size + request.max_size,
            desired_size=current.desired_size + request.desired_size,
            disk_size_gib=max(current.disk_size_gib, request.disk_size_gib),
        )
    return list(merged.values())
