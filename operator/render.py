"""Render: (ModelDeployment, Placement, operator config) -> every Kubernetes object it needs.

A pure function. The CLI's `modelship render` and the operator call the same `render`, so what a
user previews is what the cluster gets. Objects, in apply order:

    node pool (cluster-scoped, shared, no owner)   Karpenter EC2NodeClass + NodePool
    runtime workload                               Deployment (1 node) | LeaderWorkerSet (>1 node)
    Service                                        http://<name>.<namespace>.svc.cluster.local:8000/v1
    PodDisruptionBudget (when there can be more than one replica)
    autoscaler (when replicas can change)          KEDA ScaledObject | HorizontalPodAutoscaler
    PodMonitor (when config.pod_monitor)

In eks-nodegroup mode the node pool is a NodeGroupRequest for the boto3 code instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .api import API_VERSION, KIND, ModelDeploymentSpec
from .config import OperatorConfig, node_cache_enabled
from .nodepool import (
    INSTANCE_TYPE_LABEL,
    NODE_CACHE_DIR,
    POOL_LABEL,
    NodeGroupRequest,
    NodePoolError,
    accelerator_taint_key,
    karpenter_objects,
    node_cache_key,
    node_group_request,
    placement_pool_name,
)
from .plan import Placement
from .sizing import EFA_RESOURCE, EPHEMERAL_BASE_BYTES
from .source import LocalSource, S3Source, VolumeSource
from .vllm_options import NO_TELEMETRY_ENV
from .vllm_options import values as vllm_values

__all__ = [
    "ModelDeploymentRef",
    "NodeGroupRequest",
    "RenderError",
    "Rendered",
    "endpoint_url",
    "render",
    "render_documents",
]

GIB = 1024**3

HTTP_PORT = 8000  # vLLM's OpenAI API, /health and its own /metrics
METRICS_PORT = 9400  # the runtime's own metrics (download progress, phases)
MODELS_DIR = "/models"
MOUNT_ROOT = "/mnt/model-source"
CACHE_DIR = "/var/cache/modelship"
RUNTIME_UID = 1000

APP_NAME = "modelship-runtime"
MD_LABEL = "modelship.dev/model-deployment"
ROLE_LABEL = "modelship.dev/role"
GENERATION_ANNOTATION = "modelship.dev/generation"

# Kubernetes waits this long after SIGTERM: in-flight generations (minutes for long outputs at
# worst, seconds typically) finish while the endpoint no longer receives new requests.
TERMINATION_GRACE_SECONDS = 120
PRE_STOP_SLEEP_SECONDS = 15  # endpoints and kube-proxy rules drop the pod before vLLM stops
STOP_MARGIN_SECONDS = 10  # the runtime kills vLLM this long before the kubelet would
STARTUP_PERIOD_SECONDS = 10
STARTUP_MARGIN_SECONDS = 300  # image pull and scheduling noise on top of twice the estimate
KV_CACHE_SCALE_THRESHOLD = "0.85"


class RenderError(ValueError):
    """A ModelDeployment that cannot be rendered as configured; names the field and the fix."""


@dataclass(frozen=True)
class ModelDeploymentRef:
    """What render needs of the ModelDeployment custom object."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec: ModelDeploymentSpec


@dataclass(frozen=True)
class Rendered:
    children: list[dict[str, Any]]  # namespaced, owned by the ModelDeployment
    node_pool_objects: list[dict[str, Any]]  # cluster-scoped and shared: no owner
    node_group: NodeGroupRequest | None
    pool_name: str  # same for every ModelDeployment on the same hardware


def endpoint_url(md: ModelDeploymentRef, config: OperatorConfig) -> str:
    """The in-cluster OpenAI-compatible base URL of a ModelDeployment: its Service, or the
    operator's activator when it scales to zero (the Service refuses connections at zero)."""
    if wakes_through_activator(md, config):
        return f"{config.activator_url.rstrip('/')}/models/{md.namespace}/{md.name}/v1"
    return f"http://{md.name}.{md.namespace}.svc.cluster.local:{HTTP_PORT}/v1"


def wakes_through_activator(md: ModelDeploymentRef, config: OperatorConfig) -> bool:
    """Scale to zero with KEDA: requests held by the activator are what wakes the model."""
    return replica_bounds(md)[0] == 0 and config.autoscaler == "keda"


def served_model_name(md: ModelDeploymentRef) -> str:
    """The model name clients send (and vLLM's `model_name` metric label)."""
    return md.spec.model.name or md.name


def replica_bounds(md: ModelDeploymentRef) -> tuple[int, int]:
    """(min, max) replicas; max defaults to min, and to 1 when min is 0 (scale to zero)."""
    low = md.spec.replicas.min
    high = md.spec.replicas.max if md.spec.replicas.max is not None else max(low, 1)
    return low, high


def autoscaled(md: ModelDeploymentRef) -> bool:
    low, high = replica_bounds(md)
    return high > low or low == 0


def labels(md: ModelDeploymentRef) -> dict[str, str]:
    """The labels every child (and every runtime pod) carries."""
    return {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/instance": md.name,
        "app.kubernetes.io/managed-by": "modelship",
        MD_LABEL: md.name,
    }


def selector_labels(md: ModelDeploymentRef) -> dict[str, str]:
    """The (immutable) pod selector of the workload."""
    return {"app.kubernetes.io/name": APP_NAME, MD_LABEL: md.name}


def owner_reference(md: ModelDeploymentRef) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": md.name,
        "uid": md.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(md: ModelDeploymentRef, name: str | None = None) -> dict[str, Any]:
    return {
        "name": name or md.name,
        "namespace": md.namespace,
        "labels": labels(md),
        "annotations": {GENERATION_ANNOTATION: str(md.generation)},
        "ownerReferences": [owner_reference(md)],
    }


def _check_names(md: ModelDeploymentRef, placement: Placement) -> None:
    # Services are DNS labels (63); LWS pods are <name>-lws-<group>-<index> and are hostnames.
    limit = 63 if placement.nodes == 1 else 52
    if len(md.name) > limit:
        raise RenderError(
            f"metadata.name {md.name!r} is {len(md.name)} characters; a ModelDeployment "
            f"{'spanning nodes ' if placement.nodes > 1 else ''}may have at most {limit} "
            "(it names a Service and pods); use a shorter name."
        )
    if placement.nodes < 1 or placement.resource_count < 1:
        raise RenderError(
            f"placement for {md.name!r}: nodes ({placement.nodes}) and resource_count "
            f"({placement.resource_count}) must be at least 1."
        )


def _runtime_image(md: ModelDeploymentRef, placement: Placement, config: OperatorConfig) -> str:
    if md.spec.serving.image:
        return md.spec.serving.image
    return (
        config.runtime_image
        if placement.accelerator_vendor == "nvidia"
        else config.neuron_runtime_image
    )


def _device(placement: Placement) -> str:
    return "cuda" if placement.accelerator_vendor == "nvidia" else "neuron"


def _copy_to_local(md: ModelDeploymentRef) -> bool:
    source = md.spec.model.source
    if not isinstance(source, VolumeSource):
        return False
    if md.spec.model.copy_to_local_disk is not None:
        return md.spec.model.copy_to_local_disk
    # EFS random reads are slow (safetensors are mmapped); FSx for Lustre serves them fast.
    return source.scheme == "efs"


def _local_models(md: ModelDeploymentRef) -> bool:
    """Whether the weights are written to the node's disk (S3, or a volume copied locally)."""
    return isinstance(md.spec.model.source, S3Source) or _copy_to_local(md)


def _node_cache(md: ModelDeploymentRef, placement: Placement, config: OperatorConfig) -> bool:
    """Whether the pod shares the node's model cache instead of downloading its own copy (not
    for weights streamed from S3 on a node without instance store: see `weights_mode`)."""
    if _streamable(md, placement) and not has_instance_store(placement.instance_type):
        return False
    return _local_models(md) and node_cache_enabled(config)


# Accelerated instance families with local NVMe instance store (AWS instance-type docs; the
# node pool stripes it into the node's disk, nodepool.py). Anything else, inf2 included, is
# treated as EBS-only.
INSTANCE_STORE_FAMILIES = frozenset(
    {
        "g4dn",
        "g5",
        "g6",
        "g6e",
        "g7e",
        "gr6",
        "p4d",
        "p4de",
        "p5",
        "p5e",
        "p5en",
        "p6-b200",
        "p6-b300",
        "trn1",
        "trn1n",
        "trn2",
    }
)


def has_instance_store(instance_type: str) -> bool:
    """Whether nodes of `instance_type` (e.g. "g6e.12xlarge") have local NVMe instance store."""
    return instance_type.split(".", 1)[0] in INSTANCE_STORE_FAMILIES


def _streamable(md: ModelDeploymentRef, placement: Placement) -> bool:
    """Whether vLLM's runai_streamer can load these weights: s3:// safetensors (no pickles), an
    NVIDIA engine (Neuron compiles from a local checkpoint), one node (workers of a multi-node
    replica fetch the same weights before joining Ray, as runtime/main.py's `auto` lands them)."""
    return (
        isinstance(md.spec.model.source, S3Source)
        and not md.spec.model.trust_pickle
        and placement.accelerator_vendor == "nvidia"
        and placement.nodes == 1
    )


def weights_mode(md: ModelDeploymentRef, placement: Placement, config: OperatorConfig) -> str:
    """The runtime's `--weights`: `land` (fetch to disk, vLLM loads from there) or `stream` (vLLM
    reads the safetensors from S3 straight into memory).

    Land only where a landed copy pays for itself: the node cache on local NVMe instance store,
    which serves later pods on the node. Stream s3:// weights where nothing would reuse them (no
    node cache) or the node has no instance store (EBS only: no node cache there for streamable
    weights). FSx/EFS/file sources, pickles, Neuron and multi-node always land (`_streamable`).
    """
    if not _streamable(md, placement) or _node_cache(md, placement, config):
        return "land"
    return "stream"


def runtime_args(
    md: ModelDeploymentRef,
    placement: Placement,
    config: OperatorConfig,
    role: str | None = None,
) -> list[str]:
    """The `modelship-runtime` command line; role is None (one node), "leader" or "worker"."""
    spec = md.spec
    source = spec.model.source
    # With the node cache the pod mounts only its model's directory, MODELS_DIR/<key>.
    model_dir = (
        ["--node-cache", MODELS_DIR, "--node-cache-key", node_cache_dir_name(md, config)]
        if _node_cache(md, placement, config)
        else ["--model-dir", f"{MODELS_DIR}/{md.name}"]
    )
    args = [
        "--source",
        spec.model.uri,
        *model_dir,
        "--served-model-name",
        served_model_name(md),
        "--port",
        str(HTTP_PORT),
        "--metrics-port",
        str(METRICS_PORT),
        "--weights",
        weights_mode(md, placement, config),
    ]
    if spec.model.trust_pickle:
        args.append("--trust-pickle")
    if _copy_to_local(md):
        args.append("--copy-to-local")
    if isinstance(source, VolumeSource):
        args += ["--mount-root", MOUNT_ROOT]
    if placement.accelerator_vendor != "nvidia" and config.neuron_cache_uri:
        args += ["--neuron-cache", config.neuron_cache_uri]
        if placement.compile_instance_type is not None:
            # This node has too little host memory to compile: it serves only what the compile
            # Job (operator/compilejob.py) published, and fails clearly on a miss.
            args.append("--neuron-cache-required")
    args += [
        "--device",
        _device(placement),
        # The runtime's own limits, matched to what the kubelet allows (startup probe, grace).
        "--ready-timeout-seconds",
        str(_startup_allowance_seconds(placement)),
        "--stop-grace-seconds",
        str(TERMINATION_GRACE_SECONDS - PRE_STOP_SLEEP_SECONDS - STOP_MARGIN_SECONDS),
        "--predicted-kv-cache-tokens",
        str(placement.kv_cache_tokens),
    ]
    if role is not None:
        # Multi-node: the leader starts the Ray head and waits for `nodes` members before vLLM;
        # workers fetch the same weights, then join the leader's Ray cluster.
        args += ["--role", role, "--nodes", str(placement.nodes)]
        if role == "worker":
            args += ["--leader-address", "$(LWS_LEADER_ADDRESS)"]
    # The user's arguments first: vLLM keeps the last value of a repeated option, so the plan's
    # memory settings win even if a user argument got past the API's checks.
    engine_args = [*spec.serving.engine_args, *placement.engine_args]
    if role is not None and "distributed_executor_backend" not in vllm_values(engine_args):
        engine_args += ["--distributed-executor-backend", "ray"]
    return [*args, "--", *engine_args]


def _shm_bytes(placement: Placement) -> int:
    # NCCL and vLLM's worker processes exchange through /dev/shm: 1 GiB + 1 GiB per local rank.
    world_size = placement.tensor_parallel_size * placement.pipeline_parallel_size
    local_ranks = max(1, math.ceil(world_size / placement.nodes))
    return min(1 + local_ranks, 16) * GIB


def _quantity_gib(value_bytes: int) -> str:
    return f"{math.ceil(value_bytes / GIB)}Gi"


def _pod_ephemeral_storage_bytes(
    md: ModelDeploymentRef, placement: Placement, config: OperatorConfig
) -> int:
    # Weights in the node cache (a hostPath) are not the pod's ephemeral storage.
    if _node_cache(md, placement, config):
        return min(placement.ephemeral_storage_bytes, EPHEMERAL_BASE_BYTES)
    return placement.ephemeral_storage_bytes


def node_cache_dir_name(md: ModelDeploymentRef, config: OperatorConfig) -> str:
    """The model's directory under the node cache: per source, namespace and service account, so
    two tenants never share (read or overwrite) each other's cached weights."""
    return node_cache_key(md.spec.model.uri, f"{md.namespace}/{config.service_account}")


def _models_mount_path(md: ModelDeploymentRef, placement: Placement, config: OperatorConfig) -> str:
    if _node_cache(md, placement, config):
        return f"{MODELS_DIR}/{node_cache_dir_name(md, config)}"
    return MODELS_DIR


NODE_CACHE_ROOT_MOUNT = "/node-cache"


def _node_cache_init_container(
    md: ModelDeploymentRef, placement: Placement, config: OperatorConfig
) -> dict[str, Any]:
    """Creates the model's directory in the node cache and evicts unused models for room. It
    alone mounts the whole cache, so it runs the operator's runtime image, never the user's
    spec.serving.image, and no user code."""
    image = (
        config.runtime_image
        if placement.accelerator_vendor == "nvidia"
        else config.neuron_runtime_image
    )
    return {
        "name": "node-cache",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python3", "-m", "modelship.runtime.nodecache"],
        "args": [
            "--root",
            NODE_CACHE_ROOT_MOUNT,
            "--key",
            node_cache_dir_name(md, config),
            "--needed-bytes",
            str(placement.weight_bytes),
        ],
        "resources": {
            "requests": {"cpu": "100m", "memory": "256Mi"},
            "limits": {"memory": "256Mi"},
        },
        "volumeMounts": [{"name": "node-cache-root", "mountPath": NODE_CACHE_ROOT_MOUNT}],
        "securityContext": _container_security_context(),
    }


def _container_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUNTIME_UID,
        "runAsGroup": RUNTIME_UID,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
        # vLLM, PyTorch, Triton and the Neuron runtime write temp files in places the image
        # does not make configurable (/tmp, ~/.config); caches go to the `cache` volume.
        "readOnlyRootFilesystem": False,
    }


def _models_volume(
    md: ModelDeploymentRef, placement: Placement, config: OperatorConfig
) -> dict[str, Any]:
    if _node_cache(md, placement, config):
        # One download per node (runtime/nodecache.py), in this model's own directory only: the
        # rest of the cache (other namespaces' weights) is never visible to the pod.
        path = f"{NODE_CACHE_DIR}/{node_cache_dir_name(md, config)}"
        return {"name": "models", "hostPath": {"path": path, "type": "Directory"}}
    # Weights land on the node's disk (instance-store NVMe where the pool has it).
    local_models = _quantity_gib(placement.ephemeral_storage_bytes)
    return {"name": "models", "emptyDir": {"sizeLimit": local_models}}


def _volumes_and_mounts(
    md: ModelDeploymentRef, placement: Placement, config: OperatorConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    source = md.spec.model.source
    volumes: list[dict[str, Any]] = [
        {
            "name": "dshm",
            "emptyDir": {"medium": "Memory", "sizeLimit": _quantity_gib(_shm_bytes(placement))},
        },
        # torch.compile, Triton and Neuron compile caches: off the container's writable layer.
        {"name": "cache", "emptyDir": {"sizeLimit": "20Gi"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "cache", "mountPath": CACHE_DIR},
    ]
    if isinstance(source, S3Source):
        volumes.append(_models_volume(md, placement, config))
        mounts.append({"name": "models", "mountPath": _models_mount_path(md, placement, config)})
    elif isinstance(source, VolumeSource):
        volumes.append(
            {
                "name": "model-source",
                "persistentVolumeClaim": {"claimName": source.claim, "readOnly": True},
            }
        )
        mounts.append({"name": "model-source", "mountPath": MOUNT_ROOT, "readOnly": True})
        if _copy_to_local(md):
            volumes.append(_models_volume(md, placement, config))
            mounts.append(
                {"name": "models", "mountPath": _models_mount_path(md, placement, config)}
            )
    elif isinstance(source, LocalSource):
        # file:// is for single-node development clusters (kind, minikube): the node's directory,
        # read-only, at the same path, so the runtime reads it in place.
        volumes.append(
            {"name": "model-source", "hostPath": {"path": source.path, "type": "Directory"}}
        )
        mounts.append({"name": "model-source", "mountPath": source.path, "readOnly": True})
    return volumes, mounts


def _env(config: OperatorConfig) -> list[dict[str, Any]]:
    # No AWS keys, ever: S3 access comes from the service account's role (IRSA / Pod Identity).
    env: list[dict[str, Any]] = [
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        # Nodes make no calls home: vLLM's usage statistics off (the runtime sets them too).
        *({"name": name, "value": value} for name, value in NO_TELEMETRY_ENV.items()),
    ]
    if config.s3_endpoint_url:
        env.append({"name": "AWS_ENDPOINT_URL", "value": config.s3_endpoint_url})
    return env


def _startup_allowance_seconds(placement: Placement) -> int:
    """Twice the predicted node-ready-to-serving time, plus a margin."""
    return 2 * placement.estimated_ready_seconds + STARTUP_MARGIN_SECONDS


def _startup_failure_threshold(placement: Placement) -> int:
    """Startup probe attempts covering the whole startup allowance."""
    return max(3, math.ceil(_startup_allowance_seconds(placement) / STARTUP_PERIOD_SECONDS))


def _health() -> dict[str, Any]:
    return {"path": "/health", "port": "http"}


def _http_probes(placement: Placement) -> dict[str, Any]:
    return {
        # The runtime downloads, verifies and (on Neuron) compiles before /health answers; the
        # startup probe holds liveness off for that whole time.
        "startupProbe": {
            "httpGet": _health(),
            "periodSeconds": STARTUP_PERIOD_SECONDS,
            "timeoutSeconds": 5,
            "failureThreshold": _startup_failure_threshold(placement),
        },
        "readinessProbe": {
            "httpGet": _health(),
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        # A busy engine can be slow to answer; a minute of failures means it is wedged.
        "livenessProbe": {
            "httpGet": _health(),
            "periodSeconds": 15,
            "timeoutSeconds": 10,
            "failureThreshold": 4,
        },
    }


def _container(
    md: ModelDeploymentRef, placement: Placement, config: OperatorConfig, role: str | None
) -> dict[str, Any]:
    _, mounts = _volumes_and_mounts(md, placement, config)
    accelerators = {placement.resource_name: str(placement.resource_count)}
    if placement.efa_interfaces:
        # Multi-node replicas talk over EFA (NCCL / Neuron collectives through libfabric).
        accelerators[EFA_RESOURCE] = str(placement.efa_interfaces)
    container: dict[str, Any] = {
        "name": "runtime",
        "image": _runtime_image(md, placement, config),
        "imagePullPolicy": "IfNotPresent",
        "command": ["modelship-runtime"],
        "args": runtime_args(md, placement, config, role),
        "env": _env(config),
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "resources": {
            "requests": {
                **accelerators,
                "cpu": str(placement.cpu_request),
                "memory": _quantity_gib(placement.memory_request_bytes),
                "ephemeral-storage": _quantity_gib(
                    _pod_ephemeral_storage_bytes(md, placement, config)
                ),
            },
            "limits": dict(accelerators),
        },
        "volumeMounts": mounts,
        "securityContext": _container_security_context(),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_SLEEP_SECONDS}}},
    }
    if role != "worker":
        container.update(_http_probes(placement))
    return container


def _pod_spec(
    md: ModelDeploymentRef,
    placement: Placement,
    config: OperatorConfig,
    pool: str,
    role: str | None,
) -> dict[str, Any]:
    volumes, _ = _volumes_and_mounts(md, placement, config)
    init_containers: list[dict[str, Any]] = []
    if _node_cache(md, placement, config):
        volumes.append(
            {"name": "node-cache-root", "hostPath": {"path": NODE_CACHE_DIR, "type": "Directory"}}
        )
        init_containers.append(_node_cache_init_container(md, placement, config))
    node_selector = {INSTANCE_TYPE_LABEL: placement.instance_type}
    tolerations: list[dict[str, Any]] = [
        {"key": accelerator_taint_key(placement), "operator": "Exists", "effect": "NoSchedule"}
    ]
    if config.node_pool_mode != "none":
        node_selector[POOL_LABEL] = pool
        tolerations.append(
            {"key": POOL_LABEL, "operator": "Equal", "value": pool, "effect": "NoSchedule"}
        )
    return {
        "serviceAccountName": config.service_account,
        # The runtime never calls the Kubernetes API; IRSA and Pod Identity inject their own token.
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNTIME_UID,
            "runAsGroup": RUNTIME_UID,
            "fsGroup": RUNTIME_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "nodeSelector": node_selector,
        "tolerations": tolerations,
        **({"initContainers": init_containers} if init_containers else {}),
        "containers": [_container(md, placement, config, role)],
        "volumes": volumes,
    }


def _pod_template(
    md: ModelDeploymentRef,
    placement: Placement,
    config: OperatorConfig,
    pool: str,
    role: str | None,
) -> dict[str, Any]:
    pod_labels = labels(md)
    if role is not None:
        pod_labels[ROLE_LABEL] = role
    return {
        "metadata": {"labels": pod_labels},
        "spec": _pod_spec(md, placement, config, pool, role),
    }


def workload_ref(md: ModelDeploymentRef, placement: Placement) -> dict[str, str]:
    """apiVersion, kind and name of the runtime workload (the autoscaler's scale target)."""
    if placement.nodes == 1:
        return {"apiVersion": "apps/v1", "kind": "Deployment", "name": md.name}
    # Not md.name: LWS creates a headless Service named after itself, which would collide with
    # the ClusterIP Service that carries the endpoint name.
    return {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "name": f"{md.name}-lws",
    }


def _replicas_field(md: ModelDeploymentRef, config: OperatorConfig) -> dict[str, int]:
    low, _ = replica_bounds(md)
    if not autoscaled(md):
        return {"replicas": low}
    if config.autoscaler == "none":
        return {"replicas": max(low, 1)}  # nothing would ever scale it up from zero
    # Autoscaled: leave replicas unset so server-side apply never fights the autoscaler over it.
    return {}


def _deployment(
    md: ModelDeploymentRef, placement: Placement, config: OperatorConfig, pool: str
) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(md),
        "spec": {
            **_replicas_field(md, config),
            "selector": {"matchLabels": selector_labels(md)},
            # A new pod (on a new node if need be) serves before an old one goes: a bad edit
            # never takes down what serves.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            # Weights loading can take many minutes; don't call a rollout stuck before that.
            "progressDeadlineSeconds": max(
                600, _startup_failure_threshold(placement) * STARTUP_PERIOD_SECONDS
            ),
            "revisionHistoryLimit": 3,
            "template": _pod_template(md, placement, config, pool, None),
        },
    }


def _leader_worker_set(
    md: ModelDeploymentRef, placement: Placement, config: OperatorConfig, pool: str
) -> dict[str, Any]:
    return {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": _metadata(md, workload_ref(md, placement)["name"]),
        "spec": {
            **_replicas_field(md, config),
            "startupPolicy": "LeaderCreated",
            "rolloutStrategy": {
                "type": "RollingUpdate",
                "rollingUpdateConfiguration": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "leaderWorkerTemplate": {
                "size": placement.nodes,
                # One lost member breaks the Ray cluster: restart the whole group together.
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": _pod_template(md, placement, config, pool, "leader"),
                "workerTemplate": _pod_template(md, placement, config, pool, "worker"),
            },
        },
    }


def _service(md: ModelDeploymentRef, placement: Placement) -> dict[str, Any]:
    selector = selector_labels(md)
    if placement.nodes > 1:
        selector[ROLE_LABEL] = "leader"  # only the leader serves HTTP
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(md),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def _pod_disruption_budget(md: ModelDeploymentRef, placement: Placement) -> dict[str, Any]:
    low, _ = replica_bounds(md)
    budget: dict[str, int]
    if placement.nodes == 1 and low > 1:
        budget = {"minAvailable": low - 1}
    else:
        # One pod at a time; for LeaderWorkerSets one pod is one whole group.
        budget = {"maxUnavailable": 1}
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(md),
        "spec": {**budget, "selector": {"matchLabels": selector_labels(md)}},
    }


def _scale_down_window_seconds(placement: Placement) -> int:
    # A replica that waits for a GPU node and its weights looks idle; don't scale it away.
    return min(3600, max(600, 2 * placement.estimated_ready_seconds))


def _behavior(placement: Placement) -> dict[str, Any]:
    return {
        "scaleUp": {
            "stabilizationWindowSeconds": 0,
            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}],
        },
        "scaleDown": {
            "stabilizationWindowSeconds": _scale_down_window_seconds(placement),
            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}],
        },
    }


def _metric_selector(md: ModelDeploymentRef) -> str:
    return f'namespace="{md.namespace}",model_name="{served_model_name(md)}"'


def _prometheus_trigger(
    config: OperatorConfig,
    name: str,
    metric_type: str,
    query: str,
    threshold: str,
    activation_threshold: str | None = None,
) -> dict[str, Any]:
    metadata = {"serverAddress": config.prometheus_url, "query": query, "threshold": threshold}
    if activation_threshold is not None:
        metadata["activationThreshold"] = activation_threshold
    return {"type": "prometheus", "name": name, "metricType": metric_type, "metadata": metadata}


def _scaled_object(
    md: ModelDeploymentRef, placement: Placement, config: OperatorConfig
) -> dict[str, Any]:
    low, high = replica_bounds(md)
    selector = _metric_selector(md)
    waiting_per_replica = str(md.spec.replicas.target_queue_length)
    triggers = [
        # AverageValue: KEDA divides the sum by replicas, so this is waiting per replica.
        _prometheus_trigger(
            config,
            "queue",
            "AverageValue",
            f"sum(vllm:num_requests_waiting{{{selector}}})",
            waiting_per_replica,
            activation_threshold="0",  # one waiting request wakes an idle workload
        ),
        # Value: the average is already per replica.
        _prometheus_trigger(
            config,
            "kv-cache",
            "Value",
            f"avg(vllm:kv_cache_usage_perc{{{selector}}})",
            KV_CACHE_SCALE_THRESHOLD,
        ),
    ]
    spec: dict[str, Any] = {
        "scaleTargetRef": workload_ref(md, placement),
        "minReplicaCount": max(low, 1),
        "maxReplicaCount": high,
        "pollingInterval": 15,
        # Don't judge a replica idle before it could ever have served.
        "initialCooldownPeriod": 2 * placement.estimated_ready_seconds,
        "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _behavior(placement)}},
        "triggers": triggers,
    }
    if low == 0:
        # Idle (every trigger inactive) -> 0 replicas; active -> at least minReplicaCount.
        # With zero pods there are no vLLM metrics: the wake-up signal is the requests the
        # operator's activator holds (operator/activator.py), counted like waiting requests.
        pending = f'namespace="{md.namespace}",model_deployment="{md.name}"'
        triggers.append(
            _prometheus_trigger(
                config,
                "activator",
                "AverageValue",
                f"sum(modelship_activator_pending_requests{{{pending}}})",
                waiting_per_replica,
                activation_threshold="0",
            )
        )
        spec["idleReplicaCount"] = 0
        spec["cooldownPeriod"] = max(1800, 2 * placement.estimated_ready_seconds)
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _metadata(md),
        "spec": spec,
    }


def _horizontal_pod_autoscaler(md: ModelDeploymentRef, placement: Placement) -> dict[str, Any]:
    low, high = replica_bounds(md)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(md),
        "spec": {
            "scaleTargetRef": workload_ref(md, placement),
            # An HPA cannot scale to zero: replicas.min 0 runs at least one replica here.
            "minReplicas": max(low, 1),
            "maxReplicas": high,
            # A Pods metric needs prometheus-adapter (or another custom.metrics.k8s.io server)
            # exposing vLLM's vllm:num_requests_waiting under this name.
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": "vllm:num_requests_waiting"},
                        "target": {
                            "type": "AverageValue",
                            "averageValue": str(md.spec.replicas.target_queue_length),
                        },
                    },
                }
            ],
            "behavior": _behavior(placement),
        },
    }


def _pod_monitor(md: ModelDeploymentRef) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _metadata(md),
        "spec": {
            "selector": {"matchLabels": selector_labels(md)},
            # Copied onto every series: the rules and dashboards join vLLM's and the runtime's
            # metrics to the plan (cost, predicted KV cache) on this label.
            "podTargetLabels": ["modelship.dev/model-deployment"],
            "podMetricsEndpoints": [
                {"port": "http", "path": "/metrics", "interval": "15s"},  # vLLM
                {"port": "metrics", "path": "/metrics", "interval": "15s"},  # the runtime
            ],
        },
    }


def render(md: ModelDeploymentRef, placement: Placement, config: OperatorConfig) -> Rendered:
    """Every Kubernetes object (and the node group request) for one ModelDeployment."""
    _check_names(md, placement)
    try:
        pool = placement_pool_name(placement)
        low, high = replica_bounds(md)
        node_pool_objects: list[dict[str, Any]] = []
        node_group: NodeGroupRequest | None = None
        if config.node_pool_mode == "karpenter":
            node_pool_objects = karpenter_objects(placement, config, high)
        elif config.node_pool_mode == "eks-nodegroup":
            node_group = node_group_request(placement, config, low, high)
    except NodePoolError as error:
        raise RenderError(f"{md.namespace}/{md.name}: {error}") from None

    workload = (
        _deployment(md, placement, config, pool)
        if placement.nodes == 1
        else _leader_worker_set(md, placement, config, pool)
    )
    if wakes_through_activator(md, config) and not config.activator_url:
        raise RenderError(
            f"{md.namespace}/{md.name}: spec.replicas.min 0 (scale to zero) needs the operator's "
            "activator to wake the model on a request, and MODELSHIP_ACTIVATOR_URL is not set: "
            "install with the Helm chart (it sets it) or set spec.replicas.min to 1."
        )
    children = [workload, _service(md, placement)]
    if replica_bounds(md)[1] > 1:
        # With one replica at most, the budget would allow disrupting it anyway: an object that
        # changes nothing, yet costs an apply on every reconcile and a watch event per status.
        children.append(_pod_disruption_budget(md, placement))
    if autoscaled(md):
        if config.autoscaler == "keda":
            children.append(_scaled_object(md, placement, config))
        elif config.autoscaler == "hpa":
            children.append(_horizontal_pod_autoscaler(md, placement))
    if config.pod_monitor:
        children.append(_pod_monitor(md))
    return Rendered(
        children=children,
        node_pool_objects=node_pool_objects,
        node_group=node_group,
        pool_name=pool,
    )


def render_documents(
    md: ModelDeploymentRef, placement: Placement, config: OperatorConfig
) -> list[dict[str, Any]]:
    """The Kubernetes objects in apply order (node pool first), for `modelship render`."""
    rendered = render(md, placement, config)
    return [*rendered.node_pool_objects, *rendered.children]
