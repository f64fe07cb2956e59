"""verify_model_dir on real files: the tiny model, then broken copies of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from modelship.runtime.tinymodel import build_tiny_model
from modelship.runtime.verify import VerifyError, check_safetensors_file, verify_model_dir


@pytest.fixture(scope="module")
def tiny_model_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def model_dir(tiny_model_source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_source, tmp_path / "model"))


def test_tiny_model_passes(model_dir: Path) -> None:
    report = verify_model_dir(model_dir)
    assert report.architecture == "LlamaForCausalLM"
    assert report.weight_files == ["model.safetensors"]
    assert report.tokenizer_files[:2] == ["tokenizer.json", "tokenizer_config.json"]
    # 8 + header + data == file size, so data bytes are a bit below the file size.
    size = (model_dir / "model.safetensors").stat().st_size
    assert 0 < report.weight_bytes < size


def test_tiny_model_is_deterministic(tiny_model_source: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model_source / name).read_bytes()
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (
        tiny_model_source / "model.safetensors"
    ).read_bytes()


@pytest.fixture
def sharded_dir(tmp_path: Path) -> Path:
    return build_tiny_model(tmp_path / "sharded", num_shards=2)


def test_sharded_model_passes(sharded_dir: Path) -> None:
    report = verify_model_dir(sharded_dir)
    assert report.weight_files == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]


def test_missing_shard_is_named(sharded_dir: Path) -> None:
    (sharded_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(VerifyError, match=r"model-00002-of-00002\.safetensors.*Upload every shard"):
        verify_model_dir(sharded_dir)


def test_truncated_shard_is_named(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(VerifyError, match=r"model\.safetensors: .* truncated"):
        verify_model_dir(model_dir)


def test_file_longer_than_header_is_rejected(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes() + b"\0" * 16)
    with pytest.raises(VerifyError, match="longer than its header says"):
        check_safetensors_file(path)


def test_truncated_inside_header(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(VerifyError, match="header length"):
        verify_model_dir(model_dir)


def test_missing_tokenizer(model_dir: Path) -> None:
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(VerifyError, match="no tokenizer"):
        verify_model_dir(model_dir)


def test_sentencepiece_tokenizer_accepted(model_dir: Path) -> None:
    (model_dir / "tokenizer.json").rename(model_dir / "tokenizer.model")
    assert verify_model_dir(model_dir).tokenizer_files[:2] == [
        "tokenizer.model",
        "tokenizer_config.json",
    ]


def test_config_without_architectures(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    del config["architectures"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(VerifyError, match=r"config\.json: has no 'architectures'"):
        verify_model_dir(model_dir)


def test_config_missing_or_broken(model_dir: Path) -> None:
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(VerifyError, match="not valid JSON"):
        verify_model_dir(model_dir)
    (model_dir / "config.json").unlink()
    with pytest.raises(VerifyError, match=r"config\.json: missing"):
        verify_model_dir(model_dir)


def test_pickle_only_needs_trust(model_dir: Path) -> None:
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    with pytest.raises(VerifyError, match=r"only pickle weights.*trust"):
        verify_model_dir(model_dir)
    report = verify_model_dir(model_dir, trust_pickle=True)
    assert report.pickle_files == ["pytorch_model.bin"]


def test_no_weights(model_dir: Path) -> None:
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(VerifyError, match="no weights"):
        verify_model_dir(model_dir)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(VerifyError, match="not a directory"):
        verify_model_dir(tmp_path / "absent")
