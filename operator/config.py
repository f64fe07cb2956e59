"""Operator configuration: environment variables (set from the Helm chart's ConfigMap), validated
once at start-up so that a bad value stops the operator with a clear message instead of
surfacing later in a reconcile."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

NodePoolMode = Literal["karpenter", "eks-nodegroup", "none"]
AutoscalerMode = Literal["keda", "hpa", "none"]
NodeCacheMode = Literal["auto", "enabled", "disabled"]

ENV_PREFIX = "MODELSHIP_"


class ConfigError(ValueError):
    pass


class OperatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    node_pool_mode: NodePoolMode = Field(
        "karpenter",
        description="karpenter (NodePool + EC2NodeClass), eks-nodegroup (boto3) or none.",
    )
    autoscaler: AutoscalerMode = Field("keda", description="keda, hpa or none.")
    runtime_image: str = Field(
        "ghcr.io/modelship/runtime:0.1.0", description="Runtime image for NVIDIA GPUs."
    )
    neuron_runtime_image: str = Field(
        "ghcr.io/modelship/runtime-neuron:0.1.0",
        description="Runtime image for Inferentia2 and Trainium.",
    )
    catalog_path: str | None = Field(
        None, description="Accelerator catalog override (YAML), e.g. a mounted ConfigMap."
    )
    cluster_name: str = Field(
        "", description="EKS cluster name (Karpenter discovery, node groups)."
    )
    node_role: str = Field(
        "", description="IAM role of the nodes (EC2NodeClass role, node group nodeRole ARN)."
    )
    subnet_ids: tuple[str, ...] = Field(
        (), description="Subnets for EKS managed node groups (eks-nodegroup mode)."
    )
    efa_security_group_ids: tuple[str, ...] = Field(
        (),
        description="Security groups of the EFA interfaces of multi-node node groups "
        "(eks-nodegroup mode); empty: the EKS cluster security group. One must allow all traffic "
        "to and from itself (EFA's requirement).",
    )
    node_class_name: str = Field(
        "", description="Use this existing EC2NodeClass instead of rendering one per pool."
    )
    service_account: str = Field(
        "modelship-runtime",
        description="Service account of runtime pods; IRSA / Pod Identity grants it S3 read.",
    )
    pod_monitor: bool = Field(True, description="Render a PodMonitor (prometheus-operator).")
    namespaces: tuple[str, ...] = Field((), description="Namespaces to watch; empty means all.")
    aws_region: str = Field("us-east-1", description="Region for the EKS API (node groups).")
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint override for S3-compatible stores."
    )
    resync_seconds: float = Field(
        300,
        gt=0,
        description="Safety-net resync: how often every ModelDeployment's children are re-applied "
        "and its status refreshed. Changes to children, pods and node pools act at once (watches); "
        "this only catches what a watch could miss.",
    )
    lease_namespace: str = Field(
        "",
        description="Namespace of the leader-election Lease; empty: the operator pod's own "
        "namespace (POD_NAMESPACE, else the service account's), else modelship-system.",
    )
    lease_name: str = Field("modelship-operator", description="Name of the leader-election Lease.")
    lease_seconds: float = Field(
        15,
        ge=3,
        description="Leader-election Lease duration: how soon a standby replica takes over from a "
        "leader that died without releasing the Lease.",
    )
    prometheus_url: str = Field(
        "http://prometheus-operated.monitoring.svc.cluster.local:9090",
        description="Prometheus that KEDA's triggers query for vLLM's queue and KV-cache metrics.",
    )
    node_cache: NodeCacheMode = Field(
        "auto",
        description="One weights download per node, shared by the pods of a model (a hostPath on "
        "the instance store). auto: on with the EC2NodeClass modelship renders, which prepares "
        "the directory; enabled: the nodes are prepared another way; disabled: a download per pod.",
    )
    activator_url: str = Field(
        "http://modelship-activator.modelship-system.svc.cluster.local:8082",
        description="Base URL of the operator's activator Service (the chart sets it): clients of "
        "a ModelDeployment that scales to zero send requests there, and KEDA wakes it on them.",
    )
    activator_port: int = Field(
        8082, ge=0, le=65535, description="Port the activator listens on; 0 turns it off."
    )
    activator_hold_seconds: float = Field(
        1800,
        gt=0,
        description="How long the activator holds a request while its model scales up from zero.",
    )
    allow_file_sources: bool = Field(
        False,
        description="Accept file:// model sources. Off by default: a file:// source renders a "
        "hostPath of that directory and makes the operator read its own file system, so anyone "
        "allowed to create a ModelDeployment could read any host directory. Turn on only for "
        "local development and the demo (the CLI always accepts file://).",
    )
    activator_max_held_per_model: int = Field(
        256, ge=1, description="Most requests the activator holds for one waking model (then 429)."
    )
    activator_max_held_total: int = Field(
        1024, ge=1, description="Most requests the activator holds in all (then 503)."
    )
    activator_max_held_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="Most request-body bytes the activator holds in all (then 503); size the "
        "activator's memory limit above it.",
    )
    activator_sync_seconds: float = Field(
        5, gt=0, description="How often the activator re-lists the ModelDeployments it serves."
    )
    neuron_cache_uri: str | None = Field(
        None,
        description="Where Neuron compiled artifacts are cached (s3://... or a volume path). An "
        "s3:// prefix is shared by every pod, so a model whose serving node has too little host "
        "memory to compile is compiled once by a Job on a larger instance (operator/compilejob.py).",
    )


# The Helm value behind each setting that start-up checks, to name in errors.
_HELM_VALUES = {
    "cluster_name": "nodePools.clusterName",
    "node_role": "nodePools.nodeRole",
    "subnet_ids": "nodePools.subnetIds",
    "efa_security_group_ids": "nodePools.efaSecurityGroupIds",
}


def check_operator_config(config: OperatorConfig) -> None:
    """What the running operator needs beyond valid values: raise ConfigError at start-up naming
    the variable, its Helm value and the fix, rather than failing every ModelDeployment later."""
    needed: list[str] = []
    if config.node_pool_mode == "karpenter" and not config.node_class_name:
        needed = ["cluster_name", "node_role"]  # the EC2NodeClass modelship renders needs them
    elif config.node_pool_mode == "eks-nodegroup":
        needed = ["cluster_name", "node_role", "subnet_ids"]
    missing = [name for name in needed if not getattr(config, name)]
    if missing:
        names = ", ".join(
            f"{ENV_PREFIX}{name.upper()} (Helm: {_HELM_VALUES[name]})" for name in missing
        )
        raise ConfigError(
            f"{names} must be set for node pool mode {config.node_pool_mode}: set them in the "
            "ConfigMap modelship-config (or the chart's values), or use an existing EC2NodeClass "
            "(MODELSHIP_NODE_CLASS_NAME, Helm: nodePools.nodeClassName), or node pool mode none."
        )


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


_LIST_FIELDS = {"subnet_ids", "efa_security_group_ids", "namespaces"}


def load_config(env: Mapping[str, str] | None = None) -> OperatorConfig:
    """Read MODELSHIP_* variables; raise ConfigError naming the variable and the fix."""
    env = os.environ if env is None else env
    raw: dict[str, object] = {}
    for name in OperatorConfig.model_fields:
        key = ENV_PREFIX + name.upper()
        if key in env and env[key] != "":
            raw[name] = _split(env[key]) if name in _LIST_FIELDS else env[key]
    try:
        return OperatorConfig.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        key = ENV_PREFIX + str(first["loc"][0]).upper()
        raise ConfigError(f"{key}: {first['msg']} (got {first.get('input')!r})") from None


def shared_neuron_cache(uri: str | None) -> bool:
    """Whether a Neuron compile cache at `uri` is shared between pods on different nodes: an
    s3:// prefix. A path is inside each pod (render mounts no volume for it)."""
    return bool(uri and uri.startswith("s3://"))


def node_cache_enabled(config: OperatorConfig) -> bool:
    """Whether runtime pods share the node's model cache (operator/nodepool.py NODE_CACHE_DIR)."""
    if config.node_cache == "auto":
        return config.node_pool_mode == "karpenter" and not config.node_class_name
    return config.node_cache == "enabled"
