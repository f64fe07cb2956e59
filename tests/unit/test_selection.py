"""Which files of a model source the engine gets, and which keys are refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from modelship.runtime.selection import (
    SelectionError,
    UnsafeKeyError,
    check_relative_key,
    safe_destination,
    select_files,
)

LLAMA_REPO = [
    ("config.json", 700),
    ("generation_config.json", 180),
    ("model-00001-of-00002.safetensors", 5_000_000_000),
    ("model-00002-of-00002.safetensors", 1_500_000_000),
    ("model.safetensors.index.json", 24_000),
    ("tokenizer.json", 9_000_000),
    ("tokenizer_config.json", 50_000),
    ("special_tokens_map.json", 300),
    ("chat_template.jinja", 4_000),
    ("README.md", 40_000),
    ("LICENSE", 7_000),
    (".gitattributes", 1_500),
    ("USE_POLICY.md", 4_000),
    ("original/consolidated.00.pth", 16_000_000_000),
    ("original/params.json", 200),
    ("original/tokenizer.model", 2_000_000),
    ("images/diagram.png", 90_000),
]


def kinds(selection_files: tuple) -> dict[str, str]:
    return {selected.key: selected.kind for selected in selection_files}


def test_hugging_face_repo_takes_weights_config_and_tokenizer() -> None:
    selection = select_files(LLAMA_REPO)
    assert kinds(selection.files) == {
        "chat_template.jinja": "tokenizer",
        "config.json": "config",
        "generation_config.json": "config",
        "model-00001-of-00002.safetensors": "weights",
        "model-00002-of-00002.safetensors": "weights",
        "model.safetensors.index.json": "weights_index",
        "special_tokens_map.json": "tokenizer",
        "tokenizer.json": "tokenizer",
        "tokenizer_config.json": "tokenizer",
    }
    reasons = {skipped.key: skipped.reason for skipped in selection.skipped}
    assert reasons == {
        ".gitattributes": "hidden",
        "LICENSE": "unrelated",
        "README.md": "unrelated",
        "USE_POLICY.md": "unrelated",
        "images/diagram.png": "subdirectory",
        "original/consolidated.00.pth": "duplicate_weights",
        "original/params.json": "duplicate_weights",
        "original/tokenizer.model": "duplicate_weights",
    }
    assert all(skipped.detail for skipped in selection.skipped)
    assert selection.total_bytes == sum(
        size for key, size in LLAMA_REPO if key in kinds(selection.files)
    )


def test_training_checkpoint_leftovers_are_skipped_as_training_state() -> None:
    listing = [
        ("config.json", 1),
        ("model.safetensors", 100),
        ("tokenizer.json", 1),
        ("optimizer.pt", 200),
        ("scheduler.pt", 1),
        ("rng_state_0.pth", 1),
        ("rng_state.pth", 1),
        ("trainer_state.json", 1),
        ("training_args.bin", 1),
        ("global_step500/mp_rank_00_model_states.pt", 300),
        ("checkpoint-1000/model.safetensors", 100),
    ]
    selection = select_files(listing)
    assert [selected.key for selected in selection.files] == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert {skipped.key for skipped in selection.skipped if skipped.reason == "training_state"} == {
        "optimizer.pt",
        "scheduler.pt",
        "rng_state_0.pth",
        "rng_state.pth",
        "trainer_state.json",
        "training_args.bin",
        "global_step500/mp_rank_00_model_states.pt",
        "checkpoint-1000/model.safetensors",
    }


def test_pickle_weights_are_refused_without_trust() -> None:
    listing = [("config.json", 1), ("pytorch_model.bin", 100), ("tokenizer.json", 1)]
    with pytest.raises(
        SelectionError, match=r"only pickle weights \(pytorch_model.bin\).*trustPickle"
    ):
        select_files(listing)


def test_trusted_pickle_takes_pytorch_model_shards_and_index_only() -> None:
    listing = [
        ("config.json", 1),
        ("pytorch_model-00001-of-00002.bin", 100),
        ("pytorch_model-00002-of-00002.bin", 100),
        ("pytorch_model.bin.index.json", 5),
        ("tokenizer.json", 1),
        ("optimizer.pt", 50),
        ("extra_weights.ckpt", 70),
    ]
    selection = select_files(listing, trust_pickle=True)
    assert kinds(selection.files) == {
        "config.json": "config",
        "pytorch_model-00001-of-00002.bin": "weights",
        "pytorch_model-00002-of-00002.bin": "weights",
        "pytorch_model.bin.index.json": "weights_index",
        "tokenizer.json": "tokenizer",
    }
    reasons = {skipped.key: skipped.reason for skipped in selection.skipped}
    assert reasons == {"optimizer.pt": "training_state", "extra_weights.ckpt": "pickle"}


def test_trusted_pickle_is_ignored_when_safetensors_exist() -> None:
    listing = [
        ("config.json", 1),
        ("model.safetensors", 100),
        ("pytorch_model.bin", 100),
        ("pytorch_model.bin.index.json", 5),
    ]
    selection = select_files(listing, trust_pickle=True)
    assert [selected.key for selected in selection.files] == ["config.json", "model.safetensors"]
    assert {skipped.key: skipped.reason for skipped in selection.skipped} == {
        "pytorch_model.bin": "pickle",
        "pytorch_model.bin.index.json": "pickle",
    }


def test_mistral_consolidated_duplicate_is_skipped_next_to_shards() -> None:
    listing = [
        ("config.json", 1),
        ("consolidated.safetensors", 100),
        ("model-00001-of-00001.safetensors", 100),
        ("params.json", 1),
        ("tekken.json", 1),
        ("tokenizer_config.json", 1),
    ]
    selection = select_files(listing)
    assert kinds(selection.files) == {
        "config.json": "config",
        "model-00001-of-00001.safetensors": "weights",
        "tekken.json": "tokenizer",
        "tokenizer_config.json": "tokenizer",
    }
    assert {s.key: s.reason for s in selection.skipped}["consolidated.safetensors"] == (
        "duplicate_weights"
    )


def test_processor_quantization_and_code_files_are_taken() -> None:
    listing = [
        ("config.json", 1),
        ("model.safetensors", 100),
        ("preprocessor_config.json", 1),
        ("quantize_config.json", 1),
        ("modeling_custom.py", 1),
        ("vocab.json", 1),
        ("merges.txt", 1),
        ("model.gguf", 100),
        ("adapter_model.safetensors", 10),
        ("adapter_config.json", 1),
    ]
    selection = select_files(listing)
    assert kinds(selection.files) == {
        "config.json": "config",
        "merges.txt": "tokenizer",
        "model.safetensors": "weights",
        "modeling_custom.py": "code",
        "preprocessor_config.json": "processor",
        "quantize_config.json": "config",
        "vocab.json": "tokenizer",
    }
    assert {s.key: s.reason for s in selection.skipped} == {
        "model.gguf": "other_format",
        "adapter_model.safetensors": "adapter",
        "adapter_config.json": "adapter",
    }


def test_directory_markers_are_skipped() -> None:
    selection = select_files([("config.json", 1), ("model.safetensors", 2), ("sub/", 0)])
    assert [(s.key, s.reason) for s in selection.skipped] == [("sub/", "directory_marker")]


def test_nothing_loadable_names_what_was_found() -> None:
    with pytest.raises(SelectionError, match=r"no loadable weights.*README.md"):
        select_files([("README.md", 1), ("config.json", 1)])
    with pytest.raises(SelectionError, match=r"no loadable weights.*nothing"):
        select_files([])


def test_missing_config_is_an_error() -> None:
    with pytest.raises(SelectionError, match=r"no config.json"):
        select_files([("model.safetensors", 2), ("tokenizer.json", 1)])


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("../evil.safetensors", "'..'"),
        ("a/../../evil", "'..'"),
        ("/etc/passwd", "absolute"),
        ("a\\..\\evil", "backslash"),
        ("", "empty"),
        ("a//b", "empty or '.'"),
        ("./config.json", "empty or '.'"),
        ("nul\x00byte", "NUL"),
    ],
)
def test_unsafe_keys_are_refused(key: str, problem: str) -> None:
    with pytest.raises(UnsafeKeyError, match=problem):
        check_relative_key(key)
    with pytest.raises(UnsafeKeyError):
        select_files([("config.json", 1), ("model.safetensors", 2), (key, 3)])


def test_safe_destination_stays_inside_dest(tmp_path: Path) -> None:
    assert safe_destination(tmp_path, "sub/config.json") == tmp_path.resolve() / "sub/config.json"
    with pytest.raises(UnsafeKeyError):
        safe_destination(tmp_path, "../outside.json")


def test_safe_destination_refuses_symlinks_in_dest(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(outside, dest / "linked")
    os.symlink(outside / "target.json", dest / "config.json")
    with pytest.raises(UnsafeKeyError, match="symlink"):
        safe_destination(dest, "linked/model.safetensors")
    with pytest.raises(UnsafeKeyError, match="symlink"):
        safe_destination(dest, "config.json")


def test_sentence_transformers_files_are_fetched() -> None:
    # An e5 / MiniLM / gte layout: without modules.json and 1_Pooling/config.json vLLM falls
    # back to the architecture's default pooling (CLS for BERT) instead of mean pooling.
    listing = [
        ("config.json", 600),
        ("model.safetensors", 90_000_000),
        ("tokenizer.json", 700_000),
        ("vocab.txt", 230_000),
        ("modules.json", 350),
        ("config_sentence_transformers.json", 120),
        ("sentence_bert_config.json", 50),
        ("1_Pooling/config.json", 300),
        ("2_Dense/config.json", 100),
        ("2_Dense/model.safetensors", 1_000_000),
        ("2_Normalize/.gitkeep", 0),
        ("onnx/model.onnx", 90_000_000),
        ("README.md", 9_000),
    ]
    selection = select_files(listing)
    kinds = {selected.key: selected.kind for selected in selection.files}
    for key in (
        "modules.json",
        "config_sentence_transformers.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
        "2_Dense/config.json",
        "2_Dense/model.safetensors",
    ):
        assert kinds[key] == "sentence_transformers", key
    assert kinds["model.safetensors"] == "weights"
    skipped = {skipped.key for skipped in selection.skipped}
    assert {"onnx/model.onnx", "README.md", "2_Normalize/.gitkeep"} <= skipped
