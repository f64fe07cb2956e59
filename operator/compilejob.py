"""The Neuron compile step: a one-off Job on a larger instance for a model whose serving node has
too little host memory to compile it (sizing.py: Placement.compile_instance_type).

On Inferentia2 and Trainium vLLM compiles the model before it serves; compiling holds the whole
checkpoint in host memory, serving from compiled artifacts only streams it through. For such a
placement the operator runs two steps:

    1. compile: a batch/v1 Job runs the runtime image with `--compile-only` (the serving pods'
       model source, engine arguments and Neuron compile cache) on a temporary Karpenter pool of
       the compile instance type, `modelship-compile-<instance>-<digest>`, one per
       ModelDeployment (WhenEmpty consolidation: its node goes as soon as the Job is done). The
       runtime publishes the artifacts to the shared cache (an s3:// prefix) and exits 0.
    2. serve: once the Job succeeded, the annotation `modelship.dev/neuron-compiled: <key>` on
       the ModelDeployment records it (restarts and later reconciles read it back), the compile
       pool is deleted, and the serving workload is applied; its pods restore the artifacts
       (`--neuron-cache-required`: a miss fails instead of compiling out of memory).

The key is a digest of what the compiled artifacts depend on that the operator knows: runtime
image, model URI, engine arguments and cache location. A change of any makes a new Job (its name
carries the key); the runtime keys the cache itself by the model's bytes and SDK versions too.

`render_*` and `progress` are pure; `ensure` and `release` are the only writers (through Kube).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .api import GROUP, PLURAL, VERSION
from .apply import EC2_NODE_CLASS, JOB, NODE_POOL, Kind, Kube, sync_pool
from .config import OperatorConfig, shared_neuron_cache
from .nodepool import (
    INSTANCE_TYPE_LABEL,
    MANAGED_BY,
    POOL_LABEL,
    NodePoolError,
    _catalog,
    accelerator_taint_key,
    karpenter_objects,
)
from .plan import Placement
from .render import (
    GENERATION_ANNOTATION,
    MD_LABEL,
    ROLE_LABEL,
    ModelDeploymentRef,
    RenderError,
    _pod_spec,
    _startup_allowance_seconds,
    owner_reference,
    runtime_args,
)
from .sizing import neuron_compile_host_bytes

COMPILED_ANNOTATION = "modelship.dev/neuron-compiled"
KEY_ANNOTATION = "modelship.dev/compile-key"
COMPILE_ROLE = "compile"
# On the compile pool and on the Job's pod: which ModelDeployment it compiles for (a digest of
# namespace/name: a label value has at most 63 characters). Not MD_LABEL on the pod: the serving
# Service, PodDisruptionBudget and PodMonitor select runtime pods by that label.
COMPILE_FOR_LABEL = "modelship.dev/compile-for"
COMPILE_APP = "modelship-compile"
MD_KIND = Kind(f"{GROUP}/{VERSION}", "ModelDeployment", PLURAL, True)

BACKOFF_LIMIT = 1  # one retry: a node lost mid-compile; a second failure is a verdict
# A finished Job stays a day (its failure readable with kubectl); success is recorded on the
# ModelDeployment, so nothing depends on the Job once it is gone.
TTL_SECONDS_AFTER_FINISHED = 86400
NODE_START_SECONDS = 600  # a new node, the Neuron AMI's boot and the image pull
CONSOLIDATE_AFTER = "1m"  # the compile node is useless once its Job is done
CPU_HEADROOM = 2  # vCPUs left to the kubelet and daemons; neuronx-cc uses all the others


class CompileError(RenderError):
    """A compile step that cannot run as configured; the message names the setting to fix."""


@dataclass(frozen=True)
class CompileProgress:
    """Where a ModelDeployment's compile step stands (status.py shows it)."""

    state: Literal["Compiling", "Compiled", "Failed"]
    reason: str  # Compiling | Compiled | CompileFailed
    message: str


def _digest(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def compile_step_problem(config: OperatorConfig) -> str | None:
    """Why this operator cannot run a compile step, or None when it can."""
    if not shared_neuron_cache(config.neuron_cache_uri):
        return (
            "compiling on a larger instance needs a Neuron compile cache the compile Job and the "
            "serving pods share: set the chart's runtime.neuronCacheUri "
            "(MODELSHIP_NEURON_CACHE_URI) to an s3:// prefix the runtime's service account may "
            f"read and write (it is {config.neuron_cache_uri or 'not set'})"
        )
    if config.node_pool_mode == "eks-nodegroup":
        return (
            "compiling on a larger instance needs node pool mode karpenter or none (the "
            "temporary compile pool is a Karpenter NodePool); in eks-nodegroup mode pin "
            "spec.accelerator.instanceTypes to an instance that compiles the model itself"
        )
    return None


def needs_compile_step(placement: Placement | None) -> bool:
    return placement is not None and placement.compile_instance_type is not None


def compile_key(md: ModelDeploymentRef, placement: Placement, config: OperatorConfig) -> str:
    """Digest of the compile step's inputs the operator knows (see the module docstring)."""
    args = runtime_args(md, placement, config)
    engine_args = args[args.index("--") + 1 :]
    inputs = {
        "format": 1,
        "image": _image(md, config),
        "source": md.spec.model.uri,
        "engineArgs": engine_args,
        "cache": config.neuron_cache_uri,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _image(md: ModelDeploymentRef, config: OperatorConfig) -> str:
    return md.spec.serving.image or config.neuron_runtime_image


def job_name(md: ModelDeploymentRef, key: str) -> str:
    """`<name>-compile-<key digest>`: a new key is a new Job; at most 63 characters (the Job
    controller puts the name in a label of its pods)."""
    return f"{md.name[:42].rstrip('-.')}-compile-{key[:10]}"


def compile_pool_name(md: ModelDeploymentRef, placement: Placement) -> str:
    """`modelship-compile-<instance type>-<digest of namespace/name>`: one per ModelDeployment,
    so deleting it when this model's compile is done never stops another's."""
    instance = placement.compile_instance_type or placement.instance_type
    slug = re.sub(r"[^a-z0-9]+", "-", instance.lower()).strip("-")
    return f"modelship-compile-{slug}-{_compile_for(md)}"


def _compile_for(md: ModelDeploymentRef) -> str:
    return _digest(f"{md.namespace}/{md.name}", 10)


def predicted_compile_seconds(placement: Placement) -> int:
    """Fetch, load and compile on the compile node (the serving pod's estimate includes all)."""
    return placement.estimated_ready_seconds


def deadline_seconds(placement: Placement) -> int:
    """activeDeadlineSeconds: the runtime's own allowance (twice the prediction plus a margin)
    and the time for a new node and the image."""
    return _startup_allowance_seconds(placement) + NODE_START_SECONDS


def _check(md: ModelDeploymentRef, placement: Placement, config: OperatorConfig) -> None:
    problem = compile_step_problem(config)
    if problem:
        raise CompileError(f"{md.namespace}/{md.name}: {problem}.")
    if placement.nodes > 1:
        raise CompileError(
            f"{md.namespace}/{md.name}: the placement spans {placement.nodes} nodes and needs a "
            f"compile instance ({placement.compile_instance_type}); a compile Job compiles for "
            "one node: pin spec.accelerator.instanceTypes to an instance type whose nodes "
            "compile the model themselves, or spec.accelerator.maxNodesPerReplica 1."
        )


def render_compile_pool(
    md: ModelDeploymentRef, placement: Placement, config: OperatorConfig
) -> list[dict[str, Any]]:
    """The temporary Karpenter pool of the compile instance type (EC2NodeClass unless a shared
    one is configured, and NodePool): one node at most, consolidated as soon as it is empty.
    Empty in node pool mode none (the cluster brings its own nodes)."""
    _check(md, placement, config)
    if config.node_pool_mode != "karpenter":
        return []
    pool = compile_pool_name(md, placement)
    compile_placement = placement.model_copy(
        update={"instance_type": placement.compile_instance_type, "efa_interfaces": 0}
    )
    try:
        objects = copy.deepcopy(karpenter_objects(compile_placement, config, 0, pool=pool))
    except NodePoolError as error:
        raise CompileError(f"{md.namespace}/{md.name}: compile pool: {error}") from None
    for obj in objects:
        obj["metadata"]["labels"][COMPILE_FOR_LABEL] = _compile_for(md)
        obj["metadata"]["annotations"] = {"modelship.dev/compiles-for": f"{md.namespace}/{md.name}"}
        if obj["kind"] == "NodePool":
            obj["spec"]["disruption"]["consolidateAfter"] = CONSOLIDATE_AFTER
    return objects


def _compile_resources(placement: Placement, config: OperatorConfig) -> tuple[int, int]:
    """(vCPUs, host memory bytes) the compile pod requests on the compile instance."""
    assert placement.compile_instance_type is not None
    instance = _catalog(config.catalog_path).get(placement.compile_instance_type)
    if instance is None:
        raise CompileError(
            f"compile instance type {placement.compile_instance_type!r} is not in the accelerator "
            "catalog; add it to the catalog (MODELSHIP_CATALOG_PATH)."
        )
    memory = neuron_compile_host_bytes(placement.weight_bytes // placement.nodes)
    return max(2, instance.vcpus - CPU_HEADROOM), memory


def render_compile_job(
    md: ModelDeploymentRef, placement: Placement, config: OperatorConfig
) -> dict[str, Any]:
    """The batch/v1 Job that compiles the model once and publishes it to the compile cache."""
    _check(md, placement, config)
    assert placement.compile_instance_type is not None
    key = compile_key(md, placement, config)
    pool = compile_pool_name(md, placement)
    # The compile node is temporary: the weights go to the pod's own disk, not a node cache.
    local = config.model_copy(update={"node_cache": "disabled"})
    spec = _pod_spec(md, placement, local, pool, None)
    spec["restartPolicy"] = "Never"
    spec["nodeSelector"] = {INSTANCE_TYPE_LABEL: placement.compile_instance_type}
    spec["tolerations"] = [
        {"key": accelerator_taint_key(placement), "operator": "Exists", "effect": "NoSchedule"}
    ]
    if config.node_pool_mode != "none":
        spec["nodeSelector"][POOL_LABEL] = pool
        spec["tolerations"].append(
            {"key": POOL_LABEL, "operator": "Equal", "value": pool, "effect": "NoSchedule"}
        )
    container = spec["containers"][0]
    args = [arg for arg in container["args"] if arg != "--neuron-cache-required"]
    split = args.index("--")
    container["args"] = [*args[:split], "--compile-only", *args[split:]]
    for field in ("startupProbe", "readinessProbe", "livenessProbe", "lifecycle", "ports"):
        container.pop(field, None)
    cpu, memory = _compile_resources(placement, config)
    container["resources"]["requests"]["cpu"] = str(cpu)
    container["resources"]["requests"]["memory"] = f"{math.ceil(memory / 1024**3)}Gi"
    pod_labels = {
        "app.kubernetes.io/name": COMPILE_APP,
        "app.kubernetes.io/managed-by": "modelship",
        COMPILE_FOR_LABEL: _compile_for(md),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(md, key),
            "namespace": md.namespace,
            "labels": {
                "app.kubernetes.io/name": COMPILE_APP,
                "app.kubernetes.io/instance": md.name,
                "app.kubernetes.io/managed-by": "modelship",
                MD_LABEL: md.name,
                ROLE_LABEL: COMPILE_ROLE,
            },
            "annotations": {
                GENERATION_ANNOTATION: str(md.generation),
                KEY_ANNOTATION: key,
                "modelship.dev/compile-instance-type": placement.compile_instance_type,
                "modelship.dev/serving-instance-type": placement.instance_type,
            },
            "ownerReferences": [owner_reference(md)],
        },
        "spec": {
            "backoffLimit": BACKOFF_LIMIT,
            "activeDeadlineSeconds": deadline_seconds(placement),
            "ttlSecondsAfterFinished": TTL_SECONDS_AFTER_FINISHED,
            "template": {"metadata": {"labels": pod_labels}, "spec": spec},
        },
    }


# ---- decisions (pure) -------------------------------------------------------------------------


def _job_condition(job: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return dict(condition)
    return None


def finished(job: Mapping[str, Any]) -> bool:
    """The Job succeeded or failed for good."""
    return bool(_job_condition(job, "Complete") or _job_condition(job, "Failed"))


def _minutes(seconds: int) -> str:
    return f"{max(1, round(seconds / 60))} min"


def progress(
    md: ModelDeploymentRef,
    placement: Placement | None,
    config: OperatorConfig,
    annotations: Mapping[str, str],
    jobs: Sequence[Mapping[str, Any]],
) -> CompileProgress | None:
    """Where the compile step of `placement` stands, from the ModelDeployment's annotations and
    its compile Jobs; None when the placement compiles where it serves."""
    if placement is None or placement.compile_instance_type is None:
        return None
    key = compile_key(md, placement, config)
    where = f"{placement.compile_instance_type} (Job {job_name(md, key)})"
    if annotations.get(COMPILED_ANNOTATION) == key:
        return CompileProgress(
            "Compiled",
            "Compiled",
            f"compiled on {placement.compile_instance_type} into {config.neuron_cache_uri}; "
            f"serving on {placement.instance_type} from the compiled artifacts",
        )
    job = next(
        (j for j in jobs if (j.get("metadata") or {}).get("name") == job_name(md, key)), None
    )
    if job is not None and _job_condition(job, "Complete"):
        return CompileProgress(
            "Compiled",
            "Compiled",
            f"compiled on {where}; starting to serve on {placement.instance_type}",
        )
    failed = _job_condition(job, "Failed") if job is not None else None
    if failed is not None:
        why = f"{failed.get('reason') or 'Failed'}: {failed.get('message') or 'no message'}"
        return CompileProgress(
            "Failed",
            "CompileFailed",
            f"the compile Job on {where} failed ({why}). See `kubectl logs job/"
            f"{job_name(md, key)} -n {md.namespace}`; fix the cause (a DeadlineExceeded "
            "compile needs more time: the image's Neuron SDK or a smaller maxModelLen / "
            "concurrency), then delete the Job to compile again.",
        )
    return CompileProgress(
        "Compiling",
        "Compiling",
        f"compiling once on {where}, predicted {_minutes(predicted_compile_seconds(placement))} "
        f"(deadline {_minutes(deadline_seconds(placement))}); the serving workload on "
        f"{placement.instance_type} starts when it succeeds",
    )


# ---- the writers ------------------------------------------------------------------------------


def release(kube: Kube, md: ModelDeploymentRef, keep: str | None = None) -> list[str]:
    """Delete the compile pools of `md` (all, or all but `keep`). Returns what was deleted."""
    deleted: list[str] = []
    names: set[str] = set()
    for kind in (NODE_POOL, EC2_NODE_CLASS):
        for obj in kube.list(kind, None, {COMPILE_FOR_LABEL: _compile_for(md), **MANAGED_BY}):
            names.add(str(obj["metadata"]["name"]))
    for name in sorted(names - {keep} if keep else names):
        deleted += sync_pool(kube, name, [])
    return deleted


def ensure(
    kube: Kube,
    md: ModelDeploymentRef,
    placement: Placement,
    config: OperatorConfig,
    annotations: Mapping[str, str],
) -> CompileProgress | None:
    """Run the compile step of `placement` to its end: apply the compile pool and Job while it
    compiles; on success record it on the ModelDeployment and delete the pool; on failure
    delete the pool. None or Compiled: the serving workload may be applied."""
    if placement.compile_instance_type is None:
        return None
    key = compile_key(md, placement, config)
    if annotations.get(COMPILED_ANNOTATION) == key:
        return progress(md, placement, config, annotations, [])
    _check(md, placement, config)
    name = job_name(md, key)
    job = kube.get(JOB, md.namespace, name)
    if job is None:
        live = kube.get(MD_KIND, md.namespace, md.name) or {}
        fresh = (live.get("metadata") or {}).get("annotations") or {}
        if fresh.get(COMPILED_ANNOTATION) == key:  # recorded since `annotations` was read
            return progress(md, placement, config, fresh, [])
    state = progress(md, placement, config, annotations, [job] if job else [])
    assert state is not None
    pool = compile_pool_name(md, placement)
    if state.state == "Compiled":
        kube.merge_patch(
            MD_KIND,
            md.namespace,
            md.name,
            {"metadata": {"annotations": {COMPILED_ANNOTATION: key}}},
        )
        release(kube, md)
        return state
    if state.state == "Failed":
        release(kube, md)
        return state
    release(kube, md, keep=pool)  # a compile pool of an earlier plan
    pool_objects = render_compile_pool(md, placement, config)
    if pool_objects:
        sync_pool(kube, pool, pool_objects)
    if job is None:
        kube.apply(render_compile_job(md, placement, config))
    return state
