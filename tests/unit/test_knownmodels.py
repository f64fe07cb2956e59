"""knownmodels: the published config.json facts load, validate, are found by id and URI, and each
parameter count agrees with the architecture it is recorded with (a mistyped size fails here)."""

from __future__ import annotations

from typing import Any

import pytest
from modelship.operator.api import Architecture
from modelship.operator.knownmodels import (
    KnownModel,
    KnownModelError,
    get_known_model,
    known_models,
    match_known_model,
)
from modelship.operator.modelinfo import (
    ModelInfoError,
    ModelUnreadableError,
    inspect_model,
    model_info_from_known_model,
)
from modelship.operator.source import parse_source

from . import configs

MODELS = {model.id: model for model in known_models().models}
# The list of popular open models: each must be in the data file.
REQUIRED = [
    "meta-llama/Llama-3.1-8B-Instruct",
    "meta-llama/Llama-3.1-70B-Instruct",
    "meta-llama/Llama-3.1-405B-Instruct",
    "Qwen/Qwen2.5-7B-Instruct",
    "Qwen/Qwen2.5-72B-Instruct",
    "Qwen/Qwen3-8B",
    "Qwen/Qwen3-30B-A3B",
    "Qwen/Qwen3-235B-A22B",
    "mistralai/Mistral-7B-Instruct-v0.3",
    "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "google/gemma-2-9b-it",
    "google/gemma-2-27b-it",
    "google/gemma-3-27b-it",
    "microsoft/Phi-3-mini-4k-instruct",
    "microsoft/phi-4",
    "deepseek-ai/DeepSeek-V3",
    "deepseek-ai/DeepSeek-R1",
    "openai/gpt-oss-20b",
    "openai/gpt-oss-120b",
]
# Recorded, but not yet sized by operator/sizing.py + modelinfo.py: MXFP4 weights.
# Known models modelship cannot size yet, and what it lacks (none since mxfp4 is read: gpt-oss).
NOT_YET_SIZED: dict[str, str] = {}


def estimated_parameters(config: dict[str, Any]) -> int:
    """Weights of embeddings, attention and MLP/experts from the config alone (norms, biases and
    vision towers left out: under 2% of any model here)."""
    c = {**config, **(config.get("text_config") or {})}
    hidden, layers, heads = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or hidden // heads
    if c.get("kv_lora_rank"):  # MLA (DeepSeek): low-rank query and key/value projections
        q_head = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
        attention = (
            hidden * c["q_lora_rank"]
            + c["q_lora_rank"] * heads * q_head
            + hidden * (c["kv_lora_rank"] + c["qk_rope_head_dim"])
            + c["kv_lora_rank"] * heads * (c["qk_nope_head_dim"] + c["v_head_dim"])
            + heads * c["v_head_dim"] * hidden
        )
    else:
        attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    dense_mlp = 3 * hidden * c["intermediate_size"]
    experts = c.get("num_local_experts") or c.get("n_routed_experts") or c.get("num_experts")
    if experts:
        expert_size = c.get("moe_intermediate_size") or c["intermediate_size"]
        moe = (experts + (c.get("n_shared_experts") or 0)) * 3 * hidden * expert_size
        moe += hidden * experts  # the router
        dense_layers = c.get("first_k_dense_replace") or 0
        mlp = dense_layers * dense_mlp + (layers - dense_layers) * moe
    else:
        mlp = layers * dense_mlp
    tied = c.get(
        "tie_word_embeddings", c.get("model_type") in ("gemma", "gemma2", "gemma3", "gemma3_text")
    )
    embeddings = c["vocab_size"] * hidden * (1 if tied else 2)
    return layers * attention + mlp + embeddings


def test_the_data_file_has_the_popular_models_with_their_sources() -> None:
    assert set(REQUIRED) <= set(MODELS)
    for model in MODELS.values():
        assert model.config_url == f"https://huggingface.co/{model.id}/blob/main/config.json"
        assert model.parameters_source


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_parameter_count_agrees_with_the_architecture(model_id: str) -> None:
    model = MODELS[model_id]
    estimate = estimated_parameters(model.config)
    assert abs(estimate - model.parameters) / model.parameters < 0.02, (
        f"{model_id}: recorded {model.parameters:,}, the architecture gives {estimate:,}"
    )


def test_the_estimate_is_exact_for_llama_and_tight_for_the_test_configs() -> None:
    # The same estimate against the counts tests/unit/configs.py records independently.
    assert estimated_parameters(configs.LLAMA_3_1_8B) == 8_030_261_248 - 4096 * 65  # norms
    for name, count in configs.PUBLISHED_PARAMETERS.items():
        estimate = estimated_parameters(configs.ALL_CONFIGS[name])
        assert abs(estimate - count) / count < 0.02, name


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_every_known_model_becomes_model_info_or_names_what_is_missing(model_id: str) -> None:
    model = MODELS[model_id]
    if model_id in NOT_YET_SIZED:
        with pytest.raises(
            ModelInfoError, match=f"known model {model_id}: .*{NOT_YET_SIZED[model_id]}"
        ):
            model_info_from_known_model(model, overrides=None, parameters=None, why="offline")
        return
    info = model_info_from_known_model(model, overrides=None, parameters=None, why="offline")
    config = {**model.config, **(model.config.get("text_config") or {})}
    assert info.parameters == model.parameters and info.parameters_source == "spec"
    assert info.num_layers == config["num_hidden_layers"]
    assert info.hidden_size == config["hidden_size"]
    assert info.architecture == model.config["architectures"][0]
    assert any(model.config_url in warning for warning in info.warnings)


def test_spec_values_override_the_known_facts() -> None:
    model = get_known_model("meta-llama/Llama-3.1-8B-Instruct")
    info = model_info_from_known_model(
        model,
        overrides=Architecture(max_position_embeddings=8192),
        parameters=8_100_000_000,
        why="offline",
    )
    assert (info.max_position_embeddings, info.parameters) == (8192, 8_100_000_000)


def test_lookup_by_alias_ignores_case_and_suggests_close_ids() -> None:
    assert get_known_model("META-LLAMA/Meta-Llama-3.1-8B-Instruct").id == (
        "meta-llama/Llama-3.1-8B-Instruct"
    )
    with pytest.raises(KnownModelError, match="did you mean Qwen/Qwen3-8B"):
        get_known_model("Qwen/Qwen3-8")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://my-models/meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"),
        ("s3://my-models/meta-llama/Llama-3.1-8B-Instruct/", "meta-llama/Llama-3.1-8B-Instruct"),
        ("fsx://models/weights/Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B"),
        ("efs://models/Meta-Llama-3.1-70B", "meta-llama/Llama-3.1-70B-Instruct"),
        ("s3://my-models/my-finetune", None),
        ("s3://my-models", None),
    ],
)
def test_a_uri_matches_only_an_unambiguous_known_model(uri: str, expected: str | None) -> None:
    match = match_known_model(uri)
    assert (match.id if match else None) == expected


def test_a_repository_name_two_models_share_matches_neither(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = get_known_model("Qwen/Qwen3-8B")
    twin = KnownModel.model_validate(
        {
            **base.model_dump(by_alias=True),
            "id": "someone/Qwen3-8B",
            "aliases": [],
            "configUrl": "https://huggingface.co/someone/Qwen3-8B/blob/main/config.json",
        }
    )
    models = known_models().model_copy(update={"models": (*known_models().models, twin)})
    monkeypatch.setattr("modelship.operator.knownmodels.known_models", lambda: models)
    assert match_known_model("s3://bucket/weights/Qwen3-8B") is None
    assert match_known_model("s3://bucket/someone/Qwen3-8B").id == "someone/Qwen3-8B"  # type: ignore[union-attr]


def test_the_operator_plans_a_volume_model_from_its_known_model() -> None:
    source = parse_source("fsx://models-fsx/mistralai/Mistral-7B-Instruct-v0.3")
    info = inspect_model(
        source, overrides=Architecture(known_model="mistralai/Mistral-7B-Instruct-v0.3")
    )
    assert (info.num_layers, info.vocab_size, info.parameters) == (32, 32768, 7_248_023_552)
    assert any("cannot mount fsx" in warning for warning in info.warnings)
    with pytest.raises(ModelUnreadableError, match=r"spec\.model\.architecture\.knownModel"):
        inspect_model(source)


def test_an_unknown_known_model_is_a_spec_error_naming_the_field() -> None:
    from modelship.operator.api import SpecError, load_spec

    with pytest.raises(SpecError) as caught:
        load_spec({"model": {"uri": "s3://bucket/x", "architecture": {"knownModel": "no/such"}}})
    assert caught.value.field == "spec.model.architecture.knownModel"
    assert "modelship models" in caught.value.message
