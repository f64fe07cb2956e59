"""compilejob: the Neuron compile step of a placement whose serving node cannot compile — the Job
and the temporary pool it renders (validated against the Kubernetes and Karpenter schemas), the
decisions read from the ModelDeployment's annotation and its Jobs, and the status they give."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from modelship.operator.api import load_spec
from modelship.operator.compilejob import (
    COMPILED_ANNOTATION,
    CompileError,
    compile_key,
    compile_pool_name,
    compile_step_problem,
    deadline_seconds,
    job_name,
    predicted_compile_seconds,
    progress,
    render_compile_job,
    render_compile_pool,
)
from modelship.operator.config import OperatorConfig
from modelship.operator.plan import Placement
from modelship.operator.render import MD_LABEL, ModelDeploymentRef, render, runtime_args
from modelship.operator.sizing import make_plan, neuron_compile_host_bytes
from modelship.operator.status import ReconcileFacts, build_status
from modelship.runtime.main import parse_args

from tests.unit.schemas import validate_object
from tests.unit.test_sizing import CATALOG, LLAMA_3_8B

GIB = 1024**3
UID = "8d0a4c1e-55f3-4e0b-9b7a-0c6f1d2e3a4b"
CACHE = "s3://compile-cache/neuron"
CONFIG = OperatorConfig(
    cluster_name="prod-eks", node_role="KarpenterNodeRole-prod-eks", neuron_cache_uri=CACHE
)
NOW = datetime.datetime(2025, 6, 1, 12, 0, tzinfo=datetime.UTC)


def _md(name: str = "llama-inf2", **serving: Any) -> ModelDeploymentRef:
    spec = load_spec(
        {
            "model": {"uri": "s3://models/llama-3-8b"},
            "serving": {"maxModelLen": 4096, "concurrency": 10, **serving},
            "accelerator": {"instanceTypes": ["inf2.xlarge"]},
        }
    )
    return ModelDeploymentRef(name=name, namespace="ml", uid=UID, generation=3, spec=spec)


def _two_step(md: ModelDeploymentRef) -> Placement:
    chosen = make_plan(LLAMA_3_8B, md.spec, CATALOG, compile_step=True).chosen
    assert chosen is not None
    assert (chosen.instance_type, chosen.compile_instance_type) == ("inf2.xlarge", "inf2.8xlarge")
    return chosen


def test_the_job_compiles_what_the_serving_pods_serve() -> None:
    md = _md()
    placement = _two_step(md)
    job = render_compile_job(md, placement, CONFIG)
    validate_object(job)
    assert job["metadata"]["name"] == job_name(md, compile_key(md, placement, CONFIG))
    assert len(job["metadata"]["name"]) <= 63
    assert job["metadata"]["ownerReferences"][0]["uid"] == UID
    assert job["metadata"]["labels"][MD_LABEL] == "llama-inf2"
    spec = job["spec"]
    assert spec["backoffLimit"] == 1
    assert spec["ttlSecondsAfterFinished"] == 86400
    assert spec["activeDeadlineSeconds"] == deadline_seconds(placement)
    assert spec["activeDeadlineSeconds"] > 2 * predicted_compile_seconds(placement)
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    # Not a runtime pod: the serving Service, PDB and PodMonitor must not select it.
    assert MD_LABEL not in spec["template"]["metadata"]["labels"]
    assert pod["nodeSelector"] == {
        "node.kubernetes.io/instance-type": "inf2.8xlarge",
        "modelship.dev/pool": compile_pool_name(md, placement),
    }
    container = pod["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe not in container
    requests = container["resources"]["requests"]
    assert requests["aws.amazon.com/neuron"] == str(placement.resource_count)
    compile_gib = neuron_compile_host_bytes(placement.weight_bytes) / GIB
    assert int(requests["memory"].removesuffix("Gi")) >= compile_gib > 16  # inf2.xlarge: 16 GiB
    assert int(requests["memory"].removesuffix("Gi")) <= 128 * 0.8  # fits inf2.8xlarge
    # The runtime command line the Job runs parses, compiles only, with the serving pods'
    # source, engine arguments and shared cache.
    args, engine_args = parse_args(container["args"], env={})
    assert args.compile_only and args.device == "neuron" and args.neuron_cache == CACHE
    assert not args.neuron_cache_required and args.node_cache is None
    serving = runtime_args(md, placement, CONFIG)
    assert engine_args == serving[serving.index("--") + 1 :]
    assert args.source == "s3://models/llama-3-8b"


def test_serving_pods_restore_and_never_compile() -> None:
    md = _md()
    placement = _two_step(md)
    workload = render(md, placement, CONFIG).children[0]
    container = workload["spec"]["template"]["spec"]["containers"][0]
    args, _ = parse_args(container["args"], env={})
    assert args.neuron_cache_required and args.neuron_cache == CACHE
    assert workload["spec"]["template"]["spec"]["nodeSelector"][
        "node.kubernetes.io/instance-type"
    ] == ("inf2.xlarge")


def test_the_compile_pool_is_temporary_and_its_own() -> None:
    md = _md()
    placement = _two_step(md)
    objects = render_compile_pool(md, placement, CONFIG)
    assert [o["kind"] for o in objects] == ["EC2NodeClass", "NodePool"]
    for obj in objects:
        validate_object(obj)
    name = compile_pool_name(md, placement)
    assert name.startswith("modelship-compile-inf2-8xlarge-") and len(name) <= 63
    assert name != compile_pool_name(_md("other"), placement)  # one per ModelDeployment
    pool = objects[1]
    assert pool["metadata"]["name"] == name
    template = pool["spec"]["template"]["spec"]
    assert {
        "key": "node.kubernetes.io/instance-type",
        "operator": "In",
        "values": ["inf2.8xlarge"],
    } in template["requirements"]
    assert pool["spec"]["disruption"]["consolidationPolicy"] == "WhenEmpty"
    assert pool["spec"]["disruption"]["consolidateAfter"] == "1m"
    assert pool["spec"]["limits"] == {"aws.amazon.com/neuron": "1"}  # one inf2.8xlarge node
    none_mode = CONFIG.model_copy(update={"node_pool_mode": "none"})
    assert render_compile_pool(md, placement, none_mode) == []


@pytest.mark.parametrize(
    ("update", "names"),
    [
        ({"neuron_cache_uri": None}, "runtime.neuronCacheUri"),
        ({"neuron_cache_uri": "/var/cache/neuron"}, "s3:// prefix"),
        ({"node_pool_mode": "eks-nodegroup", "subnet_ids": ("subnet-1",)}, "eks-nodegroup"),
    ],
)
def test_a_compile_step_that_cannot_run_is_refused(update: dict[str, Any], names: str) -> None:
    md = _md()
    placement = _two_step(md)
    config = CONFIG.model_copy(update=update)
    problem = compile_step_problem(config)
    assert problem and names in problem
    with pytest.raises(CompileError, match="ml/llama-inf2"):
        render_compile_job(md, placement, config)
    assert compile_step_problem(CONFIG) is None


def test_the_key_follows_what_is_compiled() -> None:
    md = _md()
    placement = _two_step(md)
    key = compile_key(md, placement, CONFIG)
    assert key == compile_key(md, placement, CONFIG)
    image = md.spec.model_copy(
        update={"serving": md.spec.serving.model_copy(update={"image": "registry/runtime:2"})}
    )
    assert compile_key(_replace(md, spec=image), placement, CONFIG) != key
    other_args = placement.model_copy(
        update={"engine_args": [*placement.engine_args, "--seed", "1"]}
    )
    assert compile_key(md, other_args, CONFIG) != key
    assert job_name(md, compile_key(md, other_args, CONFIG)) != job_name(md, key)
    long = _md("a" * 63)
    assert len(job_name(long, key)) <= 63


def _replace(md: ModelDeploymentRef, **changes: Any) -> ModelDeploymentRef:
    return ModelDeploymentRef(**{**md.__dict__, **changes})


def _job(
    md: ModelDeploymentRef, placement: Placement, condition: str | None, **extra: str
) -> dict[str, Any]:
    conditions = [{"type": condition, "status": "True", **extra}] if condition else []
    name = job_name(md, compile_key(md, placement, CONFIG))
    return {"metadata": {"name": name}, "status": {"conditions": conditions}}


def test_progress_from_the_annotation_and_the_job() -> None:
    md = _md()
    placement = _two_step(md)
    key = compile_key(md, placement, CONFIG)
    cheap = placement.model_copy(update={"compile_instance_type": None})
    assert progress(md, cheap, CONFIG, {}, []) is None
    started = progress(md, placement, CONFIG, {}, [])
    assert started is not None and started.state == "Compiling"
    assert "compiling once on inf2.8xlarge" in started.message
    assert "serving workload on inf2.xlarge starts when it succeeds" in started.message
    running = progress(md, placement, CONFIG, {}, [_job(md, placement, None)])
    assert running == started
    done = progress(md, placement, CONFIG, {}, [_job(md, placement, "Complete")])
    assert done is not None and done.state == "Compiled"
    recorded = progress(md, placement, CONFIG, {COMPILED_ANNOTATION: key}, [])
    assert recorded is not None and recorded.state == "Compiled"
    # A record for another key (the engine arguments changed) does not count.
    stale = progress(md, placement, CONFIG, {COMPILED_ANNOTATION: "0" * 64}, [])
    assert stale is not None and stale.state == "Compiling"
    failed = progress(
        md,
        placement,
        CONFIG,
        {},
        [_job(md, placement, "Failed", reason="DeadlineExceeded", message="Job was active longer")],
    )
    assert failed is not None and (failed.state, failed.reason) == ("Failed", "CompileFailed")
    assert "DeadlineExceeded: Job was active longer" in failed.message
    assert "kubectl logs job/" in failed.message and "delete the Job" in failed.message
    # Another key's Job (an earlier plan) says nothing about this one.
    other = placement.model_copy(update={"engine_args": [*placement.engine_args, "--seed", "1"]})
    assert progress(md, placement, CONFIG, {}, [_job(md, other, "Complete")]) == started


def test_status_while_compiling_and_after_a_failure() -> None:
    md = _md()
    placement = _two_step(md)
    compiling = progress(md, placement, CONFIG, {}, [])
    update = build_status(
        ReconcileFacts(generation=3, placement=placement, compile=compiling), None, NOW
    )
    assert update.status["phase"] == "Compiling"
    conditions = {c["type"]: c for c in update.status["conditions"]}
    assert (conditions["Compiled"]["status"], conditions["Compiled"]["reason"]) == (
        "False",
        "Compiling",
    )
    assert "inf2.8xlarge" in conditions["Compiled"]["message"]
    assert conditions["Degraded"]["status"] == "False"

    failed = progress(
        md,
        placement,
        CONFIG,
        {},
        [
            _job(
                md,
                placement,
                "Failed",
                reason="BackoffLimitExceeded",
                message="Job has reached the specified backoff limit",
            )
        ],
    )
    after = build_status(
        ReconcileFacts(generation=3, placement=placement, compile=failed), update.status, NOW
    )
    assert after.status["phase"] == "Failed"
    conditions = {c["type"]: c for c in after.status["conditions"]}
    assert conditions["Compiled"]["reason"] == "CompileFailed"
    assert (conditions["Degraded"]["status"], conditions["Degraded"]["reason"]) == (
        "True",
        "CompileFailed",
    )
    assert "BackoffLimitExceeded" in after.status["message"]
    assert any(e.type == "Warning" and e.reason == "CompileFailed" for e in after.events)
