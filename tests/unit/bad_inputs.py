"""A corpus of hostile and invalid ModelDeployment inputs, each with the field its refusal must
name. Data only: tests/unit/test_bad_inputs.py runs it through the API validation, `modelship
plan`, `modelship render` and the operator's source policy; the running-operator leg (real
control plane) reuses the same list.

Each entry is (id, patch, field): `patch` is deep-merged over a valid ModelDeployment whose model
is a tiny local Llama (file://, which the CLI accepts); a patch value of DELETE removes the key.
`field` is the dotted path the error message must start with. `stage` says where the refusal
happens: "api" (schema and cross-field rules, before anything is read), "plan" (sizing, after the
model is read) or "operator" (the operator's own policy; the CLI accepts it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

DELETE = object()


@dataclass(frozen=True)
class BadInput:
    id: str
    patch: dict[str, Any]
    field: str
    stage: Literal["api", "plan", "operator"] = "api"
    notes: list[str] = field(default_factory=list)


def _spec(**parts: Any) -> dict[str, Any]:
    return {"spec": parts}


def _model(**values: Any) -> dict[str, Any]:
    return _spec(model=values)


def _serving(**values: Any) -> dict[str, Any]:
    return _spec(serving=values)


def _accelerator(**values: Any) -> dict[str, Any]:
    return _spec(accelerator=values)


def _replicas(**values: Any) -> dict[str, Any]:
    return _spec(replicas=values)


def _engine(*args: Any) -> dict[str, Any]:
    return _serving(engineArgs=list(args))


URI = "spec.model.uri"
ENGINE = "spec.serving.engineArgs"

BAD_INPUTS: list[BadInput] = [
    # --- the object itself
    BadInput("kind", {"kind": "Deployment"}, "kind"),
    BadInput("api-version", {"apiVersion": "modelship.dev/v1"}, "apiVersion"),
    BadInput("no-name", {"metadata": {"name": DELETE}}, "metadata.name"),
    BadInput("unknown-spec-field", _spec(replica=3), "spec.replica"),
    BadInput("no-model", _spec(model=DELETE), "spec.model"),
    # --- hostile and malformed URIs
    BadInput("uri-empty", _model(uri=""), URI),
    BadInput("uri-no-scheme", _model(uri="/etc/passwd"), URI),
    BadInput("uri-http", _model(uri="http://169.254.169.254/latest/meta-data/"), URI),
    BadInput("uri-gs", _model(uri="gs://bucket/model"), URI),
    BadInput("uri-bucket-case", _model(uri="s3://Bucket_Name/model"), URI),
    BadInput("uri-bucket-short", _model(uri="s3://ab/model"), URI),
    BadInput("uri-s3-dotdot", _model(uri="s3://models/a/../../etc"), URI),
    BadInput("uri-fsx-dotdot", _model(uri="fsx://claim/../../etc"), URI),
    BadInput("uri-efs-claim", _model(uri="efs://Bad_Claim/model"), URI),
    BadInput("uri-file-relative", _model(uri="file://etc/passwd"), URI),
    BadInput("uri-file-dotdot", _model(uri="file:///models/../etc"), URI),
    BadInput("uri-not-a-string", _model(uri=["s3://models/m/"]), URI),
    BadInput("uri-file-host-dir", _model(uri="file:///etc"), URI, stage="operator"),
    BadInput("uri-file-root", _model(uri="file:///"), URI, stage="operator"),
    # --- model fields
    BadInput("parameters-negative", _model(parameters="-5B"), "spec.model.parameters"),
    BadInput("parameters-words", _model(parameters="lots"), "spec.model.parameters"),
    BadInput("parameters-zero", _model(parameters=0), "spec.model.parameters"),
    BadInput("parameters-bool", _model(parameters=True), "spec.model.parameters"),
    BadInput("quantization", _model(quantization="int3"), "spec.model.quantization"),
    BadInput("task", _model(task="classify"), "spec.model.task"),
    BadInput("trust-pickle", _model(trustPickle="maybe"), "spec.model.trustPickle"),
    BadInput("trust-remote-code", _model(trustRemoteCode="maybe"), "spec.model.trustRemoteCode"),
    BadInput("name-too-long", _model(name="m" * 300), "spec.model.name"),
    BadInput(
        "architecture-layers",
        _model(architecture={"numLayers": 0}),
        "spec.model.architecture.numLayers",
    ),
    BadInput(
        "architecture-unknown",
        _model(architecture={"layers": 2}),
        "spec.model.architecture.layers",
    ),
    BadInput(
        "copy-to-local-s3",
        _model(uri="s3://models/m/", copyToLocalDisk=True),
        "spec.model.copyToLocalDisk",
    ),
    # --- serving
    BadInput("max-model-len-tiny", _serving(maxModelLen=8), "spec.serving.maxModelLen"),
    BadInput("max-model-len-negative", _serving(maxModelLen=-1), "spec.serving.maxModelLen"),
    BadInput("max-model-len-string", _serving(maxModelLen="long"), "spec.serving.maxModelLen"),
    BadInput("concurrency-zero", _serving(concurrency=0), "spec.serving.concurrency"),
    BadInput("concurrency-huge", _serving(concurrency=100000), "spec.serving.concurrency"),
    BadInput("kv-cache-dtype", _serving(kvCacheDtype="int4"), "spec.serving.kvCacheDtype"),
    BadInput(
        "gpu-memory-high", _serving(gpuMemoryUtilization=0.99), "spec.serving.gpuMemoryUtilization"
    ),
    BadInput(
        "gpu-memory-low", _serving(gpuMemoryUtilization=0.1), "spec.serving.gpuMemoryUtilization"
    ),
    BadInput(
        "temperature", _serving(sampling={"temperature": 5}), "spec.serving.sampling.temperature"
    ),
    BadInput("top-p", _serving(sampling={"topP": 0}), "spec.serving.sampling.topP"),
    BadInput("engine-args-not-a-list", _serving(engineArgs="--enforce-eager"), ENGINE),
    BadInput("engine-args-number", _engine(123), ENGINE),
    BadInput("engine-max-model-len-underscore", _engine("--max_model_len", "99999"), ENGINE),
    BadInput("engine-max-model-len-equals", _engine("--max-model-len=99999"), ENGINE),
    BadInput("engine-max-model-len-prefix", _engine("--max-model", "99999"), ENGINE),
    BadInput("engine-tp-short", _engine("-tp", "8"), ENGINE),
    BadInput("engine-quantization-joined", _engine("-qfp8"), ENGINE),
    BadInput("engine-memory-alias", _engine("--device-memory-utilization", "0.99"), ENGINE),
    BadInput("engine-kv-bytes", _engine("--kv-cache-memory-bytes", "100000000000"), ENGINE),
    BadInput("engine-trust-remote-code", _engine("--trust-remote-code"), ENGINE),
    BadInput("engine-trust-remote-code-underscore", _engine("--trust_remote_code"), ENGINE),
    BadInput("engine-model", _engine("--model", "/etc"), ENGINE),
    BadInput("engine-bare-value", _engine("--enable-prefix-caching", "/models/other"), ENGINE),
    BadInput("engine-port", _engine("--port=1"), ENGINE),
    BadInput("engine-config-file", _engine("--config", "/models/m/serve.yaml"), ENGINE),
    BadInput("engine-hf-overrides", _engine("--hf-overrides", '{"num_hidden_layers": 1}'), ENGINE),
    BadInput(
        "engine-generation-dotted", _engine("--override-generation-config.temperature", "2"), ENGINE
    ),
    BadInput("engine-unknown", _engine("--no-such-flag"), ENGINE),
    BadInput("engine-ambiguous", _engine("--max-num", "4"), ENGINE),
    BadInput("engine-help", _engine("--help"), ENGINE),
    BadInput("engine-missing-value", _engine("--max-lora-rank"), ENGINE),
    # --- accelerator
    BadInput("family", _accelerator(family="tpu"), "spec.accelerator.family"),
    BadInput(
        "max-accelerators", _accelerator(maxAccelerators=0), "spec.accelerator.maxAccelerators"
    ),
    BadInput("tp-zero", _accelerator(tensorParallelSize=0), "spec.accelerator.tensorParallelSize"),
    BadInput(
        "tp-not-dividing-heads",
        _accelerator(tensorParallelSize=3),
        "spec.accelerator.tensorParallelSize",
        stage="plan",
    ),
    BadInput("cost-negative", _accelerator(maxCostPerHour=-1), "spec.accelerator.maxCostPerHour"),
    BadInput(
        "capacity-type", _accelerator(capacityType="reserved"), "spec.accelerator.capacityType"
    ),
    BadInput(
        "instance-types-string",
        _accelerator(instanceTypes="g6.xlarge"),
        "spec.accelerator.instanceTypes",
    ),
    # --- replicas
    BadInput("min-negative", _replicas(min=-1), "spec.replicas.min"),
    BadInput("max-zero", _replicas(max=0), "spec.replicas.max"),
    BadInput("max-below-min", _replicas(min=3, max=2), "spec.replicas.max"),
    BadInput("queue-zero", _replicas(targetQueueLength=0), "spec.replicas.targetQueueLength"),
]


def base_manifest(model_uri: str) -> dict[str, Any]:
    """A valid ModelDeployment of the tiny model at `model_uri`."""
    return {
        "apiVersion": "modelship.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "corpus", "namespace": "team-a"},
        "spec": {"model": {"uri": model_uri}, "serving": {"maxModelLen": 256}},
    }


def apply_patch(document: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """`patch` deep-merged over a copy of `document` (DELETE removes a key)."""
    result = copy.deepcopy(document)

    def merge(target: dict[str, Any], changes: dict[str, Any]) -> None:
        for key, value in changes.items():
            if value is DELETE:
                target.pop(key, None)
            elif isinstance(value, dict) and isinstance(target.get(key), dict):
                merge(target[key], value)
            else:
                target[key] = copy.deepcopy(value)

    merge(result, patch)
    return result
