"""render: ModelDeployment + Placement -> Kubernetes objects, every one validated against the real
Kubernetes OpenAPI schema or the upstream CRD schema (tests/unit/schemas.py)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from modelship.operator.api import load_spec
from modelship.operator.config import OperatorConfig, node_cache_enabled
from modelship.operator.engine import EngineArgs
from modelship.operator.nodepool import NODE_CACHE_DIR, NODE_CACHE_UID, merge_node_pool_objects
from modelship.operator.plan import MemoryBreakdown, Placement
from modelship.operator.render import (
    RUNTIME_UID,
    ModelDeploymentRef,
    Rendered,
    RenderError,
    endpoint_url,
    has_instance_store,
    node_cache_dir_name,
    render,
    render_documents,
    weights_mode,
)
from modelship.operator.source import S3Source
from modelship.runtime.main import parse_args

from tests.unit.schemas import SchemaError, unchecked_cel_rules, validate_object

GIB = 1024**3
UID = "3f1c9a52-1b7e-4c55-9a0e-2f0d5b6c7e81"

ACTIVATOR = "http://modelship-activator.modelship-system.svc.cluster.local:8082"
CONFIG = OperatorConfig(
    cluster_name="prod-eks",
    node_role="KarpenterNodeRole-prod-eks",
    pod_monitor=True,
    activator_url=ACTIVATOR,
)


def placement(
    instance_type: str,
    *,
    vendor: str = "nvidia",
    accelerator_type: str = "NVIDIA L4",
    resource_count: int = 1,
    tp: int = 1,
    pp: int = 1,
    weight_bytes: int = 16 * GIB,
    ready_seconds: int = 300,
    cpu: int = 3,
    memory_bytes: int = 12 * GIB,
    ephemeral_bytes: int = 40 * GIB,
    capacity_type: str = "on-demand",
    resource_name: str | None = None,
    max_model_len: int = 8192,
) -> Placement:
    """A placement as the sizing engine makes one (engine args rendered by EngineArgs)."""
    device = "cuda" if vendor == "nvidia" else "neuron"
    engine = EngineArgs(
        device=device,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        max_model_len=max_model_len,
        max_num_seqs=16,
        gpu_memory_utilization=0.9 if vendor == "nvidia" else None,
        dtype="bfloat16",
    )
    return Placement(
        instance_type=instance_type,
        accelerator_type=accelerator_type,
        accelerator_vendor=vendor,
        resource_name=resource_name
        or ("nvidia.com/gpu" if vendor == "nvidia" else "aws.amazon.com/neuron"),
        resource_count=resource_count,
        accelerator_count=resource_count * pp,
        accelerators_per_node=resource_count,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        nodes=pp,
        weight_bytes=weight_bytes,
        kv_cache_bytes_per_token=131072,
        kv_cache_tokens=100_000,
        max_concurrent_sequences=12,
        cost_per_hour_usd=1.0,
        engine_args=engine.to_argv(),
        engine=engine,
        memory=MemoryBreakdown(
            device_bytes=24 * GIB,
            usable_bytes=21 * GIB,
            weight_bytes=weight_bytes // (tp * pp),
            activation_bytes=GIB,
            runtime_overhead_bytes=GIB,
            cuda_graph_bytes=GIB // 2,
            kv_cache_bytes=4 * GIB,
        ),
        dtype="bf16",
        cpu_request=cpu,
        memory_request_bytes=memory_bytes,
        ephemeral_storage_bytes=ephemeral_bytes,
        capacity_type=capacity_type,
        ami_family="AL2023_x86_64_NVIDIA" if vendor == "nvidia" else "AL2023_x86_64_NEURON",
        estimated_ready_seconds=ready_seconds,
    )


# Realistic placements: model, instance and parallelism as the sizing engine picks them.
LLAMA_8B_L4 = placement("g6.xlarge", weight_bytes=16 * GIB, ready_seconds=240)
LLAMA_70B_A100 = placement(
    "p4de.24xlarge",
    accelerator_type="NVIDIA A100 80GB",
    resource_count=8,
    tp=8,
    weight_bytes=141 * GIB,
    ready_seconds=900,
    cpu=90,
    memory_bytes=300 * GIB,
    ephemeral_bytes=190 * GIB,
)
LLAMA_405B_H100 = placement(
    "p5.48xlarge",
    accelerator_type="NVIDIA H100",
    resource_count=8,
    tp=8,
    pp=2,
    weight_bytes=756 * GIB,
    ready_seconds=2400,
    cpu=180,
    memory_bytes=900 * GIB,
    ephemeral_bytes=950 * GIB,
)
LLAMA_8B_INF2 = placement(
    "inf2.8xlarge",
    vendor="inferentia",
    accelerator_type="AWS Inferentia2",
    resource_count=1,
    tp=2,
    weight_bytes=16 * GIB,
    ready_seconds=1500,
    cpu=28,
    memory_bytes=64 * GIB,
)
LLAMA_8B_INF2_CORES = placement(
    "inf2.8xlarge",
    vendor="inferentia",
    accelerator_type="AWS Inferentia2",
    resource_name="aws.amazon.com/neuroncore",
    resource_count=2,
    tp=2,
    ready_seconds=1500,
    cpu=28,
    memory_bytes=64 * GIB,
)
LLAMA_70B_TRN1 = placement(
    "trn1.32xlarge",
    vendor="trainium",
    accelerator_type="AWS Trainium",
    resource_count=16,
    tp=32,
    weight_bytes=141 * GIB,
    ready_seconds=3000,
    cpu=120,
    memory_bytes=400 * GIB,
    ephemeral_bytes=200 * GIB,
)
# One L4 of a 4-GPU node: two replicas can share it.
LLAMA_8B_L4_SHARED = placement("g6.12xlarge", weight_bytes=16 * GIB)
PLACEMENTS = {
    "gpu": LLAMA_8B_L4,
    "gpu-tp8": LLAMA_70B_A100,
    "multi-node": LLAMA_405B_H100,
    "inferentia": LLAMA_8B_INF2,
    "inferentia-cores": LLAMA_8B_INF2_CORES,
    "trainium": LLAMA_70B_TRN1,
    "gpu-shared-node": LLAMA_8B_L4_SHARED,
}


def md(
    name: str = "llama-3-8b",
    uri: str = "s3://models-prod/meta-llama/Llama-3.1-8B-Instruct/",
    *,
    namespace: str = "serving",
    model: dict[str, Any] | None = None,
    serving: dict[str, Any] | None = None,
    replicas: dict[str, Any] | None = None,
    generation: int = 3,
) -> ModelDeploymentRef:
    spec = load_spec(
        {
            "model": {"uri": uri, **(model or {})},
            "serving": serving or {},
            "replicas": replicas or {"min": 1},
        }
    )
    return ModelDeploymentRef(
        name=name, namespace=namespace, uid=UID, generation=generation, spec=spec
    )


def config(**changes: Any) -> OperatorConfig:
    return CONFIG.model_copy(update=changes)


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[o['kind'] for o in objects]}"
    return found[0]


def kinds(objects: list[dict[str, Any]]) -> list[str]:
    return [obj["kind"] for obj in objects]


def pod_specs(rendered: Rendered) -> list[dict[str, Any]]:
    workload = rendered.children[0]
    if workload["kind"] == "Deployment":
        return [workload["spec"]["template"]["spec"]]
    template = workload["spec"]["leaderWorkerTemplate"]
    return [template["leaderTemplate"]["spec"], template["workerTemplate"]["spec"]]


def runtime(pod_spec: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec["containers"]
    return container


def arg_value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


# Every combination the tests below look at; each rendered object is validated once.
SCENARIOS: dict[str, tuple[ModelDeploymentRef, Placement, OperatorConfig]] = {
    "gpu-s3-karpenter-fixed": (md(), LLAMA_8B_L4, CONFIG),
    "gpu-s3-keda": (md(replicas={"min": 1, "max": 4}), LLAMA_8B_L4, CONFIG),
    "gpu-s3-scale-to-zero": (md(replicas={"min": 0, "max": 3}), LLAMA_8B_L4, CONFIG),
    "gpu-hpa": (md(replicas={"min": 2, "max": 6}), LLAMA_8B_L4, config(autoscaler="hpa")),
    "gpu-tp8-fsx": (
        md("llama-3-70b", "fsx://models-lustre/llama-3.1-70b-instruct", replicas={"min": 2}),
        LLAMA_70B_A100,
        config(node_pool_mode="eks-nodegroup"),
    ),
    "gpu-efs-none": (
        md("llama-efs", "efs://models-efs/llama", model={"name": "llama", "trustPickle": True}),
        LLAMA_8B_L4,
        config(node_pool_mode="none", pod_monitor=False),
    ),
    "multi-node-keda": (
        md("llama-405b", replicas={"min": 1, "max": 2}),
        LLAMA_405B_H100,
        config(s3_endpoint_url="https://s3.us-west-2.amazonaws.com"),
    ),
    "multi-node-hpa": (
        md("llama-405b", replicas={"min": 1, "max": 2}),
        LLAMA_405B_H100,
        config(autoscaler="hpa"),
    ),
    "inferentia": (
        md("llama-inf2", serving={"engineArgs": ["--enable-prefix-caching"]}),
        LLAMA_8B_INF2,
        config(neuron_cache_uri="s3://neuron-cache/llama/"),
    ),
    "inferentia-cores": (md("llama-inf2"), LLAMA_8B_INF2_CORES, CONFIG),
    "trainium-spot-shared-class": (
        md("llama-trn1", replicas={"min": 0, "max": 2}),
        LLAMA_70B_TRN1.model_copy(update={"capacity_type": "spot"}),
        config(node_class_name="gpu-default"),
    ),
    "local-dev": (
        md("tiny", "file:///srv/models/tiny"),
        LLAMA_8B_L4,
        config(node_pool_mode="none", autoscaler="none"),
    ),
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, Rendered]:
    return {name: render(*args) for name, args in SCENARIOS.items()}


def test_every_rendered_object_passes_its_schema(rendered: dict[str, Rendered]) -> None:
    seen: set[str] = set()
    checked = 0
    for name, result in rendered.items():
        for obj in [*result.node_pool_objects, *result.children]:
            key = json.dumps(obj, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            try:
                validate_object(obj)
            except SchemaError as error:
                pytest.fail(f"scenario {name}: {error}")
            checked += 1
    # Every kind render produces was among them.
    all_kinds = {obj["kind"] for r in rendered.values() for obj in r.node_pool_objects + r.children}
    assert all_kinds == {
        "EC2NodeClass",
        "NodePool",
        "Deployment",
        "LeaderWorkerSet",
        "Service",
        "PodDisruptionBudget",
        "ScaledObject",
        "HorizontalPodAutoscaler",
        "PodMonitor",
    }
    assert checked >= 40


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda d: d["spec"].update(replicas="two"), "replicas"),
        (lambda d: d["spec"]["template"]["spec"].update(nodeSelectr={}), "nodeSelectr"),
        (
            lambda d: d["spec"]["template"]["spec"]["containers"][0].update(ports=[{"port": 1}]),
            "containerPort",
        ),
    ],
)
def test_a_broken_builtin_object_fails_validation(breakage: Any, message: str) -> None:
    deployment = json.loads(json.dumps(render(md(), LLAMA_8B_L4, CONFIG).children[0]))
    breakage(deployment)
    with pytest.raises(SchemaError, match=message):
        validate_object(deployment)


@pytest.mark.parametrize(
    ("kind", "breakage", "message"),
    [
        (
            "NodePool",
            lambda d: d["spec"]["disruption"].update(consolidationPolicy="Never"),
            "Never",
        ),
        ("NodePool", lambda d: d["spec"]["template"]["spec"].update(taint=[]), "taint"),
        ("EC2NodeClass", lambda d: d["spec"].update(instanceStorePolicy="RAID5"), "RAID5"),
        ("EC2NodeClass", lambda d: d.update(metadata={"name": 5}), "metadata"),
    ],
)
def test_a_broken_custom_resource_fails_validation(kind: str, breakage: Any, message: str) -> None:
    obj = json.loads(json.dumps(by_kind(render(md(), LLAMA_8B_L4, CONFIG).node_pool_objects, kind)))
    breakage(obj)
    with pytest.raises(SchemaError, match=message):
        validate_object(obj)


def test_broken_leader_worker_set_and_scaled_object_fail_validation(
    rendered: dict[str, Rendered],
) -> None:
    lws = json.loads(json.dumps(rendered["multi-node-keda"].children[0]))
    lws["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Always"
    with pytest.raises(SchemaError, match="restartPolicy"):
        validate_object(lws)
    scaled = json.loads(json.dumps(by_kind(rendered["gpu-s3-keda"].children, "ScaledObject")))
    del scaled["spec"]["scaleTargetRef"]["name"]
    with pytest.raises(SchemaError, match="name"):
        validate_object(scaled)
    with pytest.raises(SchemaError, match="no schema"):
        validate_object(
            {"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "x"}}
        )


def test_cel_rules_that_are_not_evaluated_are_listed(rendered: dict[str, Rendered]) -> None:
    node_class = by_kind(rendered["gpu-s3-keda"].node_pool_objects, "EC2NodeClass")
    rules = unchecked_cel_rules(node_class)
    assert any("amiSelectorTerms" in rule and "alias" in rule for rule in rules)
    assert unchecked_cel_rules(by_kind(rendered["gpu-s3-keda"].children, "Service")) == []


# The CEL rules of the Karpenter CRDs that touch what render sets, re-stated in Python (no CEL
# evaluator is installed): these are the ones a real API server would reject us on.
def test_karpenter_cel_rules_hold(rendered: dict[str, Rendered]) -> None:
    for result in rendered.values():
        for obj in result.node_pool_objects:
            spec = obj["spec"]
            if obj["kind"] == "EC2NodeClass":
                assert ("role" in spec) != ("instanceProfile" in spec)
                aliases = [term for term in spec["amiSelectorTerms"] if "alias" in term]
                assert len(aliases) == 1 and len(spec["amiSelectorTerms"]) == 1
                assert re.match(r"^[a-zA-Z0-9]+@.+$", aliases[0]["alias"])
                assert aliases[0]["alias"].split("@")[0] == "al2023"
                assert "amiFamily" not in spec
                roots = [m for m in spec["blockDeviceMappings"] if m.get("rootVolume")]
                assert len(roots) <= 1
                assert all("volumeSize" in m["ebs"] for m in spec["blockDeviceMappings"])
                for terms in (spec["subnetSelectorTerms"], spec["securityGroupSelectorTerms"]):
                    assert terms and all(t["tags"] and all(t["tags"].values()) for t in terms)
                assert not any(
                    key in ("karpenter.sh/nodepool", "eks:eks-cluster-name")
                    or key.startswith("kubernetes.io/cluster")
                    for key in spec["tags"]
                )
            else:
                template = spec["template"]
                for key in template["metadata"]["labels"]:
                    assert not key.split("/")[0].endswith("karpenter.sh")
                    assert key != "kubernetes.io/hostname"
                for requirement in template["spec"]["requirements"]:
                    assert requirement["values"], requirement
                    assert requirement["key"] != "karpenter.sh/nodepool"
                assert all(
                    ("schedule" in b) == ("duration" in b) for b in spec["disruption"]["budgets"]
                )
                assert "replicas" not in spec
                assert all(template["spec"]["nodeClassRef"].values())


def test_ownership_labels_and_generation_on_every_child(rendered: dict[str, Rendered]) -> None:
    for name, result in rendered.items():
        ref = SCENARIOS[name][0]
        for child in result.children:
            meta = child["metadata"]
            assert meta["namespace"] == ref.namespace
            assert meta["ownerReferences"] == [
                {
                    "apiVersion": "modelship.dev/v1alpha1",
                    "kind": "ModelDeployment",
                    "name": ref.name,
                    "uid": UID,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ]
            assert meta["labels"] == {
                "app.kubernetes.io/name": "modelship-runtime",
                "app.kubernetes.io/instance": ref.name,
                "app.kubernetes.io/managed-by": "modelship",
                "modelship.dev/model-deployment": ref.name,
            }
            assert meta["annotations"]["modelship.dev/generation"] == str(ref.generation)
        for obj in result.node_pool_objects:
            assert "ownerReferences" not in obj["metadata"]  # shared, outlives any one owner
            assert "namespace" not in obj["metadata"]


def test_single_node_gpu_deployment(rendered: dict[str, Rendered]) -> None:
    result = rendered["gpu-s3-karpenter-fixed"]
    assert kinds(result.node_pool_objects) == ["EC2NodeClass", "NodePool"]
    assert kinds(result.children) == ["Deployment", "Service", "PodMonitor"]
    deployment = result.children[0]
    assert deployment["metadata"]["name"] == "llama-3-8b"
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    pod = deployment["spec"]["template"]["spec"]
    container = runtime(pod)
    assert container["image"] == CONFIG.runtime_image
    assert container["command"] == ["modelship-runtime"]
    assert container["resources"]["requests"] == {
        "nvidia.com/gpu": "1",
        "cpu": "3",
        "memory": "12Gi",
        # The weights go to the node's shared cache (a hostPath), not the pod's ephemeral storage.
        "ephemeral-storage": "10Gi",
    }
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "http": 8000,
        "metrics": 9400,
    }
    assert pod["nodeSelector"] == {
        "node.kubernetes.io/instance-type": "g6.xlarge",
        "modelship.dev/pool": "modelship-g6-xlarge-od",
    }
    assert {(t["key"], t.get("value")) for t in pod["tolerations"]} == {
        ("nvidia.com/gpu", None),
        ("modelship.dev/pool", "modelship-g6-xlarge-od"),
    }
    assert pod["serviceAccountName"] == "modelship-runtime"
    assert pod["terminationGracePeriodSeconds"] >= 120
    assert container["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == 1000
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    key = node_cache_dir_name(*SCENARIOS["gpu-s3-karpenter-fixed"][::2])
    assert volumes["models"]["hostPath"] == {
        "path": f"{NODE_CACHE_DIR}/{key}",
        "type": "Directory",
    }
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[f"/models/{key}"] == "models" and mounts["/dev/shm"] == "dshm"


def test_runtime_args_for_s3_gpu() -> None:
    ref = md(serving={"engineArgs": ["--enable-prefix-caching"]})
    args = runtime(pod_specs(render(ref, LLAMA_8B_L4, CONFIG))[0])["args"]
    split = args.index("--")
    assert args[:split] == [
        "--source",
        "s3://models-prod/meta-llama/Llama-3.1-8B-Instruct/",
        "--node-cache",
        "/models",
        "--node-cache-key",
        node_cache_dir_name(ref, CONFIG),
        "--served-model-name",
        "llama-3-8b",
        "--port",
        "8000",
        "--metrics-port",
        "9400",
        "--weights",
        "land",
        "--device",
        "cuda",
        "--ready-timeout-seconds",
        str(2 * 240 + 300),
        "--stop-grace-seconds",
        "95",
        "--predicted-kv-cache-tokens",
        "100000",
    ]
    # The user's engine arguments first, then the plan's: vLLM keeps the last value.
    assert args[split + 1 :] == ["--enable-prefix-caching", *LLAMA_8B_L4.engine_args]
    assert "--tensor-parallel-size" in args[split + 1 :]


def test_fsx_source_is_used_in_place_from_a_read_only_claim(rendered: dict[str, Rendered]) -> None:
    result = rendered["gpu-tp8-fsx"]
    (pod,) = pod_specs(result)
    container = runtime(pod)
    args = container["args"]
    assert arg_value(args, "--source") == "fsx://models-lustre/llama-3.1-70b-instruct"
    assert arg_value(args, "--mount-root") == "/mnt/model-source"
    assert "--copy-to-local" not in args
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model-source"]["persistentVolumeClaim"] == {
        "claimName": "models-lustre",
        "readOnly": True,
    }
    assert "models" not in volumes
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "model-source"]
    assert mount == {"name": "model-source", "mountPath": "/mnt/model-source", "readOnly": True}
    # TP8 on one node: /dev/shm grows with the ranks (1 GiB + 1 GiB per local rank).
    assert volumes["dshm"]["emptyDir"]["sizeLimit"] == "9Gi"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "8"


def test_efs_source_is_copied_to_local_disk_by_default(rendered: dict[str, Rendered]) -> None:
    (pod,) = pod_specs(rendered["gpu-efs-none"])
    args = runtime(pod)["args"]
    assert "--copy-to-local" in args and "--trust-pickle" in args
    assert arg_value(args, "--served-model-name") == "llama"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model-source"]["persistentVolumeClaim"]["claimName"] == "models-efs"
    assert volumes["models"]["emptyDir"] == {"sizeLimit": "40Gi"}


@pytest.mark.parametrize(
    ("uri", "copy", "expected"),
    [
        ("efs://models-efs/llama", False, False),
        ("fsx://models-lustre/llama", True, True),
        ("fsx://models-lustre/llama", None, False),
        ("s3://models-prod/llama/", None, False),
    ],
)
def test_copy_to_local_disk_overrides(uri: str, copy: bool | None, expected: bool) -> None:
    model = {} if copy is None else {"copyToLocalDisk": copy}
    (pod,) = pod_specs(render(md(uri=uri, model=model), LLAMA_8B_L4, CONFIG))
    assert ("--copy-to-local" in runtime(pod)["args"]) is expected
    assert ("models" in {v["name"] for v in pod["volumes"]}) is (expected or uri.startswith("s3"))


def test_local_source_is_a_read_only_host_directory(rendered: dict[str, Rendered]) -> None:
    result = rendered["local-dev"]
    (pod,) = pod_specs(result)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model-source"]["hostPath"] == {"path": "/srv/models/tiny", "type": "Directory"}
    (mount,) = [m for m in runtime(pod)["volumeMounts"] if m["name"] == "model-source"]
    assert mount["readOnly"] is True and mount["mountPath"] == "/srv/models/tiny"
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "g6.xlarge"}
    assert result.node_pool_objects == [] and result.node_group is None


def test_no_static_aws_credentials_anywhere(rendered: dict[str, Rendered]) -> None:
    secret_names = re.compile(
        r"AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|aws_access_key|secretKeyRef",
        re.IGNORECASE,
    )
    key_shapes = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")
    for name, result in rendered.items():
        text = json.dumps([*result.node_pool_objects, *result.children])
        assert not secret_names.search(text), name
        assert not key_shapes.search(text), name
        for pod in pod_specs(result):
            assert pod["serviceAccountName"] == "modelship-runtime"
            for env in runtime(pod)["env"]:
                assert "valueFrom" not in env
                assert not env["name"].startswith("AWS_") or env["name"] == "AWS_ENDPOINT_URL"


def test_s3_endpoint_override_is_the_only_aws_env(rendered: dict[str, Rendered]) -> None:
    for pod in pod_specs(rendered["multi-node-keda"]):
        env = {e["name"]: e["value"] for e in runtime(pod)["env"]}
        assert env["AWS_ENDPOINT_URL"] == "https://s3.us-west-2.amazonaws.com"
    for pod in pod_specs(rendered["gpu-s3-keda"]):
        assert "AWS_ENDPOINT_URL" not in {e["name"] for e in runtime(pod)["env"]}


@pytest.mark.parametrize(
    "scenario", ["gpu-s3-keda", "gpu-tp8-fsx", "multi-node-keda", "trainium-spot-shared-class"]
)
def test_startup_probe_allows_twice_the_predicted_ready_time(
    rendered: dict[str, Rendered], scenario: str
) -> None:
    place = SCENARIOS[scenario][1]
    container = runtime(pod_specs(rendered[scenario])[0])
    startup = container["startupProbe"]
    allowance = startup["failureThreshold"] * startup["periodSeconds"]
    assert allowance >= 2 * place.estimated_ready_seconds + 60
    assert allowance <= 2 * place.estimated_ready_seconds + 600  # not unbounded either
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    liveness = container["livenessProbe"]
    assert liveness["failureThreshold"] * liveness["periodSeconds"] <= 120


def test_multi_node_renders_a_leader_worker_set(rendered: dict[str, Rendered]) -> None:
    result = rendered["multi-node-keda"]
    lws = result.children[0]
    assert lws["kind"] == "LeaderWorkerSet"
    assert lws["metadata"]["name"] == "llama-405b-lws"
    assert "replicas" not in lws["spec"]  # KEDA owns it
    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["size"] == 2
    assert template["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader, worker = (
        runtime(template["leaderTemplate"]["spec"]),
        runtime(template["workerTemplate"]["spec"]),
    )
    assert template["leaderTemplate"]["metadata"]["labels"]["modelship.dev/role"] == "leader"
    assert template["workerTemplate"]["metadata"]["labels"]["modelship.dev/role"] == "worker"
    lead_args, work_args = leader["args"], worker["args"]
    assert arg_value(lead_args, "--role") == "leader" and arg_value(lead_args, "--nodes") == "2"
    assert arg_value(work_args, "--role") == "worker"
    assert arg_value(work_args, "--leader-address") == "$(LWS_LEADER_ADDRESS)"
    engine = lead_args[lead_args.index("--") + 1 :]
    assert arg_value(engine, "--tensor-parallel-size") == "8"
    assert arg_value(engine, "--pipeline-parallel-size") == "2"
    assert arg_value(engine, "--distributed-executor-backend") == "ray"
    # Every node fetches the weights and gets its 8 GPUs; only the leader serves HTTP.
    for container in (leader, worker):
        assert container["resources"]["limits"] == {"nvidia.com/gpu": "8"}
        assert arg_value(container["args"], "--source").startswith("s3://")
    assert "startupProbe" in leader and "readinessProbe" in leader
    # TP8 x PP2 over two nodes: eight ranks on each node.
    for pod in (template["leaderTemplate"]["spec"], template["workerTemplate"]["spec"]):
        (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
        assert shm["emptyDir"]["sizeLimit"] == "9Gi"
    assert "readinessProbe" not in worker
    service = by_kind(result.children, "Service")
    assert service["spec"]["selector"]["modelship.dev/role"] == "leader"
    scaled = by_kind(result.children, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "name": "llama-405b-lws",
    }
    hpa = by_kind(rendered["multi-node-hpa"].children, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "LeaderWorkerSet"
    # Two nodes per replica, max 2 replicas + 1 surging: 6 nodes x 8 GPUs.
    node_pool = by_kind(result.node_pool_objects, "NodePool")
    assert node_pool["spec"]["limits"] == {"nvidia.com/gpu": "48"}


def test_user_may_pick_the_multi_node_executor() -> None:
    ref = md("big", serving={"engineArgs": ["--distributed-executor-backend=ray"]})
    leader = pod_specs(render(ref, LLAMA_405B_H100, CONFIG))[0]
    args = runtime(leader)["args"]
    assert sum(a.startswith("--distributed-executor-backend") for a in args) == 1


def test_inferentia_uses_the_neuron_image_device_and_resources(
    rendered: dict[str, Rendered],
) -> None:
    result = rendered["inferentia"]
    (pod,) = pod_specs(result)
    container = runtime(pod)
    assert container["image"] == CONFIG.neuron_runtime_image
    args = container["args"]
    assert arg_value(args, "--device") == "neuron"
    assert arg_value(args, "--neuron-cache") == "s3://neuron-cache/llama/"
    assert args[args.index("--") + 1] == "--enable-prefix-caching"
    assert container["resources"]["limits"] == {"aws.amazon.com/neuron": "1"}
    assert {t["key"] for t in pod["tolerations"]} == {"aws.amazon.com/neuron", "modelship.dev/pool"}
    node_pool = by_kind(result.node_pool_objects, "NodePool")
    taints = node_pool["spec"]["template"]["spec"]["taints"]
    assert {"key": "aws.amazon.com/neuron", "value": "true", "effect": "NoSchedule"} in taints
    assert node_pool["spec"]["limits"] == {"aws.amazon.com/neuron": "2"}  # 1 chip x (1 + 1 surge)
    # The cores variant requests cores; the pool still limits whole devices.
    (cores_pod,) = pod_specs(rendered["inferentia-cores"])
    assert runtime(cores_pod)["resources"]["requests"]["aws.amazon.com/neuroncore"] == "2"
    # Neuron cache only for Neuron.
    assert (
        "--neuron-cache"
        not in runtime(pod_specs(render(md(), LLAMA_8B_L4, config(neuron_cache_uri="s3://x/")))[0])[
            "args"
        ]
    )


def test_trainium_spot_with_a_shared_node_class(rendered: dict[str, Rendered]) -> None:
    result = rendered["trainium-spot-shared-class"]
    assert result.pool_name == "modelship-trn1-32xlarge-spot"
    assert kinds(result.node_pool_objects) == ["NodePool"]  # the configured EC2NodeClass is reused
    node_pool = result.node_pool_objects[0]
    spec = node_pool["spec"]["template"]["spec"]
    assert spec["nodeClassRef"] == {
        "group": "karpenter.k8s.aws",
        "kind": "EC2NodeClass",
        "name": "gpu-default",
    }
    requirements = {r["key"]: r["values"] for r in spec["requirements"]}
    assert requirements["karpenter.sh/capacity-type"] == ["spot"]
    assert requirements["node.kubernetes.io/instance-type"] == ["trn1.32xlarge"]
    assert node_pool["spec"]["limits"] == {"aws.amazon.com/neuron": "48"}  # 16 chips x (2 + 1)
    (pod,) = pod_specs(result)
    assert arg_value(runtime(pod)["args"], "--device") == "neuron"
    assert runtime(pod)["resources"]["limits"] == {"aws.amazon.com/neuron": "16"}


def test_karpenter_pool_objects(rendered: dict[str, Rendered]) -> None:
    result = rendered["gpu-tp8-fsx"]
    assert result.node_pool_objects == []  # eks-nodegroup mode
    node_class, node_pool = render(md(), LLAMA_70B_A100, CONFIG).node_pool_objects
    assert (
        node_class["metadata"]["name"]
        == node_pool["metadata"]["name"]
        == "modelship-p4de-24xlarge-od"
    )
    spec = node_class["spec"]
    assert spec["amiSelectorTerms"] == [{"alias": "al2023@latest"}]
    assert spec["role"] == "KarpenterNodeRole-prod-eks"
    assert spec["subnetSelectorTerms"] == [{"tags": {"karpenter.sh/discovery": "prod-eks"}}]
    assert spec["securityGroupSelectorTerms"] == [{"tags": {"karpenter.sh/discovery": "prod-eks"}}]
    assert spec["instanceStorePolicy"] == "RAID0"
    (root,) = spec["blockDeviceMappings"]
    # 141 GiB x 1.2 = 169.2 -> 190 GiB of local need (the pod's) + 100 GiB.
    assert root["ebs"]["volumeSize"] == "290Gi" and root["ebs"]["volumeType"] == "gp3"
    assert root["rootVolume"] is True
    assert spec["metadataOptions"]["httpPutResponseHopLimit"] == 1
    pool = node_pool["spec"]
    requirements = {r["key"]: r["values"] for r in pool["template"]["spec"]["requirements"]}
    assert requirements == {
        "node.kubernetes.io/instance-type": ["p4de.24xlarge"],
        "karpenter.sh/capacity-type": ["on-demand"],
        "kubernetes.io/arch": ["amd64"],
        "kubernetes.io/os": ["linux"],
    }
    assert (
        pool["template"]["metadata"]["labels"]["modelship.dev/pool"] == "modelship-p4de-24xlarge-od"
    )
    assert {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"} in pool["template"][
        "spec"
    ]["taints"]
    assert pool["disruption"]["consolidationPolicy"] == "WhenEmpty"
    assert pool["disruption"]["consolidateAfter"] == "10m"
    assert pool["disruption"]["budgets"] == [{"nodes": "1"}]
    assert pool["limits"] == {"nvidia.com/gpu": "16"}  # 8 GPUs x (1 replica + 1 surge)


def test_karpenter_pool_limit_counts_whole_nodes(rendered: dict[str, Rendered]) -> None:
    # A pod using 1 of the 4 GPUs of a g6.12xlarge: each node Karpenter launches adds 4 GPUs.
    pool = by_kind(
        render(md(replicas={"min": 1, "max": 3}), LLAMA_8B_L4_SHARED, CONFIG).node_pool_objects,
        "NodePool",
    )
    assert pool["spec"]["limits"] == {"nvidia.com/gpu": "16"}


def test_karpenter_mode_needs_cluster_name_and_role() -> None:
    with pytest.raises(RenderError, match="MODELSHIP_CLUSTER_NAME and MODELSHIP_NODE_ROLE"):
        render(md(), LLAMA_8B_L4, OperatorConfig())
    # An existing EC2NodeClass needs neither.
    assert render(md(), LLAMA_8B_L4, OperatorConfig(node_class_name="default")).node_pool_objects


def test_eks_nodegroup_request(rendered: dict[str, Rendered]) -> None:
    group = rendered["gpu-tp8-fsx"].node_group
    assert group is not None
    assert group.name == "modelship-p4de-24xlarge-od"
    assert group.instance_types == ["p4de.24xlarge"]
    assert group.capacity_type == "ON_DEMAND"
    assert group.ami_type == "AL2023_x86_64_NVIDIA"
    assert group.disk_size_gib == 290
    assert (group.min_size, group.desired_size, group.max_size) == (0, 2, 3)
    assert group.labels == {"modelship.dev/pool": "modelship-p4de-24xlarge-od"}
    assert group.taints == [
        {"key": "nvidia.com/gpu", "value": "true", "effect": "NO_SCHEDULE"},
        {
            "key": "modelship.dev/pool",
            "value": "modelship-p4de-24xlarge-od",
            "effect": "NO_SCHEDULE",
        },
    ]
    (pod,) = pod_specs(rendered["gpu-tp8-fsx"])
    assert pod["nodeSelector"]["modelship.dev/pool"] == group.name
    neuron = render(
        md(),
        LLAMA_70B_TRN1.model_copy(update={"capacity_type": "spot"}),
        config(node_pool_mode="eks-nodegroup"),
    ).node_group
    assert (
        neuron is not None
        and neuron.ami_type == "AL2023_x86_64_NEURON"
        and neuron.capacity_type == "SPOT"
    )
    assert neuron.taints[0]["key"] == "aws.amazon.com/neuron"


def test_pool_names_are_shared_and_dns_safe() -> None:
    first = render(md("a"), LLAMA_8B_L4, CONFIG)
    second = render(md("b", replicas={"min": 1, "max": 5}), LLAMA_8B_L4, CONFIG)
    spot = render(md("c"), LLAMA_8B_L4.model_copy(update={"capacity_type": "spot"}), CONFIG)
    other = render(md("d"), LLAMA_70B_A100, CONFIG)
    assert first.pool_name == second.pool_name == "modelship-g6-xlarge-od"
    assert spot.pool_name == "modelship-g6-xlarge-spot"
    assert other.pool_name == "modelship-p4de-24xlarge-od"
    for result in (first, second, spot, other):
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", result.pool_name)
    # Two ModelDeployments' views of one pool merge into one NodePool whose limit covers both.
    merged = merge_node_pool_objects([first.node_pool_objects, second.node_pool_objects])
    assert kinds(merged) == ["EC2NodeClass", "NodePool"]
    assert by_kind(merged, "NodePool")["spec"]["limits"] == {"nvidia.com/gpu": str(2 + 6)}
    validate_object(by_kind(merged, "NodePool"))


def test_fixed_replicas_render_no_autoscaler(rendered: dict[str, Rendered]) -> None:
    children = rendered["gpu-tp8-fsx"].children
    assert children[0]["spec"]["replicas"] == 2
    assert not {"ScaledObject", "HorizontalPodAutoscaler"} & set(kinds(children))
    pdb = by_kind(children, "PodDisruptionBudget")
    assert pdb["spec"] == {
        "minAvailable": 1,
        "selector": {
            "matchLabels": {
                "app.kubernetes.io/name": "modelship-runtime",
                "modelship.dev/model-deployment": "llama-3-70b",
            }
        },
    }
    # At most one replica: a budget would allow its disruption anyway, so there is none.
    assert "PodDisruptionBudget" not in kinds(rendered["gpu-s3-karpenter-fixed"].children)


def test_keda_scaled_object(rendered: dict[str, Rendered]) -> None:
    children = rendered["gpu-s3-keda"].children
    deployment = children[0]
    assert "replicas" not in deployment["spec"]
    scaled = by_kind(children, "ScaledObject")["spec"]
    assert scaled["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "llama-3-8b",
    }
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (1, 4)
    assert "idleReplicaCount" not in scaled
    queue, kv = scaled["triggers"]
    assert queue["type"] == kv["type"] == "prometheus"
    assert queue["metadata"]["query"] == (
        'sum(vllm:num_requests_waiting{namespace="serving",model_name="llama-3-8b"})'
    )
    assert queue["metadata"]["threshold"] == "4"  # spec.replicas.targetQueueLength default
    assert (
        kv["metadata"]["query"]
        == 'avg(vllm:kv_cache_usage_perc{namespace="serving",model_name="llama-3-8b"})'
    )
    assert kv["metadata"]["threshold"] == "0.85" and kv["metricType"] == "Value"
    assert queue["metadata"]["serverAddress"].startswith("http://")
    behavior = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 600


def test_scale_to_zero(rendered: dict[str, Rendered]) -> None:
    scaled = by_kind(rendered["gpu-s3-scale-to-zero"].children, "ScaledObject")["spec"]
    assert scaled["idleReplicaCount"] == 0
    assert scaled["minReplicaCount"] == 1  # KEDA needs idleReplicaCount < minReplicaCount
    assert scaled["maxReplicaCount"] == 3
    assert scaled["cooldownPeriod"] >= 1800
    # The wake-up signal: requests the activator holds for this ModelDeployment.
    wake = next(t for t in scaled["triggers"] if t["name"] == "activator")
    assert wake["metadata"]["query"] == (
        'sum(modelship_activator_pending_requests{namespace="serving",model_deployment="llama-3-8b"})'
    )
    assert wake["metadata"]["activationThreshold"] == "0"
    assert wake["metadata"]["serverAddress"] == CONFIG.prometheus_url
    # Clients go through the activator: the Service refuses connections at zero.
    ref = SCENARIOS["gpu-s3-scale-to-zero"][0]
    assert endpoint_url(ref, CONFIG) == f"{ACTIVATOR}/models/serving/llama-3-8b/v1"
    # Fixed replicas keep no activator trigger.
    keda = by_kind(rendered["gpu-s3-keda"].children, "ScaledObject")["spec"]
    assert [t["name"] for t in keda["triggers"]] == ["queue", "kv-cache"]
    # min 0 without a max autoscales 0..1.
    lone = by_kind(render(md(replicas={"min": 0}), LLAMA_8B_L4, CONFIG).children, "ScaledObject")
    assert lone["spec"]["maxReplicaCount"] == 1 and lone["spec"]["idleReplicaCount"] == 0
    # No autoscaler configured: never left at zero.
    deployment = render(
        md(replicas={"min": 0, "max": 3}), LLAMA_8B_L4, config(autoscaler="none")
    ).children[0]
    assert deployment["spec"]["replicas"] == 1


def test_scale_to_zero_without_the_activator_is_refused() -> None:
    no_activator = CONFIG.model_copy(update={"activator_url": ""})
    with pytest.raises(RenderError, match=r"spec.replicas.min 0 .*MODELSHIP_ACTIVATOR_URL"):
        render(md(replicas={"min": 0, "max": 3}), LLAMA_8B_L4, no_activator)
    # An HPA (never at zero) or fixed replicas need no activator.
    render(
        md(replicas={"min": 0, "max": 3}), LLAMA_8B_L4, config(autoscaler="hpa", activator_url="")
    )
    render(md(replicas={"min": 1, "max": 3}), LLAMA_8B_L4, no_activator)


def test_hpa(rendered: dict[str, Rendered]) -> None:
    hpa = by_kind(rendered["gpu-hpa"].children, "HorizontalPodAutoscaler")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    (metric,) = hpa["metrics"]
    assert metric["pods"]["metric"]["name"] == "vllm:num_requests_waiting"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    assert "ScaledObject" not in kinds(rendered["gpu-hpa"].children)
    zero = by_kind(
        render(md(replicas={"min": 0, "max": 2}), LLAMA_8B_L4, config(autoscaler="hpa")).children,
        "HorizontalPodAutoscaler",
    )
    assert zero["spec"]["minReplicas"] == 1  # an HPA cannot scale to zero


def test_pod_monitor_scrapes_vllm_and_runtime(rendered: dict[str, Rendered]) -> None:
    monitor = by_kind(rendered["gpu-s3-keda"].children, "PodMonitor")["spec"]
    assert monitor["podMetricsEndpoints"] == [
        {"port": "http", "path": "/metrics", "interval": "15s"},
        {"port": "metrics", "path": "/metrics", "interval": "15s"},
    ]
    assert monitor["selector"]["matchLabels"]["modelship.dev/model-deployment"] == "llama-3-8b"
    assert "PodMonitor" not in kinds(rendered["gpu-efs-none"].children)


def test_service_and_endpoint(rendered: dict[str, Rendered]) -> None:
    service = by_kind(rendered["gpu-s3-keda"].children, "Service")
    assert service["metadata"]["name"] == "llama-3-8b"
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    ]
    deployment = rendered["gpu-s3-keda"].children[0]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert (
        endpoint_url(SCENARIOS["gpu-s3-keda"][0], CONFIG)
        == "http://llama-3-8b.serving.svc.cluster.local:8000/v1"
    )


def test_image_override() -> None:
    ref = md(serving={"image": "registry.example.com/runtime:patched"})
    assert (
        runtime(pod_specs(render(ref, LLAMA_70B_TRN1, CONFIG))[0])["image"]
        == "registry.example.com/runtime:patched"
    )


def test_names_too_long_for_a_service_are_refused() -> None:
    with pytest.raises(RenderError, match=r"metadata.name .* at most 63"):
        render(md("x" * 64), LLAMA_8B_L4, CONFIG)
    with pytest.raises(RenderError, match="at most 52"):
        render(md("x" * 60), LLAMA_405B_H100, CONFIG)


def test_render_documents_is_a_yaml_stream_in_apply_order() -> None:
    documents = render_documents(md(replicas={"min": 1, "max": 2}), LLAMA_8B_L4, CONFIG)
    assert kinds(documents) == [
        "EC2NodeClass",
        "NodePool",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ScaledObject",
        "PodMonitor",
    ]
    text = yaml.safe_dump_all(documents, sort_keys=False)
    assert list(yaml.safe_load_all(text)) == documents
    # No object shares a dict or list with another place: no YAML anchors, and a caller that
    # edits one field (apply's merge) cannot change another.
    for name, args in SCENARIOS.items():
        dumped = yaml.safe_dump_all(render_documents(*args), sort_keys=False)
        assert "&id" not in dumped and "*id" not in dumped, name


def test_render_is_deterministic() -> None:
    ref = md(replicas={"min": 0, "max": 3})
    assert render_documents(ref, LLAMA_405B_H100, CONFIG) == render_documents(
        ref, LLAMA_405B_H100, CONFIG
    )


SINGLE_NODE = [name for name, (_, place, _) in SCENARIOS.items() if place.nodes == 1]


@pytest.mark.parametrize("scenario", SINGLE_NODE)
def test_the_runtime_accepts_the_rendered_command_line(
    rendered: dict[str, Rendered], scenario: str
) -> None:
    ref, place, config = SCENARIOS[scenario]
    (pod,) = pod_specs(rendered[scenario])
    container = runtime(pod)
    args, engine_args = parse_args(container["args"], env={})
    assert args.source == ref.spec.model.uri
    if isinstance(ref.spec.model.source, S3Source) and node_cache_enabled(config):
        assert (args.model_dir, str(args.node_cache)) == (None, "/models")
        assert args.node_cache_key == node_cache_dir_name(ref, config)
    else:
        assert (str(args.model_dir), args.node_cache) == (f"/models/{ref.name}", None)
    assert args.port == 8000 and args.metrics_port == 9400
    assert args.device == ("cuda" if place.accelerator_vendor == "nvidia" else "neuron")
    assert args.predicted_kv_cache_tokens == place.kv_cache_tokens
    # The runtime gives up on vLLM no later than the startup probe would kill it, and stops
    # vLLM before the kubelet's grace period (minus the preStop sleep) runs out.
    startup = container["startupProbe"]
    assert args.ready_timeout_seconds <= startup["failureThreshold"] * startup["periodSeconds"]
    assert args.stop_grace_seconds < pod["terminationGracePeriodSeconds"] - 15
    assert engine_args[-len(place.engine_args) :] == place.engine_args
    # The neuron compile artifacts land on the cache volume.
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert any(str(args.neuron_artifacts_dir).startswith(path) for path in mounts)


def test_the_runtime_accepts_the_multi_node_command_lines(rendered: dict[str, Rendered]) -> None:
    leader, worker = pod_specs(rendered["multi-node-keda"])
    leader_args, _ = parse_args(runtime(leader)["args"], env={})
    worker_args, _ = parse_args(runtime(worker)["args"], env={})
    assert (leader_args.role, worker_args.role) == ("leader", "worker")
    assert leader_args.nodes == worker_args.nodes == 2
    assert worker_args.leader_address == "$(LWS_LEADER_ADDRESS)"


class TestWithTheRealSizingEngine:
    """Placements straight from make_plan (the built-in catalog), rendered and validated."""

    @pytest.mark.parametrize(
        ("model_config", "parameters", "accelerator", "expect_nodes"),
        [
            ("LLAMA_3_8B", 8_030_261_248, {}, 1),
            # 2 x g6.12xlarge (TP 4 x PP 2) is cheaper than any one node that holds 70B bf16.
            ("LLAMA_3_70B", 70_553_706_496, {}, 2),
            ("LLAMA_3_1_405B", 405_853_388_800, {"instanceTypes": ["p5.48xlarge"]}, 2),
            # AWS NxD Inference: 405B at TP 128 over 4 x trn1.32xlarge, 8 EFA devices each.
            ("LLAMA_3_1_405B", 405_853_388_800, {"instanceTypes": ["trn1.32xlarge"]}, 4),
            ("LLAMA_3_8B", 8_030_261_248, {"family": "inferentia"}, 1),
            ("LLAMA_3_70B", 70_553_706_496, {"family": "trainium"}, 1),
        ],
    )
    def test_sized_placements_render_valid_objects(
        self,
        model_config: str,
        parameters: int,
        accelerator: dict[str, Any],
        expect_nodes: int,
    ) -> None:
        from modelship.operator.catalog import load_catalog
        from modelship.operator.modelinfo import model_info_from_config
        from modelship.operator.sizing import make_plan

        from . import configs

        info = model_info_from_config(
            getattr(configs, model_config), weights=None, parameters=parameters, files=None
        )
        body = {
            "model": {"uri": "s3://models-prod/model/"},
            "accelerator": accelerator,
            "replicas": {"min": 0, "max": 2},
        }
        plan = make_plan(info, load_spec(body), load_catalog())
        assert plan.chosen is not None, plan.suggestions
        ref = ModelDeploymentRef(
            name="sized", namespace="serving", uid=UID, generation=1, spec=load_spec(body)
        )
        result = render(ref, plan.chosen, CONFIG)
        assert plan.chosen.nodes == expect_nodes
        for obj in [*result.node_pool_objects, *result.children]:
            validate_object(obj)
        container = runtime(pod_specs(result)[0])
        # Multi-node replicas also ask for the node's EFA devices (SN 1.7: ai-on-eks multi-node
        # blueprints request vpc.amazonaws.com/efa), on their own EFA node pool.
        efa = (
            {"vpc.amazonaws.com/efa": str(plan.chosen.efa_interfaces)}
            if plan.chosen.nodes > 1
            else {}
        )
        assert (plan.chosen.efa_interfaces > 0) == (plan.chosen.nodes > 1)
        assert container["resources"]["limits"] == {
            plan.chosen.resource_name: str(plan.chosen.resource_count),
            **efa,
        }
        assert result.pool_name.endswith("-efa") == (plan.chosen.nodes > 1)
        pools = [o for o in result.node_pool_objects if o["kind"] == "NodePool"]
        for pool in pools:
            labels = pool["spec"]["template"]["metadata"]["labels"]
            assert (labels.get("modelship.dev/efa") == "true") == (plan.chosen.nodes > 1)
        if plan.chosen.nodes == 1:
            _, engine_args = parse_args(container["args"], env={})
            assert engine_args == plan.chosen.engine_args


# --- one download per node -----------------------------------------------------------------------


def models_volume(result: Rendered) -> dict[str, Any]:
    (pod,) = pod_specs(result)
    return next(v for v in pod["volumes"] if v["name"] == "models")


def test_node_cache_is_off_without_a_node_class_modelship_prepares() -> None:
    ref = md()
    for config in (
        CONFIG.model_copy(update={"node_cache": "disabled"}),
        OperatorConfig(node_pool_mode="eks-nodegroup", subnet_ids=("subnet-1",)),
        OperatorConfig(node_pool_mode="none"),
        CONFIG.model_copy(update={"node_class_name": "default"}),
    ):
        result = render(ref, LLAMA_8B_L4, config)
        assert models_volume(result) == {"name": "models", "emptyDir": {"sizeLimit": "40Gi"}}
        args = runtime(pod_specs(result)[0])["args"]
        assert args[args.index("--model-dir") + 1] == "/models/llama-3-8b"
        assert "--node-cache" not in args
        assert runtime(pod_specs(result)[0])["resources"]["requests"]["ephemeral-storage"] == "40Gi"
        assert all("userData" not in o["spec"] for o in result.node_pool_objects)


def test_node_cache_on_for_nodes_prepared_another_way() -> None:
    config = OperatorConfig(node_pool_mode="none", node_cache="enabled")
    ref = md()
    result = render(ref, LLAMA_8B_L4, config)
    assert models_volume(result)["hostPath"] == {
        "path": f"{NODE_CACHE_DIR}/{node_cache_dir_name(ref, config)}",
        "type": "Directory",
    }


def test_a_pod_mounts_only_its_own_models_cache_directory() -> None:
    # Two namespaces serving the same source: separate directories, and neither pod's serving
    # container can see the cache root (only the operator-image init container mounts it).
    team_a, team_b = md(namespace="team-a"), md(namespace="team-b")
    custom = md(namespace="team-c", serving={"image": "registry.example/tenant/vllm:evil"})
    paths = set()
    for ref in (team_a, team_b, custom):
        (pod,) = pod_specs(render(ref, LLAMA_8B_L4, CONFIG))
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        container = runtime(pod)
        mounted = {mount["name"] for mount in container["volumeMounts"]}
        host_paths = {
            volumes[name]["hostPath"]["path"] for name in mounted if "hostPath" in volumes[name]
        }
        assert host_paths == {f"{NODE_CACHE_DIR}/{node_cache_dir_name(ref, CONFIG)}"}
        assert NODE_CACHE_DIR not in host_paths
        (init,) = pod["initContainers"]
        assert init["image"] == CONFIG.runtime_image  # never the tenant's image
        assert init["volumeMounts"] == [{"name": "node-cache-root", "mountPath": "/node-cache"}]
        assert volumes["node-cache-root"]["hostPath"]["path"] == NODE_CACHE_DIR
        assert init["securityContext"]["runAsNonRoot"] is True
        assert init["args"][init["args"].index("--key") + 1] == node_cache_dir_name(ref, CONFIG)
        paths |= host_paths
    assert len(paths) == 3


def test_volume_sources_served_in_place_never_use_the_node_cache() -> None:
    ref = md(uri="fsx://fsx-models/llama")
    (pod,) = pod_specs(render(ref, LLAMA_8B_L4, CONFIG))
    assert "models" not in {v["name"] for v in pod["volumes"]}
    assert all("hostPath" not in v for v in pod["volumes"])


def test_the_node_class_prepares_the_node_cache_for_the_runtime_user(tmp_path: Any) -> None:
    import subprocess

    node_class = by_kind(render(md(), LLAMA_8B_L4, CONFIG).node_pool_objects, "EC2NodeClass")
    user_data = node_class["spec"]["userData"]
    assert RUNTIME_UID == NODE_CACHE_UID
    assert 'Content-Type: multipart/mixed; boundary="MODELSHIP"' in user_data
    assert "After=setup-local-disks.service" in user_data and "Before=kubelet.service" in user_data
    assert f"install -d -o {RUNTIME_UID} -g {RUNTIME_UID} -m 0750 {NODE_CACHE_DIR}" in user_data
    # The shell part and the script it installs both parse.
    shell = user_data.split('charset="us-ascii"\n\n', 1)[1].split("\n--MODELSHIP--", 1)[0]
    installed = shell.split("<<'SCRIPT'\n", 1)[1].split("SCRIPT\n", 1)[0]
    for name, text in (("user-data.sh", shell), ("modelship-node-cache", installed)):
        path = tmp_path / name
        path.write_text(text)
        subprocess.run(["bash", "-n", str(path)], check=True)


# A g5g (Graviton + T4G) node has no instance store: EBS only.
LLAMA_8B_EBS = placement("g5g.xlarge", weight_bytes=16 * GIB)


@pytest.mark.parametrize(
    ("ref", "chosen", "node_cache", "expected"),
    [
        # The node cache on local NVMe serves later pods: land.
        (md(), LLAMA_8B_L4, "enabled", "land"),
        (md(), LLAMA_70B_A100, "enabled", "land"),
        # Nothing on the node would reuse a landed copy: stream.
        (md(), LLAMA_8B_L4, "disabled", "stream"),
        # EBS only: stream, cache or not.
        (md(), LLAMA_8B_EBS, "enabled", "stream"),
        (md(), LLAMA_8B_EBS, "disabled", "stream"),
        # What the streamer cannot load lands: volumes, pickles, Neuron, multi-node.
        (md(uri="fsx://models-lustre/llama"), LLAMA_8B_EBS, "disabled", "land"),
        (md(uri="efs://models-efs/llama"), LLAMA_8B_EBS, "enabled", "land"),
        (md(model={"trustPickle": True}), LLAMA_8B_EBS, "disabled", "land"),
        (md(), LLAMA_8B_INF2, "disabled", "land"),
        (md(), LLAMA_405B_H100, "disabled", "land"),
    ],
)
def test_weights_mode_per_source_and_node(
    ref: ModelDeploymentRef, chosen: Placement, node_cache: str, expected: str
) -> None:
    chosen_config = config(node_cache=node_cache, node_pool_mode="none")
    assert weights_mode(ref, chosen, chosen_config) == expected
    for pod_spec in pod_specs(render(ref, chosen, chosen_config)):
        args, _ = parse_args(runtime(pod_spec)["args"], env={})
        assert args.weights == expected
        if expected == "stream":
            # Streaming needs a per-pod model directory for config and tokenizer, never the cache.
            assert args.node_cache is None
            assert str(args.model_dir) == f"/models/{ref.name}"
            volumes = {v["name"]: v for v in pod_spec["volumes"]}
            assert "emptyDir" in volumes["models"]
            assert "node-cache-root" not in volumes


def test_instance_store_families() -> None:
    assert has_instance_store("g6e.12xlarge")
    assert has_instance_store("p6-b200.48xlarge")
    assert has_instance_store("trn1.32xlarge")
    assert not has_instance_store("inf2.8xlarge")
    assert not has_instance_store("g5g.xlarge")
