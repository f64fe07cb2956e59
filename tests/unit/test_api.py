"""The ModelDeployment API: parsing, validation messages that name the field, the CRD."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from modelship.operator import api
from modelship.operator.api import (
    SpecError,
    check_name,
    load_manifest,
    load_spec,
    parse_parameter_count,
)
from modelship.operator.crd import build_crd, crd_yaml
from modelship.operator.engine import EngineArgs
from modelship.operator.source import LocalSource, S3Source, SourceError, VolumeSource, parse_source

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "modeldeployments.modelship.dev.yaml"


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("8B", 8_000_000_000),
        ("70.6B", 70_600_000_000),
        ("350M", 350_000_000),
        ("1.5t", 1_500_000_000_000),
        (7_000, 7_000),
        ("123", 123),
    ],
)
def test_parameter_counts(text: str | int, count: int) -> None:
    assert parse_parameter_count(text) == count


@pytest.mark.parametrize("bad", ["eight billion", "8X", "-3B", "0", "", 0, True])
def test_malformed_parameter_counts_name_the_field(bad: str | int) -> None:
    with pytest.raises(SpecError) as error:
        parse_parameter_count(bad)
    assert error.value.field == "spec.model.parameters"
    assert "8B" in error.value.message


def test_sources_parse_once_into_typed_values() -> None:
    assert parse_source("s3://models/llama/8b") == S3Source(bucket="models", prefix="llama/8b/")
    assert parse_source("s3://models") == S3Source(bucket="models", prefix="")
    assert parse_source("fsx://weights-pvc/llama") == VolumeSource(
        scheme="fsx", claim="weights-pvc", path="llama"
    )
    assert parse_source("efs://shared/a/b/") == VolumeSource(
        scheme="efs", claim="shared", path="a/b"
    )
    assert parse_source("file:///tmp/m") == LocalSource(path="/tmp/m")


@pytest.mark.parametrize(
    ("uri", "hint"),
    [
        ("models/llama", "no scheme"),
        ("s3://A_B/x", "bucket"),
        ("s3://models/../etc", ".."),
        ("gs://bucket/x", "not supported"),
        ("fsx://Bad_Claim/x", "PersistentVolumeClaim"),
        ("file://relative", "absolute"),
    ],
)
def test_bad_sources_say_what_to_write(uri: str, hint: str) -> None:
    with pytest.raises(SourceError) as error:
        parse_source(uri)
    assert hint in str(error.value)
    assert "spec.model.uri" in str(error.value)


def test_defaults() -> None:
    spec = load_spec({"model": {"uri": "s3://models/m"}})
    assert spec.model.quantization == "auto"
    assert spec.model.trust_pickle is False
    assert spec.serving.concurrency == 1
    assert spec.serving.gpu_memory_utilization == 0.9
    assert (spec.replicas.min, spec.replicas.max) == (1, None)
    assert spec.accelerator.family == "auto"


@pytest.mark.parametrize(
    ("spec", "field", "hint"),
    [
        ({}, "spec.model", "required"),
        (
            {"model": {"uri": "s3://models/m", "quantization": "int3"}},
            "spec.model.quantization",
            "'int3' is not allowed",
        ),
        (
            {"model": {"uri": "s3://models/m"}, "serving": {"maxModelLen": -5}},
            "spec.serving.maxModelLen",
            "greater than or equal to 16",
        ),
        (
            {"model": {"uri": "s3://models/m"}, "serving": {"concurrency": 0}},
            "spec.serving.concurrency",
            "greater than or equal to 1",
        ),
        ({"model": {"uri": "s3://models/m", "parameters": "lots"}}, "spec.model.parameters", "8B"),
        (
            {"model": {"uri": "s3://models/m"}, "replicas": {"min": 3, "max": 2}},
            "spec.replicas.max",
            "replicas.min",
        ),
        (
            {
                "model": {"uri": "s3://models/m"},
                "serving": {"engineArgs": ["--max-model-len=4096"]},
            },
            "spec.serving.engineArgs",
            "spec.serving.maxModelLen",
        ),
        ({"model": {"uri": "s3://models/m"}, "acelerator": {}}, "spec.acelerator", "unknown field"),
        (
            {"model": {"uri": "s3://models/m"}, "accelerator": {"family": "tpu"}},
            "spec.accelerator.family",
            "nvidia",
        ),
    ],
)
def test_invalid_specs_name_the_field_and_the_fix(spec: dict, field: str, hint: str) -> None:
    with pytest.raises(SpecError) as error:
        load_spec(spec)
    assert error.value.field == field
    assert hint in error.value.message


def test_manifest_checks_kind_and_version() -> None:
    document = {
        "apiVersion": api.API_VERSION,
        "kind": "ModelDeployment",
        "metadata": {"name": "m"},
        "spec": {"model": {"uri": "s3://models/m"}},
    }
    assert load_manifest(document)[0] == "m"
    with pytest.raises(SpecError, match="apiVersion"):
        load_manifest({**document, "apiVersion": "modelship.dev/v1"})
    with pytest.raises(SpecError, match=r"metadata\.name"):
        load_manifest({**document, "metadata": {}})


def test_engine_args_render_one_flag_per_field() -> None:
    args = EngineArgs(
        tensor_parallel_size=2,
        max_model_len=4096,
        max_num_seqs=8,
        dtype="float16",
        kv_cache_dtype="fp8",
        generation_defaults={"temperature": 0.5},
        extra_args=("--enable-prefix-caching",),
    )
    argv = args.to_argv(model="/models/m", port=8000)
    assert argv[:4] == ["--model", "/models/m", "--port", "8000"]
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--override-generation-config") + 1] == '{"temperature":0.5}'
    assert argv[-1] == "--enable-prefix-caching"
    assert "--pipeline-parallel-size" not in argv


class TestCrd:
    def test_committed_crd_matches_the_models(self) -> None:
        assert CRD_FILE.read_text() == crd_yaml(), (
            "run `modelship crd > crds/modeldeployments.modelship.dev.yaml`"
        )

    def test_crd_is_a_valid_kubernetes_object(self) -> None:
        kubernetes_validate.validate(yaml.safe_load(CRD_FILE.read_text()), "1.33", strict=True)

    def test_schema_is_structural(self) -> None:
        schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        problems: list[str] = []

        def walk(node: dict, path: str) -> None:
            for banned in (
                "$ref",
                "anyOf",
                "oneOf",
                "allOf",
                "additionalProperties",
                "title",
                "$defs",
            ):
                if banned in node and not (
                    banned in ("anyOf",) and node.get("x-kubernetes-int-or-string")
                ):
                    problems.append(f"{path}: {banned}")
            if not (
                {"type", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields"}
                & set(node)
            ):
                problems.append(f"{path}: no type")
            if "properties" in node and node.get("type") != "object":
                problems.append(f"{path}: properties without type object")
            if "exclusiveMinimum" in node and not isinstance(node["exclusiveMinimum"], bool):
                problems.append(f"{path}: exclusiveMinimum must be boolean in OpenAPI v3.0")
            for name, child in node.get("properties", {}).items():
                walk(child, f"{path}.{name}")
            if "items" in node:
                walk(node["items"], f"{path}[]")

        walk(schema, "")
        assert problems == []

    def test_every_field_is_described_for_kubectl_explain(self) -> None:
        spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        missing: list[str] = []

        def walk(node: dict, path: str) -> None:
            for name, child in node.get("properties", {}).items():
                if not child.get("description"):
                    missing.append(f"{path}.{name}")
                walk(child, f"{path}.{name}")

        walk(spec, "spec")
        assert missing == []

    def test_subresources_columns_and_cel(self) -> None:
        version = build_crd()["spec"]["versions"][0]
        assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas.min"
        assert "status" in version["subresources"]
        names = [c["name"] for c in version["additionalPrinterColumns"]]
        assert names == [
            "Model",
            "Accelerator",
            "Instance",
            "Ready",
            "Desired",
            "Cost/h",
            "Phase",
            "Age",
        ]
        rules = version["schema"]["openAPIV3Schema"]["properties"]["spec"][
            "x-kubernetes-validations"
        ]
        assert any("replicas.max >= self.replicas.min" in r["rule"] for r in rules)
        spec_props = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        assert spec_props["model"]["properties"]["parameters"] == {
            "description": spec_props["model"]["properties"]["parameters"]["description"],
            "x-kubernetes-int-or-string": True,
        }
        assert "uri" in spec_props["model"]["required"]


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        (
            "s3://Bad_Bucket/x",
            "bucket names use lowercase letters, digits, dots and hyphens; 'Bad_Bucket' has 'B', '_'",
        ),
        ("s3://ab/x", "bucket names are 3 to 63 characters long; 'ab' has 2"),
        ("s3://-models/x", "bucket names start and end with a lowercase letter or digit"),
        ("s3:///x", "has no bucket name"),
        (
            "fsx://Models/x",
            "PersistentVolumeClaim names use lowercase letters, digits, dots and hyphens",
        ),
        ("S3://models/x", "a lowercase scheme"),
        (" s3://models/x", "no spaces around the URI"),
    ],
)
def test_uri_errors_say_what_is_wrong_in_words(uri: str, words: str) -> None:
    # The operator's Validated condition carries the same message (handlers use load_spec).
    with pytest.raises(SpecError) as caught:
        load_spec({"model": {"uri": uri}})
    assert caught.value.field == "spec.model.uri"
    assert words in caught.value.message
    assert "pattern" not in caught.value.message and "[a-z0-9]" not in caught.value.message


def test_the_crd_keeps_the_uri_pattern_for_the_api_server() -> None:
    from modelship.operator.source import URI_PATTERN

    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["model"]["properties"]["uri"]["pattern"] == URI_PATTERN


@pytest.mark.parametrize("name", ["chat", "llama-3-8b", "a" * 63, "m1"])
def test_names_that_can_name_a_service_pass(name: str) -> None:
    check_name(name)


@pytest.mark.parametrize("name", ["m" * 64, "1chat", "chat-", "chat.v2", "Chat"])
def test_names_that_cannot_name_a_service_are_refused_naming_the_field(name: str) -> None:
    with pytest.raises(SpecError) as error:
        check_name(name)
    assert error.value.field == "metadata.name"
    assert "at most 63" in str(error.value)


def test_the_crd_refuses_such_names_and_defaults_replicas_for_kubectl_scale() -> None:
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    (rule,) = schema["x-kubernetes-validations"]
    assert "self.metadata.name.size() <= 63" in rule["rule"]
    assert schema["properties"]["spec"]["properties"]["replicas"]["default"] == {}
