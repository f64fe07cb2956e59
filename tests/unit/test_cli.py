"""`modelship plan`, `render`, `crd` and `catalog`, run in-process as a user would type them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml
from modelship.operator.cli import main

from . import configs
from .schemas import validate_object

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def llama_dir(tmp_path: Path) -> Path:
    """A package with only a config.json: --params supplies the count."""
    directory = tmp_path / "llama-3-8b"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(configs.LLAMA_3_8B))
    return directory


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_table_shows_chosen_then_alternatives_then_rejected(
    capsys: pytest.CaptureFixture[str], llama_dir: Path
) -> None:
    code, out, _ = run(
        capsys,
        "plan",
        "--model",
        str(llama_dir),
        "--params",
        "8B",
        "--max-model-len",
        "8192",
        "--accelerator-family",
        "nvidia",
    )
    assert code == 0
    assert out.index("Chosen    g6.xlarge") < out.index("Alternatives") < out.index("Rejected")
    assert "vllm serve --tensor-parallel-size 1 --max-model-len 8192" in out
    assert "g4dn.xlarge" in out.split("Rejected")[1]


def test_plan_json_and_yaml_follow_the_contract(
    capsys: pytest.CaptureFixture[str], llama_dir: Path
) -> None:
    code, out, _ = run(
        capsys, "plan", "--model", f"file://{llama_dir}", "--params", "8B", "-o", "json"
    )
    assert code == 0
    data = json.loads(out)
    assert data["model"]["numKeyValueHeads"] == 8
    assert data["chosen"]["instanceType"] == "g6.xlarge"
    assert data["chosen"]["compileInstanceType"] is None
    assert data["chosen"]["engineArgs"][:2] == ["--tensor-parallel-size", "1"]
    assert "engine" not in data["chosen"]
    assert {"instanceType", "acceleratorCount", "reason"} == set(data["rejected"][0])
    code, out, _ = run(capsys, "plan", "--model", str(llama_dir), "--params", "8B", "-o", "yaml")
    assert yaml.safe_load(out)["chosen"]["instanceType"] == "g6.xlarge"


def test_plan_from_a_model_deployment_file(
    capsys: pytest.CaptureFixture[str], llama_dir: Path, tmp_path: Path
) -> None:
    manifest = tmp_path / "md.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "modelship.dev/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": {"name": "llama"},
                "spec": {
                    "model": {"uri": f"file://{llama_dir}", "parameters": "8B"},
                    "serving": {"maxModelLen": 4096, "concurrency": 10},
                    "accelerator": {"family": "inferentia"},
                },
            }
        )
    )
    code, out, _ = run(capsys, "plan", "-f", str(manifest), "-o", "json")
    assert code == 0
    chosen = json.loads(out)["chosen"]
    # inf2.8xlarge compiles and serves (ai-on-eks blueprint); inf2.xlarge could serve from
    # artifacts compiled elsewhere, which the operator does not do yet, so it ranks after.
    assert (chosen["instanceType"], chosen["tensorParallelSize"]) == ("inf2.8xlarge", 2)
    assert chosen["compileInstanceType"] is None


def test_nothing_fits_exits_2_and_says_what_would(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    directory = tmp_path / "70b"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(configs.LLAMA_3_70B))
    code, out, _ = run(
        capsys,
        "plan",
        "--model",
        str(directory),
        "--params",
        "70.6B",
        "--instance-types",
        "g5.xlarge",
    )
    assert code == 2
    assert "nothing fits" in out
    assert "spec.model.quantization" in out or "spec.accelerator" in out
    code, out, _ = run(
        capsys,
        "plan",
        "--model",
        str(directory),
        "--params",
        "70.6B",
        "--instance-types",
        "g5.xlarge",
        "-o",
        "json",
    )
    assert code == 2
    data = json.loads(out)
    assert data["chosen"] is None and data["suggestions"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            ["--quantization", "int3"],
            "spec.model.quantization (--quantization): 'int3' is not allowed",
        ),
        (["--max-model-len", "-5"], "spec.serving.maxModelLen (--max-model-len)"),
        (
            ["--tensor-parallel-size", "3"],
            "spec.accelerator.tensorParallelSize (--tensor-parallel-size): tensor-parallel 3 does not divide the 32 attention heads; use one of 1, 2, 4, 8",
        ),
        (["--params", "eight billion"], "spec.model.parameters (--params)"),
        (["--max-model-len", "100000"], "exceeds the model's max_position_embeddings (8192)"),
    ],
)
def test_bad_input_exits_1_naming_the_flag(
    capsys: pytest.CaptureFixture[str], llama_dir: Path, flags: list[str], expected: str
) -> None:
    argv = ["plan", "--model", str(llama_dir), "--params", "8B", *flags]
    code, out, err = run(capsys, *argv)
    assert code == 1
    assert out == ""
    assert expected in err


def test_unreadable_config_json_names_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_text("{not json")
    code, _, err = run(capsys, "plan", "--model", str(tmp_path), "--params", "8B")
    assert code == 1
    assert "config.json" in err


def test_params_alone_is_not_enough(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "plan", "--params", "70B", "--quantization", "int4")
    assert code == 1
    assert "--model is required" in err


def test_catalog_override_adds_an_instance_type(
    capsys: pytest.CaptureFixture[str], llama_dir: Path, tmp_path: Path
) -> None:
    override = tmp_path / "catalog.yaml"
    override.write_text(
        yaml.safe_dump(
            {
                "priceSources": {"negotiated": "our private pricing agreement"},
                "instanceTypes": [
                    {
                        "name": "g6.xlarge",
                        "accelerator": "nvidia-l4",
                        "count": 1,
                        "vcpus": 4,
                        "memoryGiB": 16,
                        "networkGbps": "10",
                        "efa": False,
                        "usdPerHour": 0.30,
                        "priceSource": "negotiated",
                    },
                ],
            }
        )
    )
    code, out, _ = run(
        capsys,
        "plan",
        "--model",
        str(llama_dir),
        "--params",
        "8B",
        "--catalog",
        str(override),
        "-o",
        "json",
    )
    assert code == 0
    assert json.loads(out)["chosen"]["costPerHourUsd"] == 0.30
    override.write_text("instanceTypes: [{name: x1, accelerator: nvidia-zz}]")
    code, _, err = run(
        capsys, "plan", "--model", str(llama_dir), "--params", "8B", "--catalog", str(override)
    )
    assert code == 1
    assert "catalog" in err


def test_render_prints_valid_objects_in_apply_order(
    capsys: pytest.CaptureFixture[str], llama_dir: Path
) -> None:
    code, out, _ = run(
        capsys,
        "render",
        "--model",
        str(llama_dir),
        "--params",
        "8B",
        "--cluster-name",
        "demo",
        "--node-role",
        "KarpenterNodeRole-demo",
    )
    assert code == 0
    documents = list(yaml.safe_load_all(out))
    kinds = [d["kind"] for d in documents]
    assert kinds[:2] == ["EC2NodeClass", "NodePool"]
    assert "Deployment" in kinds and "Service" in kinds
    for document in documents:
        assert "ownerReferences" not in document["metadata"]
        validate_object(document)


def test_render_in_node_group_mode_shows_the_request(
    capsys: pytest.CaptureFixture[str], llama_dir: Path
) -> None:
    code, out, _ = run(
        capsys,
        "render",
        "--model",
        str(llama_dir),
        "--params",
        "8B",
        "--node-pool-mode",
        "eks-nodegroup",
        "--accelerator-family",
        "nvidia",
    )
    assert code == 0
    assert "#   ami_type: AL2023_x86_64_NVIDIA" in out
    assert "NodePool" not in [d["kind"] for d in yaml.safe_load_all(out) if d]


def test_crd_command_prints_the_committed_crd(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "crd")
    assert code == 0
    assert out == (REPO / "crds" / "modeldeployments.modelship.dev.yaml").read_text()


def test_catalog_command_lists_every_instance_type(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "catalog")
    assert code == 0
    for name in [
        "g4dn.xlarge",
        "p5en.48xlarge",
        "inf2.48xlarge",
        "trn1n.32xlarge",
        "trn2.48xlarge",
    ]:
        assert name in out


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _parsers(sub)
    return found


def test_every_option_of_every_command_has_help() -> None:
    from modelship.operator.cli import build_parser
    from modelship.runtime.demo import build_parser as demo_parser
    from modelship.runtime.main import build_parser as runtime_parser

    parsers = [*_parsers(build_parser()), demo_parser(), runtime_parser({})]
    missing = [
        f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
        for parser in parsers
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction)
        and (not action.help or action.help == argparse.SUPPRESS or action.help.startswith(" ["))
    ]
    assert missing == []


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--params", "-5B"], "spec.model.parameters (--params): '-5B' is not a parameter count"),
        (["--params=-5B"], "spec.model.parameters (--params): '-5B' is not a parameter count"),
        (["--max-model-len", "-5"], "spec.serving.maxModelLen (--max-model-len): "),
        (["--max-model-len", "-5k"], "spec.serving.maxModelLen (--max-model-len): "),
        (["--max-model-len", "abc"], "spec.serving.maxModelLen (--max-model-len): "),
        (["--concurrency", "-1"], "spec.serving.concurrency (--concurrency): "),
        (["--max-cost-per-hour", "-0.5"], "spec.accelerator.maxCostPerHour (--max-cost-per-hour)"),
    ],
)
def test_negative_and_malformed_numbers_get_the_same_clean_error(
    capsys: pytest.CaptureFixture[str], llama_dir: Path, flags: list[str], expected: str
) -> None:
    code, out, err = run(capsys, "plan", "--model", str(llama_dir), *flags)
    assert (code, out) == (1, "")
    assert err.startswith("modelship: error: ") and expected in err, err
    assert "usage:" not in err and len(err.splitlines()) == 1


def test_usage_errors_exit_1_not_the_nothing_fits_status(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["plan", "--model", "s3://bucket/x", "--no-such-flag"])
    assert caught.value.code == 1
    assert "--no-such-flag" in capsys.readouterr().err


def test_uri_errors_say_what_is_wrong_in_words(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "plan", "--model", "s3://Bad_Bucket/x")
    assert code == 1
    assert "bucket names use lowercase letters, digits, dots and hyphens" in err
    assert "^(" not in err and "pattern" not in err


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No AWS credentials or instance metadata; KUBECONFIG points at a file a test may write."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    import boto3

    # boto3's default session keeps credentials resolved by earlier tests in this process.
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    kubeconfig = tmp_path / "kubeconfig"
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    return kubeconfig


def test_known_model_flag_plans_an_unreadable_s3_model(
    capsys: pytest.CaptureFixture[str], offline: Path
) -> None:
    argv = ["plan", "--model", "s3://my-models/finetune", "--known-model", "Qwen/Qwen3-8B"]
    code, out, err = run(capsys, *argv, "-o", "json")
    assert code == 0, err
    assert json.loads(out)["model"]["numLayers"] == 36
    assert err.count("\n") == 1
    assert "cannot read s3://my-models/finetune (NoCredentialsError" in err
    assert "published config.json of Qwen/Qwen3-8B (named by --known-model" in err


def test_an_unreadable_model_nothing_describes_says_how_to_name_it(
    capsys: pytest.CaptureFixture[str], offline: Path
) -> None:
    code, out, err = run(capsys, "plan", "--model", "s3://my-models/finetune")
    assert (code, out) == (1, "")
    assert "NoCredentialsError" in err and "--known-model ID (`modelship models`" in err


def test_spec_architecture_alone_plans_an_unreadable_model(
    capsys: pytest.CaptureFixture[str], offline: Path, tmp_path: Path
) -> None:
    manifest = tmp_path / "md.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "modelship.dev/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": {"name": "custom"},
                "spec": {
                    "model": {
                        "uri": "s3://my-models/custom",
                        "parameters": "8B",
                        "architecture": {
                            "numLayers": 32,
                            "hiddenSize": 4096,
                            "numAttentionHeads": 32,
                            "numKeyValueHeads": 8,
                            "vocabSize": 128256,
                            "maxPositionEmbeddings": 8192,
                        },
                    }
                },
            }
        )
    )
    code, out, err = run(capsys, "plan", "-f", str(manifest), "-o", "json")
    assert code == 0, err
    assert "planning from spec.model.architecture and spec.model.parameters" in err
    assert json.loads(out)["model"]["parametersSource"] == "spec"


def test_unknown_known_model_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys, "plan", "--model", "s3://b-b/x", "--known-model", "meta-llama/Llama-3.1-8B-Instruc"
    )
    assert code == 1
    assert "spec.model.architecture.knownModel (--known-model)" in err
    assert "did you mean meta-llama/Llama-3.1-8B-Instruct" in err


def test_models_lists_every_known_model_with_its_source(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "models")
    assert code == 0
    assert "meta-llama/Llama-3.1-8B-Instruct" in out and "openai/gpt-oss-120b" in out
    code, out, _ = run(capsys, "models", "-o", "yaml")
    entries = {entry["id"]: entry for entry in yaml.safe_load(out)}
    assert entries["Qwen/Qwen3-30B-A3B"]["configUrl"] == (
        "https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json"
    )


def test_render_without_flags_marks_placeholders_and_names_flags(
    capsys: pytest.CaptureFixture[str], llama_dir: Path, offline: Path
) -> None:
    code, out, err = run(capsys, "render", "--model", str(llama_dir), "--params", "8B")
    assert code == 0, err
    node_class = next(d for d in yaml.safe_load_all(out) if d["kind"] == "EC2NodeClass")
    assert node_class["spec"]["role"] == "REPLACE-ME-node-role"
    tags = node_class["spec"]["subnetSelectorTerms"][0]["tags"]
    assert tags == {"karpenter.sh/discovery": "REPLACE-ME-cluster-name"}
    assert "--cluster-name" in err and "--node-role" in err and "MODELSHIP_" not in err


@pytest.mark.parametrize(
    ("cluster", "expected"),
    [
        ("arn:aws:eks:us-west-2:123456789012:cluster/prod-gpu", "prod-gpu"),
        ("prod-gpu.us-west-2.eksctl.io", "prod-gpu"),
        ("kind-kind", None),
    ],
)
def test_render_reads_the_eks_cluster_name_from_the_current_kubeconfig_context(
    capsys: pytest.CaptureFixture[str],
    llama_dir: Path,
    offline: Path,
    cluster: str,
    expected: str | None,
) -> None:
    offline.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "work",
                "contexts": [
                    {"name": "other", "context": {"cluster": "arn:aws:eks:x:1:cluster/no"}},
                    {"name": "work", "context": {"cluster": cluster, "user": "me"}},
                ],
            }
        )
    )
    code, out, err = run(
        capsys, "render", "--model", str(llama_dir), "--params", "8B", "--node-role", "Nodes"
    )
    assert code == 0, err
    node_class = next(d for d in yaml.safe_load_all(out) if d["kind"] == "EC2NodeClass")
    tag = node_class["spec"]["subnetSelectorTerms"][0]["tags"]["karpenter.sh/discovery"]
    assert tag == (expected or "REPLACE-ME-cluster-name")
    assert node_class["spec"]["role"] == "Nodes"
    if expected:
        assert f"--cluster-name {expected} (from the current kubeconfig context 'work')" in err


def test_render_errors_name_flags_not_environment_variables(
    capsys: pytest.CaptureFixture[str], llama_dir: Path
) -> None:
    from modelship.operator.cli import _flags_for_env

    assert _flags_for_env("MODELSHIP_CLUSTER_NAME and MODELSHIP_NODE_ROLE must be set") == (
        "--cluster-name and --node-role must be set"
    )
    with pytest.raises(SystemExit) as caught:
        main(["render", "--model", str(llama_dir), "--params", "8B", "--autoscaler", "kedaa"])
    assert caught.value.code == 1
    err = capsys.readouterr().err
    assert "--autoscaler" in err and "MODELSHIP_" not in err


def test_quantization_names_users_write_are_accepted(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Qwen/Qwen2.5-72B-Instruct-AWQ's config.json: `--quantization awq` names its format; gptq
    # does not match it and the error says what the checkpoint is.
    directory = tmp_path / "qwen-awq"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(configs.QWEN2_5_72B_AWQ))
    code, out, _ = run(
        capsys, "plan", "--model", str(directory), "--params", "72.7B", "--quantization", "awq"
    )
    assert code == 0, out
    assert "weights int4-awq" in out
    code, _, err = run(
        capsys, "plan", "--model", str(directory), "--params", "72.7B", "--quantization", "gptq"
    )
    assert code == 1
    assert "--quantization" in err and "int4-awq (awq)" in err


def test_plan_shows_the_efa_request_and_the_neuron_compile_step(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, llama_dir: Path
) -> None:
    directory = tmp_path / "70b"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(configs.LLAMA_3_70B))
    code, out, _ = run(
        capsys, "plan", "--model", str(directory), "--params", "70.6B", "--max-model-len", "8192"
    )
    assert code == 0
    assert "Chosen    g6.12xlarge: 2 x 4 x NVIDIA L4, TP 4, PP 2" in out
    assert "vpc.amazonaws.com/efa: 1" in out
    assert "launch template modelship-g6-12xlarge-od-efa in cluster placement group" in out
    # eks-nodegroup mode: the node group request carries the EFA interfaces and label.
    code, out, _ = run(
        capsys,
        "render",
        "--model",
        str(directory),
        "--params",
        "70.6B",
        "--max-model-len",
        "8192",
        "--node-pool-mode",
        "eks-nodegroup",
    )
    assert code == 0
    assert "#   name: modelship-g6-12xlarge-od-efa" in out
    assert "#   efa_interfaces: 1" in out and "#     modelship.dev/efa: 'true'" in out
    code, out, _ = run(
        capsys,
        "plan",
        "--model",
        str(llama_dir),
        "--params",
        "8B",
        "--instance-types",
        "inf2.xlarge",
    )
    # Without a shared compile cache the operator cannot run step 1: nothing is chosen, and the
    # plan names the setting.
    assert code == 2
    assert "runtime.neuronCacheUri" in out
    assert "compiles once on inf2.8xlarge and serves on inf2.xlarge" in out
    code, out, _ = run(
        capsys,
        "plan",
        "--model",
        str(llama_dir),
        "--params",
        "8B",
        "--instance-types",
        "inf2.xlarge",
        "--neuron-cache-uri",
        "s3://compile-cache/neuron",
    )
    assert code == 0
    assert "step 1: compile once on inf2.8xlarge" in out
    assert "step 2: serve on inf2.xlarge" in out
    code, out, _ = run(
        capsys,
        "render",
        "--model",
        str(llama_dir),
        "--params",
        "8B",
        "--instance-types",
        "inf2.xlarge",
        "--neuron-cache-uri",
        "s3://compile-cache/neuron",
    )
    assert code == 0
    documents = [d for d in yaml.safe_load_all(out) if d]
    kinds = [(d["kind"], d["metadata"]["name"]) for d in documents]
    # The compile step's pool and Job come first, then the serving objects.
    assert kinds[1][0] == "NodePool" and kinds[1][1].startswith("modelship-compile-inf2-8xlarge-")
    assert kinds[2][0] == "Job" and "--compile-only" in str(documents[2])
    assert ("NodePool", "modelship-inf2-xlarge-od") in kinds


@pytest.mark.parametrize(
    ("name", "params", "layers"),
    [
        ("FALCON_H1_0_5B_INSTRUCT", "0.5B", "36 attention_mamba layers"),
        ("NEMOTRON_H_8B_BASE_8K", "8.1B", "4 attention + 24 mamba + 24 mlp layers"),
    ],
)
def test_plan_lays_out_falcon_h1_and_nemotron_h_layers(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str, params: str, layers: str
) -> None:
    # The table says what each layer caches; the JSON's KV tokens are the hybrid count (two state
    # slots per Mamba layer and sequence), with no "not counted" warning left.
    (tmp_path / "config.json").write_text(json.dumps(configs.ALL_CONFIGS[name]))
    argv = ["plan", "--model", str(tmp_path), "--params", params, "--instance-types", "g6e.xlarge"]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    assert layers in out and "Mamba state is not counted" not in out
    code, out, _ = run(capsys, *argv, "-o", "json")
    chosen = json.loads(out)["chosen"]
    per_sequence = chosen["memory"]["kvCacheBytes"] // chosen["maxConcurrentSequences"]
    assert per_sequence > chosen["kvCacheBytesPerToken"] * json.loads(out)["needs"]["maxModelLen"]
