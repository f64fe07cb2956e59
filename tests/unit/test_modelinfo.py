"""Model inspection: config.json shapes of published models, safetensors packages written here
with the safetensors library, quantized layouts, overrides, and the errors people will meet."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from modelship.operator.api import Architecture
from modelship.operator.modelinfo import (
    HEADER_PROBE_BYTES,
    LocalPackage,
    ModelInfoError,
    inspect_model,
    inspect_package,
    model_info_from_config,
    quantization_from_config,
    read_safetensors_header,
    summarize_weights,
)
from modelship.operator.plan import ModelInfo
from modelship.operator.source import LocalSource, VolumeSource, parse_source
from safetensors.torch import save_file

from . import configs
from .configs import (
    DEEPSEEK_V2_LITE,
    DEEPSEEK_V3,
    GEMMA_2_9B,
    LLAMA_2_7B_GPTQ,
    LLAMA_3_8B,
    LLAMA_3_8B_FP8,
    MISTRAL_7B,
    MIXTRAL_8X7B,
    QWEN2_5_7B,
    QWEN2_5_72B_AWQ,
    QWEN2_72B,
)

SPEC_PARAMETERS = 1_000_000_000


def from_config(config: dict[str, Any], **kwargs: Any) -> ModelInfo:
    kwargs.setdefault("parameters", SPEC_PARAMETERS)
    return model_info_from_config(config, weights=None, **kwargs)


# --- published config shapes ------------------------------------------------------------------

# name: (layers, hidden, heads, kv heads, head_dim, max positions, vocab, tied, window, window layers)
SHAPES = {
    "LLAMA_3_8B": (32, 4096, 32, 8, 128, 8192, 128256, False, None, 0),
    "LLAMA_3_70B": (80, 8192, 64, 8, 128, 8192, 128256, False, None, 0),
    "LLAMA_3_1_405B": (126, 16384, 128, 8, 128, 131072, 128256, False, None, 0),
    "LLAMA_3_1_8B": (32, 4096, 32, 8, 128, 131072, 128256, False, None, 0),
    "LLAMA_2_13B": (40, 5120, 40, 40, 128, 4096, 32000, False, None, 0),
    "QWEN2_5_1_5B": (28, 1536, 12, 2, 128, 32768, 151936, True, None, 0),
    "LLAMA_3_8B_FP8": (32, 4096, 32, 8, 128, 8192, 128256, False, None, 0),
    "LLAMA_2_7B_GPTQ": (32, 4096, 32, 32, 128, 4096, 32000, False, None, 0),
    "MISTRAL_7B": (32, 4096, 32, 8, 128, 32768, 32000, False, 4096, 32),
    "MIXTRAL_8X7B": (32, 4096, 32, 8, 128, 32768, 32000, False, None, 0),
    "QWEN2_5_7B": (28, 3584, 28, 4, 128, 32768, 152064, False, None, 0),
    "QWEN2_72B": (80, 8192, 64, 8, 128, 32768, 152064, False, None, 0),
    "QWEN2_5_72B_AWQ": (80, 8192, 64, 8, 128, 32768, 152064, False, None, 0),
    "GEMMA_2_9B": (42, 3584, 16, 8, 256, 8192, 256000, True, 4096, 21),
    "GEMMA_7B": (28, 3072, 16, 16, 256, 8192, 256000, True, None, 0),
    "PHI_3_MINI": (32, 3072, 32, 32, 96, 4096, 32064, False, 2047, 32),
    "DEEPSEEK_V2_LITE": (27, 2048, 16, 16, 192, 163840, 102400, False, None, 0),
    "DEEPSEEK_V3": (61, 7168, 128, 128, 192, 163840, 129280, False, None, 0),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_published_config_shapes(name: str) -> None:
    info = from_config(configs.ALL_CONFIGS[name])
    layers, hidden, heads, kv_heads, head_dim, positions, vocab, tied, window, window_layers = (
        SHAPES[name]
    )
    assert (info.num_layers, info.hidden_size) == (layers, hidden)
    assert (info.num_attention_heads, info.num_key_value_heads, info.head_dim) == (
        heads,
        kv_heads,
        head_dim,
    )
    assert (info.max_position_embeddings, info.vocab_size) == (positions, vocab)
    assert info.tie_word_embeddings is tied
    assert (info.sliding_window, info.sliding_window_layers) == (window, window_layers)
    assert info.architecture == configs.ALL_CONFIGS[name]["architectures"][0]
    assert info.parameters_source == "spec"
    assert info.has_tokenizer is None and info.warnings == []


def test_llama_3_8b() -> None:
    info = from_config(LLAMA_3_8B)
    assert (info.model_type, info.dtype, info.quantization) == ("llama", "bf16", "none")
    assert info.intermediate_size == 14336
    assert info.num_experts is None and not info.uses_mla


def test_mixtral_experts() -> None:
    info = from_config(MIXTRAL_8X7B)
    assert (info.num_experts, info.num_experts_per_token) == (8, 2)
    assert info.moe_intermediate_size is None


def test_deepseek_v3_mla_and_experts() -> None:
    info = from_config(DEEPSEEK_V3)
    assert info.uses_mla
    assert (info.kv_lora_rank, info.qk_rope_head_dim) == (512, 64)
    assert (info.num_experts, info.num_experts_per_token, info.moe_intermediate_size) == (
        256,
        8,
        2048,
    )
    # Block-wise FP8 checkpoint: the weights are fp8 even though torch_dtype says bfloat16.
    assert (info.quantization, info.dtype) == ("fp8", "fp8")


def test_deepseek_v2_lite() -> None:
    info = from_config(DEEPSEEK_V2_LITE)
    assert (info.kv_lora_rank, info.qk_rope_head_dim) == (512, 64)
    assert (info.num_experts, info.num_experts_per_token, info.moe_intermediate_size) == (
        64,
        6,
        1408,
    )
    assert info.quantization == "none"


def test_gemma_2_head_dim_and_alternating_window() -> None:
    info = from_config(GEMMA_2_9B)
    assert info.head_dim == 256  # not hidden 3584 / 16 heads = 224
    assert (info.sliding_window, info.sliding_window_layers) == (4096, 21)


def test_qwen_sliding_window_switched_off() -> None:
    assert from_config(QWEN2_5_7B).sliding_window is None
    enabled = {**QWEN2_5_7B, "use_sliding_window": True, "sliding_window": 4096}
    enabled["max_window_layers"] = 20  # the layers from 20 up slide
    assert (from_config(enabled).sliding_window, from_config(enabled).sliding_window_layers) == (
        4096,
        8,
    )


def test_quantization_of_published_configs() -> None:
    awq = from_config(QWEN2_5_72B_AWQ)
    assert (awq.quantization, awq.quantization_group_size, awq.dtype) == ("int4-awq", 128, "fp16")
    assert awq.intermediate_size == 29696
    gptq = from_config(LLAMA_2_7B_GPTQ)
    assert (gptq.quantization, gptq.quantization_group_size, gptq.dtype) == (
        "int4-gptq",
        128,
        "fp16",
    )
    fp8 = from_config(LLAMA_3_8B_FP8)
    assert (fp8.quantization, fp8.dtype) == ("fp8", "fp8")


def _dense_parameters(info: ModelInfo, qkv_bias: bool, extra_norms_per_layer: int) -> int:
    """A decoder's parameter count from ModelInfo alone (gated MLP, RMSNorm, optional MoE)."""
    h, hd = info.hidden_size, info.head_dim
    q, kv = info.num_attention_heads * hd, info.num_key_value_heads * hd
    attention = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if qkv_bias else 0)
    assert info.intermediate_size is not None
    experts = info.num_experts or 1
    mlp = 3 * h * info.intermediate_size * experts + (h * experts if info.num_experts else 0)
    per_layer = attention + mlp + (2 + extra_norms_per_layer) * h
    return info.num_layers * per_layer + h + info.embedding_parameters


@pytest.mark.parametrize(
    ("name", "qkv_bias", "extra_norms"),
    [
        ("LLAMA_3_8B", False, 0),
        ("LLAMA_3_70B", False, 0),
        ("LLAMA_3_1_405B", False, 0),
        ("LLAMA_3_1_8B", False, 0),
        ("LLAMA_2_13B", False, 0),
        ("QWEN2_5_1_5B", True, 0),
        ("MISTRAL_7B", False, 0),
        ("MIXTRAL_8X7B", False, 0),
        ("QWEN2_5_7B", True, 0),
        ("GEMMA_2_9B", False, 2),
        ("GEMMA_7B", False, 0),
        ("PHI_3_MINI", False, 0),
    ],
)
def test_derived_shapes_add_up_to_published_counts(
    name: str, qkv_bias: bool, extra_norms: int
) -> None:
    """The derived layer sizes reproduce the published parameter count exactly."""
    info = from_config(configs.ALL_CONFIGS[name])
    assert _dense_parameters(info, qkv_bias, extra_norms) == configs.PUBLISHED_PARAMETERS[name]


def test_unknown_architecture_with_standard_fields() -> None:
    config = {
        "architectures": ["FancyNewForCausalLM"],
        "model_type": "fancy",
        "num_hidden_layers": 4,
        "hidden_size": 256,
        "num_attention_heads": 8,
        "max_position_embeddings": 2048,
        "vocab_size": 1000,
        "torch_dtype": "float16",
    }
    info = from_config(config)
    assert (info.architecture, info.num_key_value_heads, info.head_dim) == (
        "FancyNewForCausalLM",
        8,
        32,
    )
    assert (info.dtype, info.tie_word_embeddings, info.intermediate_size) == ("fp16", False, None)


def test_nested_text_config() -> None:
    wrapper = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": {**MISTRAL_7B, "sliding_window": None},
        "vision_config": {"hidden_size": 1024, "num_hidden_layers": 24},
        "torch_dtype": "float16",
    }
    info = from_config(wrapper)
    assert (info.architecture, info.model_type) == ("LlavaForConditionalGeneration", "llava")
    assert (info.num_layers, info.hidden_size, info.num_key_value_heads) == (32, 4096, 8)
    assert info.dtype == "bf16"  # text_config's torch_dtype comes first
    assert info.sliding_window is None


def test_layer_types_count_sliding_layers() -> None:
    config = {
        **LLAMA_3_8B,
        "num_hidden_layers": 6,
        "sliding_window": 512,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
    }
    info = from_config(config)
    assert (info.sliding_window, info.sliding_window_layers) == (512, 5)
    gemma3 = {**GEMMA_2_9B, "model_type": "gemma3_text", "num_hidden_layers": 12}
    gemma3["sliding_window_pattern"] = 6
    assert from_config(gemma3).sliding_window_layers == 10


def test_overrides_win_over_config() -> None:
    overrides = Architecture(
        num_layers=40, num_key_value_heads=4, head_dim=64, sliding_window=1024, vocab_size=100
    )
    info = from_config(LLAMA_3_8B, overrides=overrides)
    assert (info.num_layers, info.num_key_value_heads, info.head_dim) == (40, 4, 64)
    assert (info.sliding_window, info.sliding_window_layers, info.vocab_size) == (1024, 40, 100)
    assert info.hidden_size == 4096


def test_overrides_alone_without_config() -> None:
    overrides = Architecture(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=100,
        max_position_embeddings=512,
    )
    info = from_config({}, overrides=overrides)
    assert (info.architecture, info.head_dim, info.parameters) == ("unknown", 16, SPEC_PARAMETERS)
    assert info.dtype == "fp32" and "torch_dtype" in info.warnings[0]


def test_missing_fields_name_config_and_spec_field() -> None:
    config = {k: v for k, v in LLAMA_3_8B.items() if k not in ("num_hidden_layers", "vocab_size")}
    with pytest.raises(ModelInfoError) as error:
        from_config(config)
    message = str(error.value)
    assert "num_hidden_layers (spec.model.architecture.numLayers)" in message
    assert "vocab_size (spec.model.architecture.vocabSize)" in message
    assert "hidden_size" not in message
    # The override fills the gap.
    info = from_config(config, overrides=Architecture(num_layers=32, vocab_size=128256))
    assert info.num_layers == 32


def test_no_config_and_no_overrides() -> None:
    with pytest.raises(ModelInfoError, match=r"there is no config\.json"):
        from_config({})


def test_no_weights_and_no_parameters() -> None:
    with pytest.raises(ModelInfoError, match=r"spec.model.parameters .*--params"):
        model_info_from_config(LLAMA_3_8B, weights=None, overrides=None, parameters=None)


def test_bad_config_values() -> None:
    with pytest.raises(ModelInfoError, match="hidden_size is '4096'"):
        from_config({**LLAMA_3_8B, "hidden_size": "4096"})
    with pytest.raises(ModelInfoError, match="torch_dtype 'int3'"):
        from_config({**LLAMA_3_8B, "torch_dtype": "int3"})
    with pytest.raises(ModelInfoError, match=r"headDim"):
        from_config({**LLAMA_3_8B, "num_attention_heads": 30})


def test_quantization_mapping() -> None:
    def quant(qc: dict[str, Any]) -> tuple[str, int | None, int | None]:
        q = quantization_from_config({"quantization_config": qc})
        return q.name, q.bits, q.group_size

    # group_size -1: one scale per output channel (GPTQ), kept as -1 so sizing skips group checks.
    assert quant({"quant_method": "gptq", "bits": 8, "group_size": -1}) == ("int8-gptq", 8, -1)
    assert quant({"quant_method": "awq", "bits": 4, "group_size": 64}) == ("int4-awq", 4, 64)
    with pytest.raises(ModelInfoError, match="bits is 8 for awq"):
        quant({"quant_method": "awq", "bits": 8})
    with pytest.raises(ModelInfoError, match="quant_method 'bitsandbytes'"):
        quant({"quant_method": "bitsandbytes", "load_in_4bit": True})

    def compressed(*weights: dict[str, Any]) -> dict[str, Any]:
        groups = {
            f"group_{i}": {"targets": ["Linear"], "weights": w} for i, w in enumerate(weights)
        }
        return {"quant_method": "compressed-tensors", "config_groups": groups}

    fp8 = {"num_bits": 8, "type": "float", "strategy": "channel", "group_size": None}
    int4 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}
    int8 = {"num_bits": 8, "type": "int", "strategy": "channel", "group_size": None}
    assert quant(compressed(fp8)) == ("fp8", None, None)
    assert quant(compressed(int4)) == ("int4-gptq", 4, 128)
    assert quant(compressed(int8)) == ("int8", 8, -1)  # strategy channel: per-channel scales
    with pytest.raises(ModelInfoError, match="config_groups"):
        quant(compressed(fp8, int4))


def test_quantization_formats_users_have() -> None:
    # openai/gpt-oss-120b: MXFP4 experts; attention, router, embeddings and lm_head not converted.
    gpt_oss = quantization_from_config(configs.GPT_OSS_120B)
    assert (gpt_oss.name, gpt_oss.method, gpt_oss.bits, gpt_oss.group_size) == (
        "mxfp4",
        "mxfp4",
        4,
        32,
    )
    assert "model.layers.*.self_attn" in gpt_oss.unquantized_modules
    # Qwen/Qwen3-30B-A3B-FP8: block FP8, 128 x 128, lm_head and routers not converted.
    block = quantization_from_config(configs.QWEN3_30B_A3B_FP8)
    assert (block.name, block.block_size) == ("fp8", (128, 128))
    assert "lm_head" in block.unquantized_modules
    # compressed-tensors block FP8 (llm-compressor FP8_BLOCK scheme): block_structure.
    compressed_block = quantization_from_config(
        {
            "quantization_config": {
                "quant_method": "compressed-tensors",
                "config_groups": {
                    "group_0": {
                        "targets": ["Linear"],
                        "weights": {
                            "num_bits": 8,
                            "type": "float",
                            "strategy": "block",
                            "block_structure": [128, 128],
                        },
                    }
                },
                "ignore": ["lm_head"],
            }
        }
    )
    assert (compressed_block.name, compressed_block.block_size) == ("fp8", (128, 128))
    assert compressed_block.unquantized_modules == ("lm_head",)
    with pytest.raises(ModelInfoError, match="weight_block_size is \\[128\\]"):
        quantization_from_config(
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}}
        )


def test_layer_kinds_follow_each_family() -> None:
    def kinds(config: dict[str, Any]) -> list[str]:
        return list(from_config(config).layer_kinds())

    # gpt-oss layer_types: alternating 128-token windows and full attention.
    gpt_oss = from_config(configs.GPT_OSS_20B)
    assert gpt_oss.layer_kinds()[:2] == ["sliding_attention", "full_attention"]
    assert (gpt_oss.sliding_window, gpt_oss.sliding_window_layers) == (128, 12)
    # Gemma 2: even layers slide (vLLM gemma2.py); Gemma 3: every 6th layer is global.
    assert kinds(GEMMA_2_9B)[:4] == ["sliding_attention", "full_attention"] * 2
    gemma3 = kinds(configs.GEMMA_3_1B)
    assert [i for i, kind in enumerate(gemma3) if kind == "full_attention"] == [5, 11, 17, 23]
    # Jamba: attention at layer % 8 == 4, Mamba elsewhere; state shapes from mamba_d_*.
    jamba = from_config(configs.JAMBA_1_5_MINI)
    assert [i for i, k in enumerate(jamba.layer_kinds()) if k == "full_attention"] == [
        4,
        12,
        20,
        28,
    ]
    assert (jamba.recurrent_conv_elements, jamba.recurrent_ssm_elements) == (3 * 8192, 8192 * 16)
    assert (jamba.recurrent_mixer, jamba.recurrent_ssm_dtype) == ("mamba", None)
    # Qwen3-Next: full attention every 4th layer, Gated DeltaNet in between.
    nxt = from_config(configs.QWEN3_NEXT_80B_A3B)
    assert nxt.layer_kinds()[:4] == ["linear_attention"] * 3 + ["full_attention"]
    assert nxt.recurrent_conv_elements == 3 * (2 * 16 * 128 + 32 * 128)
    assert nxt.recurrent_ssm_elements == 32 * 128 * 128
    assert nxt.recurrent_mixer == "gated_deltanet"
    # Plain GQA models list no per-layer kinds (all full attention).
    assert from_config(LLAMA_3_8B).layer_types == []
    with pytest.raises(ModelInfoError, match="layer_types lists 2 layers"):
        from_config({**LLAMA_3_8B, "layer_types": ["full_attention"] * 2})
    with pytest.raises(ModelInfoError, match="cross_attention"):
        from_config({**LLAMA_3_8B, "layer_types": ["cross_attention"] * 32})


def test_mxfp4_blocks_count_two_weights_per_byte() -> None:
    # gpt-oss stores each expert projection as *_blocks (U8: two FP4 values) and *_scales (U8
    # E8M0, one per 32 weights): parameters are the FP4 values, scales are not parameters.
    experts, rows, blocks = 4, 64, 2
    header = {
        "model.layers.0.mlp.experts.down_proj_blocks": {
            "dtype": "U8",
            "shape": [experts, rows, blocks, 16],
            "data_offsets": [0, experts * rows * blocks * 16],
        },
        "model.layers.0.mlp.experts.down_proj_scales": {
            "dtype": "U8",
            "shape": [experts, rows, blocks],
            "data_offsets": [experts * rows * blocks * 16, experts * rows * blocks * 17],
        },
    }
    summary = summarize_weights({"model.safetensors": header}, quantization_bits=4)
    assert summary.parameters == experts * rows * blocks * 32
    assert summary.checkpoint_bytes == experts * rows * blocks * 17


# --- safetensors packages ------------------------------------------------------------------------

TINY = {
    **LLAMA_3_8B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 256,
}
TOKENIZER_FILES = {"tokenizer.json": "{}", "tokenizer_config.json": "{}"}


def tiny_tensors(
    config: dict[str, Any], dtype: torch.dtype = torch.bfloat16, lm_head: bool = True
) -> dict[str, torch.Tensor]:
    """The tensors of a Llama-shaped decoder, all zeros."""
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    tensors = {"model.embed_tokens.weight": torch.zeros(vocab, h, dtype=dtype)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes = {
            "self_attn.q_proj.weight": (h, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, h),
            "mlp.gate_proj.weight": (inter, h),
            "mlp.up_proj.weight": (inter, h),
            "mlp.down_proj.weight": (h, inter),
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
        }
        tensors.update(
            {p + name: torch.zeros(shape, dtype=dtype) for name, shape in shapes.items()}
        )
    tensors["model.norm.weight"] = torch.zeros(h, dtype=dtype)
    if lm_head:
        tensors["lm_head.weight"] = torch.zeros(vocab, h, dtype=dtype)
    return tensors


def write_package(
    root: Path,
    config: dict[str, Any] | None,
    shards: list[dict[str, torch.Tensor]],
    *,
    index: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    weight_map = {}
    for number, tensors in enumerate(shards, start=1):
        name = (
            f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            if len(shards) > 1
            else "model.safetensors"
        )
        save_file(tensors, str(root / name))
        weight_map.update(dict.fromkeys(tensors, name))
    if index:
        (root / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
        )
    for path, text in {**TOKENIZER_FILES, **(extra_files or {})}.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


def count(tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(elements, bytes) of the tensors."""
    return (
        sum(t.numel() for t in tensors.values()),
        sum(t.numel() * t.element_size() for t in tensors.values()),
    )


def inspect_dir(root: Path, **kwargs: Any) -> ModelInfo:
    return inspect_model(parse_source(f"file://{root}"), **kwargs)


def test_single_file_package(tmp_path: Path) -> None:
    tensors = tiny_tensors(TINY)
    root = write_package(tmp_path / "m", TINY, [tensors])
    info = inspect_dir(root)
    elements, data_bytes = count(tensors)
    assert info.parameters == elements == _dense_parameters(info, False, 0)
    assert info.parameters_source == "safetensors"
    assert info.checkpoint_bytes == data_bytes == 2 * elements
    assert (info.dtype, info.weight_files, info.has_tokenizer) == (
        "bf16",
        ["model.safetensors"],
        True,
    )
    assert info.warnings == [] and not info.is_training_checkpoint


def test_sharded_package_with_index(tmp_path: Path) -> None:
    tensors = tiny_tensors(TINY)
    names = sorted(tensors)
    shards = [{n: tensors[n] for n in names[: len(names) // 2]}]
    shards.append({n: tensors[n] for n in names[len(names) // 2 :]})
    # A stray copy that the index does not name is not counted.
    root = write_package(tmp_path / "m", TINY, shards, index=True)
    save_file({"x": torch.zeros(1000)}, str(root / "stray.safetensors"))
    info = inspect_dir(root)
    assert info.weight_files == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert (info.parameters, info.checkpoint_bytes) == count(tensors)


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    tensors = tiny_tensors(TINY)
    names = sorted(tensors)
    shards = [{n: tensors[n] for n in names[:5]}, {n: tensors[n] for n in names[5:]}]
    root = write_package(tmp_path / "m", TINY, shards, index=True)
    (root / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelInfoError, match=r"names model-00002-of-00002.safetensors.*upload"):
        inspect_dir(root)


def test_mistral_consolidated_copy_is_not_counted_twice(tmp_path: Path) -> None:
    tensors = tiny_tensors(TINY)
    root = write_package(tmp_path / "m", TINY, [tensors])
    save_file(tensors, str(root / "consolidated.safetensors"))
    assert inspect_dir(root).parameters == count(tensors)[0]


def test_tied_embeddings_from_headers(tmp_path: Path) -> None:
    config = {k: v for k, v in TINY.items() if k != "tie_word_embeddings"}
    tensors = tiny_tensors(TINY, lm_head=False)
    info = inspect_dir(write_package(tmp_path / "m", config, [tensors]))
    assert info.tie_word_embeddings is True
    assert info.parameters == count(tensors)[0]


def test_awq_packed_package(tmp_path: Path) -> None:
    """AWQ GEMM layout: qweight [in, out/8] int32, qzeros [in/g, out/8], scales [in/g, out]."""
    group = 32
    config = {**TINY, "torch_dtype": "float16"}
    config["quantization_config"] = {**QWEN2_5_72B_AWQ["quantization_config"], "group_size": group}
    dense = tiny_tensors(config, dtype=torch.float16)
    tensors: dict[str, torch.Tensor] = {}
    logical = 0
    for name, tensor in dense.items():
        if ".layers." in name and name.endswith("proj.weight"):
            out_features, in_features = tensor.shape
            base = name.removesuffix(".weight")
            tensors[base + ".qweight"] = torch.zeros(
                in_features, out_features // 8, dtype=torch.int32
            )
            tensors[base + ".qzeros"] = torch.zeros(
                in_features // group, out_features // 8, dtype=torch.int32
            )
            tensors[base + ".scales"] = torch.zeros(
                in_features // group, out_features, dtype=torch.float16
            )
        else:
            tensors[name] = tensor
        logical += tensor.numel()
    info = inspect_dir(write_package(tmp_path / "m", config, [tensors]))
    assert info.parameters == logical == count(dense)[0]
    assert info.checkpoint_bytes == count(tensors)[1]
    assert (info.quantization, info.quantization_group_size, info.dtype) == ("int4-awq", 32, "fp16")


def test_gptq_packed_package(tmp_path: Path) -> None:
    """GPTQ layout: qweight [in/8, out] int32, qzeros, scales, g_idx [in] (not parameters)."""
    group = 32
    config = {**TINY, "torch_dtype": "float16"}
    config["quantization_config"] = {**LLAMA_2_7B_GPTQ["quantization_config"], "group_size": group}
    dense = tiny_tensors(config, dtype=torch.float16)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in dense.items():
        if ".layers." in name and name.endswith("proj.weight"):
            out_features, in_features = tensor.shape
            base = name.removesuffix(".weight")
            tensors[base + ".qweight"] = torch.zeros(
                in_features // 8, out_features, dtype=torch.int32
            )
            tensors[base + ".qzeros"] = torch.zeros(
                in_features // group, out_features // 8, dtype=torch.int32
            )
            tensors[base + ".scales"] = torch.zeros(
                in_features // group, out_features, dtype=torch.float16
            )
            tensors[base + ".g_idx"] = torch.zeros(in_features, dtype=torch.int32)
        else:
            tensors[name] = tensor
    info = inspect_dir(write_package(tmp_path / "m", config, [tensors]))
    assert info.parameters == count(dense)[0]
    assert info.checkpoint_bytes == count(tensors)[1]
    assert (info.quantization, info.quantization_group_size) == ("int4-gptq", 32)


def test_packed_tensors_without_quantization_config(tmp_path: Path) -> None:
    tensors = {"model.layers.0.mlp.up_proj.qweight": torch.zeros(64, 16, dtype=torch.int32)}
    tensors |= tiny_tensors(TINY)
    root = write_package(tmp_path / "m", TINY, [tensors])
    with pytest.raises(ModelInfoError, match=r"no quantization_config.bits"):
        inspect_dir(root)


def test_fp8_package_with_scales(tmp_path: Path) -> None:
    dense = tiny_tensors(LLAMA_3_8B_FP8 | {k: TINY[k] for k in TINY if k != "quantization_config"})
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in dense.items():
        if ".layers." in name and name.endswith("proj.weight"):
            tensors[name] = tensor.to(torch.float8_e4m3fn)
            base = name.removesuffix(".weight")
            tensors[base + ".weight_scale"] = torch.ones((), dtype=torch.float32)
            tensors[base + ".input_scale"] = torch.ones((), dtype=torch.float32)
        else:
            tensors[name] = tensor
    config = {**TINY, "quantization_config": LLAMA_3_8B_FP8["quantization_config"]}
    info = inspect_dir(write_package(tmp_path / "m", config, [tensors]))
    assert info.parameters == count(dense)[0]
    assert info.checkpoint_bytes == count(tensors)[1]
    assert (info.quantization, info.dtype) == ("fp8", "fp8")
    assert info.warnings == []


def test_dtype_from_headers_beats_config(tmp_path: Path) -> None:
    tensors = tiny_tensors(TINY, dtype=torch.float32)
    info = inspect_dir(write_package(tmp_path / "m", TINY, [tensors]))
    assert info.dtype == "fp32" and info.checkpoint_bytes == 4 * info.parameters
    assert "torch_dtype bf16 but the weights are stored as fp32" in info.warnings[0]


def test_spec_parameters_far_from_count_warns(tmp_path: Path) -> None:
    tensors = tiny_tensors(TINY)
    root = write_package(tmp_path / "m", TINY, [tensors])
    elements = count(tensors)[0]
    close = inspect_dir(root, parameters=int(elements * 1.04))
    assert close.parameters == elements and close.warnings == []
    far = inspect_dir(root, parameters=elements * 2)
    assert far.parameters == elements and far.parameters_source == "safetensors"
    assert "spec.model.parameters" in far.warnings[0] and "100% apart" in far.warnings[0]


def test_no_safetensors_uses_spec_parameters(tmp_path: Path) -> None:
    root = write_package(tmp_path / "m", TINY, [], extra_files={"pytorch_model.bin": "pickle"})
    with pytest.raises(ModelInfoError, match=rf"{root}: there are no \*.safetensors"):
        inspect_dir(root)
    info = inspect_dir(root, parameters=7_000_000)
    assert (info.parameters, info.parameters_source, info.checkpoint_bytes) == (
        7_000_000,
        "spec",
        None,
    )
    assert "pickle" in info.warnings[0] and "trustPickle" in info.warnings[0]


def test_missing_config(tmp_path: Path) -> None:
    root = write_package(tmp_path / "m", None, [tiny_tensors(TINY)])
    with pytest.raises(ModelInfoError, match=r"no config.json.*numLayers"):
        inspect_dir(root)


def test_invalid_config_json(tmp_path: Path) -> None:
    root = write_package(tmp_path / "m", TINY, [tiny_tensors(TINY)])
    (root / "config.json").write_text("{not json")
    with pytest.raises(ModelInfoError, match=r"config\.json is not valid JSON"):
        inspect_dir(root)


def test_missing_tokenizer(tmp_path: Path) -> None:
    root = write_package(tmp_path / "m", TINY, [tiny_tensors(TINY)])
    (root / "tokenizer.json").unlink()
    info = inspect_dir(root)
    assert info.has_tokenizer is False
    assert "no tokenizer" in info.warnings[0]


def test_training_checkpoint(tmp_path: Path) -> None:
    extra = {
        "optimizer.pt": "x",
        "scheduler.pt": "x",
        "rng_state_0.pth": "x",
        "trainer_state.json": "{}",
        "global_step500/mp_rank_00_model_states.pt": "x",
    }
    tensors = tiny_tensors(TINY)
    info = inspect_dir(write_package(tmp_path / "m", TINY, [tensors], extra_files=extra))
    assert info.is_training_checkpoint
    assert info.parameters == count(tensors)[0]
    (warning,) = info.warnings
    assert "global_step500, optimizer.pt, rng_state_0.pth, scheduler.pt" in warning
    assert "skipped" in warning


def test_truncated_shard(tmp_path: Path) -> None:
    root = write_package(tmp_path / "m", TINY, [tiny_tensors(TINY)])
    shard = root / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ModelInfoError, match=r"model.safetensors is \d+ bytes but its header"):
        inspect_dir(root)


class UnreadableConfigPackage(LocalPackage):
    """A mounted volume where config.json exists but cannot be opened (mode 000 for our user)."""

    def read_bytes(self, path: str) -> bytes:
        if path == "config.json":
            raise PermissionError(13, "Permission denied", str(self.root / path))
        return super().read_bytes(path)


def test_unreadable_file_is_a_model_info_error(tmp_path: Path) -> None:
    root = write_package(tmp_path / "m", TINY, [tiny_tensors(TINY)])
    with pytest.raises(ModelInfoError, match=r"cannot read .*config.json \(Permission denied\)"):
        inspect_package(UnreadableConfigPackage(root))
    assert inspect_package(LocalPackage(root)).num_layers == 2


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelInfoError, match="not a directory"):
        inspect_dir(tmp_path / "nope")


def test_volume_source(tmp_path: Path) -> None:
    write_package(tmp_path / "volume" / "models" / "tiny", TINY, [tiny_tensors(TINY)])
    source = parse_source("fsx://weights/models/tiny")
    assert isinstance(source, VolumeSource)
    with pytest.raises(ModelInfoError, match=r"fsx://weights/models/tiny: .*spec.model.parameters"):
        inspect_model(source)
    mounted = inspect_model(source, volume_root=tmp_path / "volume")
    local = inspect_dir(tmp_path / "volume" / "models" / "tiny")
    assert mounted == local
    overrides = Architecture(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=256,
        max_position_embeddings=8192,
    )
    from_spec = inspect_model(source, overrides=overrides, parameters=5_000_000)
    assert (from_spec.parameters, from_spec.has_tokenizer) == (5_000_000, None)
    assert "was not read" in from_spec.warnings[-1]


# --- the header parser ----------------------------------------------------------------------


class CountingReader:
    """A range reader over bytes that records every read."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads: list[tuple[int, int]] = []

    def __call__(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.data[offset : offset + length]


def safetensors_bytes(header: dict[str, Any], data_bytes: int) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(data_bytes)


def test_header_parser_reads_one_range_for_normal_headers(tmp_path: Path) -> None:
    save_file(tiny_tensors(TINY), str(tmp_path / "m.safetensors"))
    reader = CountingReader((tmp_path / "m.safetensors").read_bytes())
    header = read_safetensors_header(reader)
    assert header["lm_head.weight"]["shape"] == [256, 64]
    assert reader.reads == [(0, HEADER_PROBE_BYTES)]


def test_header_parser_long_header_takes_a_second_range() -> None:
    header = {
        f"t{i:06d}": {"dtype": "F16", "shape": [1], "data_offsets": [2 * i, 2 * i + 2]}
        for i in range(30000)
    }
    data = safetensors_bytes(header, 60000)
    reader = CountingReader(data)
    assert len(read_safetensors_header(reader)) == 30000
    header_end = len(data) - 60000
    assert header_end > HEADER_PROBE_BYTES
    assert reader.reads == [
        (0, HEADER_PROBE_BYTES),
        (HEADER_PROBE_BYTES, header_end - HEADER_PROBE_BYTES),
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"abc", "too short"),
        (struct.pack("<Q", 1 << 40) + b"{}", "does not start with a safetensors header"),
        (struct.pack("<Q", 100) + b"{}", "truncated"),
        (struct.pack("<Q", 4) + b"nope", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (safetensors_bytes({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, 1), "'w'"),
    ],
)
def test_header_parser_errors(data: bytes, message: str) -> None:
    with pytest.raises(ModelInfoError, match=message):
        read_safetensors_header(CountingReader(data), name="shard.safetensors")


def test_local_source_type() -> None:
    assert isinstance(parse_source("file:///models/x"), LocalSource)


def test_configs_are_not_mutated() -> None:
    before = copy.deepcopy(configs.ALL_CONFIGS)
    for config in configs.ALL_CONFIGS.values():
        from_config(config)
    assert before == configs.ALL_CONFIGS
    assert QWEN2_72B["intermediate_size"] == 29568


def test_falcon_h1_layers_hold_attention_and_mamba_side_by_side() -> None:
    # tiiuae/Falcon-H1-0.5B-Instruct: every one of the 36 layers runs attention (2 KV heads x 64)
    # and a Mamba2 mixer (vLLM falcon_h1.py FalconH1ParallelHybrid), so each holds K/V per token
    # and a state per sequence: conv (d_conv - 1) x (d_ssm + 2 x groups x d_state), SSM
    # heads x head_dim x d_state.
    info = from_config(configs.FALCON_H1_0_5B_INSTRUCT)
    assert info.layer_kinds() == ["attention_mamba"] * 36
    assert (info.num_key_value_heads, info.head_dim) == (2, 64)
    assert info.recurrent_conv_elements == 3 * (1536 + 2 * 1 * 128)
    assert info.recurrent_ssm_elements == 24 * 64 * 128
    assert info.recurrent_ssm_dtype is None  # the model's dtype (vLLM mamba_ssm_cache_dtype auto)
    assert info.recurrent_mixer == "mamba2"
    assert info.warnings == []
    # mamba_d_head "auto" (FalconH1Config's default) is the Mamba width over the heads.
    auto = from_config({**configs.FALCON_H1_0_5B_INSTRUCT, "mamba_d_head": "auto"})
    assert auto.recurrent_ssm_elements == info.recurrent_ssm_elements


def test_nemotron_h_pattern_decides_which_layers_cache_what() -> None:
    # nvidia/Nemotron-H-8B-Base-8K: hybrid_override_pattern M (Mamba2), * (attention), - (MLP,
    # no cache); vLLM builds one layer per character (nemotron_h.py ALL_DECODER_LAYER_TYPES).
    info = from_config(configs.NEMOTRON_H_8B_BASE_8K)
    kinds = info.layer_kinds()
    assert [i for i, kind in enumerate(kinds) if kind == "full_attention"] == [7, 18, 29, 40]
    assert (kinds.count("mamba"), kinds.count("mlp")) == (24, 24)
    assert kinds[:3] == ["mamba", "mlp", "mamba"]
    assert info.head_dim == 128  # attention_head_dim
    assert info.recurrent_conv_elements == 3 * (128 * 64 + 2 * 8 * 128)
    assert info.recurrent_ssm_elements == 128 * 64 * 128
    # vLLM keeps Nemotron-H's SSM state in config.json mamba_ssm_cache_dtype, float32 when unsaid
    # (models/config.py NemotronHForCausalLMConfig).
    assert info.recurrent_ssm_dtype == "fp32"
    assert info.recurrent_mixer == "mamba2"
    bf16_state = {**configs.NEMOTRON_H_8B_BASE_8K, "mamba_ssm_cache_dtype": "bfloat16"}
    assert from_config(bf16_state).recurrent_ssm_dtype == "bf16"
    assert info.warnings == []
    # MoE variants: E is an expert block, which caches nothing either.
    moe = from_config({**configs.NEMOTRON_H_8B_BASE_8K, "hybrid_override_pattern": "ME*E" * 13})
    assert moe.layer_kinds()[:4] == ["mamba", "mlp", "full_attention", "mlp"]
    # transformers 5 writes the pattern as layers_block_type; its linear_attention is Mamba2.
    listed = {
        **{
            k: v for k, v in configs.NEMOTRON_H_8B_BASE_8K.items() if k != "hybrid_override_pattern"
        },
        "layers_block_type": ["linear_attention", "mlp", "full_attention", "moe"] * 13,
    }
    assert from_config(listed).layer_kinds() == moe.layer_kinds()


def test_nemotron_h_pattern_errors_name_the_field() -> None:
    bad = {**configs.NEMOTRON_H_8B_BASE_8K, "hybrid_override_pattern": "MX" * 26}
    with pytest.raises(ModelInfoError, match="hybrid_override_pattern has 'X'"):
        from_config(bad)
    short = {**configs.NEMOTRON_H_8B_BASE_8K, "hybrid_override_pattern": "M*-"}
    with pytest.raises(ModelInfoError, match="describes 3 layers but num_hidden_layers is 52"):
        from_config(short)
