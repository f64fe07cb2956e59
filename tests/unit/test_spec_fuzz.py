"""Fuzzing load_spec: whatever a user writes, the only failure is a SpecError naming a spec field."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modelship.operator.api import ModelDeploymentSpec, SpecError, load_spec

# Real field names (camelCase, as in Kubernetes objects) at every level, plus a few wrong ones.
FIELDS: dict[str, list[str]] = {
    "": ["model", "serving", "accelerator", "replicas"],
    "model": [
        "uri",
        "name",
        "parameters",
        "quantization",
        "task",
        "trustPickle",
        "copyToLocalDisk",
        "architecture",
    ],
    "architecture": [
        "numLayers",
        "hiddenSize",
        "numAttentionHeads",
        "numKeyValueHeads",
        "headDim",
        "vocabSize",
        "maxPositionEmbeddings",
        "slidingWindow",
        "numExperts",
    ],
    "serving": [
        "maxModelLen",
        "concurrency",
        "kvCacheDtype",
        "gpuMemoryUtilization",
        "sampling",
        "engineArgs",
        "image",
    ],
    "sampling": ["temperature", "topP", "topK", "maxTokens"],
    "accelerator": [
        "family",
        "instanceTypes",
        "excludeInstanceTypes",
        "maxAccelerators",
        "maxCostPerHour",
        "capacityType",
    ],
    "replicas": ["min", "max", "targetQueueLength"],
}
WRONG = ["", "Model", "max_model_len", "üñí", "spec", "0"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        [
            "s3://bucket/llama",
            "file:///models/x",
            "fsx://claim/p",
            "efs://c/",
            "s3://B/x",
            "http://x",
            "8B",
            "70.6B",
            "-1B",
            "auto",
            "fp8",
            "int4-awq",
            "nvidia",
            "spot",
            "--max-model-len=5",
            "--enable-prefix-caching",
            "g6e.*",
        ]
    ),
)


def values(level: str) -> st.SearchStrategy[Any]:
    nested = [name for name in FIELDS.get(level, []) if name in FIELDS]
    children = [mapping(name) for name in nested]
    return st.one_of(scalars, st.lists(scalars, max_size=3), *children)


def mapping(level: str) -> st.SearchStrategy[dict[str, Any]]:
    keys = st.sampled_from(FIELDS[level] + WRONG)
    return st.dictionaries(keys, st.deferred(lambda: values(level)), max_size=6)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mapping(""))
def test_load_spec_fails_only_with_a_named_spec_field(spec: dict[str, Any]) -> None:
    try:
        loaded = load_spec(spec)
    except SpecError as error:
        assert error.field.startswith("spec"), error.field
        assert error.field.startswith("spec."), (error.field, error.message)
        assert error.message, "a SpecError must say what is wrong"
        assert str(error).startswith(error.field)
    else:
        assert isinstance(loaded, ModelDeploymentSpec)


@settings(max_examples=200, deadline=None)
@given(st.one_of(scalars, st.lists(scalars, max_size=3)))
def test_non_mapping_spec_is_a_spec_error(spec: Any) -> None:
    try:
        load_spec(spec)
    except SpecError as error:
        assert error.field.startswith("spec")


def test_cross_field_error_names_the_field() -> None:
    spec = {"model": {"uri": "s3://bucket/llama"}, "replicas": {"min": 3, "max": 1}}
    try:
        load_spec(spec)
    except SpecError as error:
        assert error.field.startswith("spec."), (error.field, error.message)
    else:
        raise AssertionError("replicas.max < replicas.min was accepted")
