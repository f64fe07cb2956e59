"""modelship's KV-cache sizes against vLLM's own (the installed vLLM CPU build, building each
model from its published config.json on the meta device: tests/servers/vllm_kv_oracle.py).

For every architecture family the catalog claims — dense GQA (Llama 3.x, Mistral, Qwen2.5,
Phi-3), MoE (Mixtral, Qwen3 MoE), MLA (DeepSeek-V3), sliding window (Gemma 2 and 3, gpt-oss's
alternating windows) and hybrids (Jamba's Mamba layers, Qwen3-Next's Gated DeltaNet, Falcon-H1's
attention and Mamba2 side by side in every layer, Nemotron-H's hybrid_override_pattern) — the
per-layer kinds, the window, the K/V bytes per token of every attention layer and the state of
every Mamba / linear-attention layer must be what vLLM computes. Where they differ, vLLM is
right and modelship is fixed. The configs are the published config.json files
(tests/unit/configs.py names each repository).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from modelship.operator.modelinfo import model_info_from_config
from modelship.operator.plan import LayerKind
from modelship.operator.sizing import (
    RECURRENT_STATE_SLOTS,
    hybrid_page_layout,
    kv_bytes_per_token_per_layer,
    recurrent_state_bytes_per_layer,
    recurrent_state_slots,
)

from tests.servers.vllm_kv_oracle import KvCacheOracle
from tests.unit import configs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# vLLM's KVCacheSpec classes for each modelship layer kind, in the order vLLM registers them
# (a Falcon-H1 layer registers its attention, then its Mamba2 mixer; an MLP / MoE layer none).
ATTENTION = {"FullAttentionSpec", "MLAAttentionSpec"}
VLLM_KINDS: dict[LayerKind, list[set[str]]] = {
    "full_attention": [ATTENTION],
    "sliding_attention": [{"SlidingWindowSpec"}],
    "mamba": [{"MambaSpec"}],
    "linear_attention": [{"MambaSpec"}],  # vLLM keeps Gated DeltaNet state as a MambaSpec
    "attention_mamba": [ATTENTION, {"MambaSpec"}],
    "mlp": [],
}
MODEL_DTYPE_BYTES = 2  # every config below is bf16
# The CPU platform keeps the SSM state in fp32 whatever mamba_ssm_cache_dtype says
# (vllm/platforms/cpu.py); the convolution state stays in the model dtype.
CPU_SSM_STATE_BYTES = 4


def _faster(config: dict[str, Any]) -> dict[str, Any]:
    """Fewer routed experts: experts hold no cache, and building 256 of them per layer on the
    meta device only costs the oracle time."""
    for key in ("num_local_experts", "n_routed_experts", "num_experts"):
        if isinstance(config.get(key), int) and config[key] > 8:
            config = {**config, key: 8}
    return config


MODELS = [
    "LLAMA_3_1_8B",
    "LLAMA_3_70B",
    "MISTRAL_7B",
    "MISTRAL_7B_V0_1",
    "MIXTRAL_8X7B",
    "QWEN2_5_7B",
    "QWEN3_30B_A3B",
    "GEMMA_2_9B",
    "GEMMA_3_1B",
    "PHI_3_MINI",
    "DEEPSEEK_V3",
    "GPT_OSS_20B",
    "JAMBA_1_5_MINI",
    "QWEN3_NEXT_80B_A3B",
    "FALCON_H1_0_5B_INSTRUCT",
    "NEMOTRON_H_8B_BASE_8K",
]


@pytest.mark.parametrize("name", MODELS)
def test_kv_cache_per_layer_matches_vllm(vllm_kv_oracle: KvCacheOracle, name: str) -> None:
    config = getattr(configs, name)
    info = model_info_from_config(config, weights=None, parameters=1, files=None)
    specs = vllm_kv_oracle.layer_specs(_faster(config))
    kinds = info.layer_kinds()

    # The cache-holding layers of each decoder layer, of the same kinds, in the same order.
    expected = [
        (index, kind, spec_kinds)
        for index, kind in enumerate(kinds)
        for spec_kinds in VLLM_KINDS[kind]
    ]
    assert len(specs) == len(expected), [spec.name for spec in specs]
    for (index, kind, spec_kinds), spec in zip(expected, specs, strict=True):
        assert spec.kind in spec_kinds, f"layer {index}: modelship {kind}, vLLM {spec.kind}"

    per_token = kv_bytes_per_token_per_layer(info, 1, MODEL_DTYPE_BYTES)
    state = recurrent_state_bytes_per_layer(info, 1, MODEL_DTYPE_BYTES, CPU_SSM_STATE_BYTES)
    for (_, kind, _), spec in zip(expected, specs, strict=True):
        if spec.kind == "MambaSpec":
            assert state == spec.page_size_bytes, spec
        else:
            assert per_token == spec.bytes_per_token, spec
        if kind == "sliding_attention":
            assert info.sliding_window == spec.sliding_window

    # The whole model: K/V bytes per token over all attention layers, as vLLM would allocate.
    attention = [spec for spec in specs if spec.kind != "MambaSpec"]
    assert per_token * len(attention) == sum(spec.bytes_per_token for spec in attention)
    counts = Counter(kinds)
    assert counts["sliding_attention"] == sum(s.kind == "SlidingWindowSpec" for s in specs)


GIB = 1 << 30


def test_dense_capacity_is_whole_blocks_of_the_per_token_size(
    vllm_kv_oracle: KvCacheOracle,
) -> None:
    # Llama-3.1-8B with 4 GiB of KV cache: vLLM's token count is modelship's per-token size in
    # whole blocks (the CPU backend's blocks are 128 tokens; GPUs use 16).
    config = configs.LLAMA_3_1_8B
    info = model_info_from_config(config, weights=None, parameters=1, files=None)
    capacity = vllm_kv_oracle.capacity(config, 4 * GIB, 8192)
    (block,) = capacity.block_sizes
    per_token = info.num_layers * kv_bytes_per_token_per_layer(info, 1, MODEL_DTYPE_BYTES)
    assert capacity.tokens == (4 * GIB // (per_token * block)) * block
    assert capacity.max_concurrency == capacity.tokens / 8192


def test_hybrid_sequences_pay_tokens_in_attention_and_two_state_slots(
    vllm_kv_oracle: KvCacheOracle,
) -> None:
    # Jamba-1.5-Mini, 4 GiB, 64k sequences: a sequence costs its tokens in the 4 attention layers
    # plus RECURRENT_STATE_SLOTS state slots in each of the 28 Mamba layers (prefix caching on:
    # mamba_cache_mode "align"), all pages padded to one size. On GPUs vLLM grows the attention
    # block to fit a state (hybrid_page_layout); the CPU backend keeps 128-token blocks and pads
    # the attention page instead, which is what this reproduces from modelship's sizes.
    config = _faster(configs.JAMBA_1_5_MINI)
    info = model_info_from_config(config, weights=None, parameters=1, files=None)
    length = 65536
    capacity = vllm_kv_oracle.capacity(config, 4 * GIB, length)
    state = recurrent_state_bytes_per_layer(info, 1, MODEL_DTYPE_BYTES, CPU_SSM_STATE_BYTES)
    block = 128
    page = max(state, block * kv_bytes_per_token_per_layer(info, 1, MODEL_DTYPE_BYTES))
    assert set(capacity.pages) == {page}
    kinds = info.layer_kinds()
    attention, recurrent = kinds.count("full_attention"), len(kinds) - kinds.count("full_attention")
    per_sequence = attention * page * (length // block) + recurrent * RECURRENT_STATE_SLOTS * page
    assert abs(4 * GIB / per_sequence - capacity.max_concurrency) < 0.01
    # The "KV cache size: N tokens" vLLM logs for it is that concurrency x max_model_len, which is
    # how the plan counts kvCacheTokens for hybrid and sliding-window models too.
    assert abs(4 * GIB * length // per_sequence - capacity.tokens) <= 0.01 * capacity.tokens

    # On a GPU the same model keeps exact attention pages and pads the states instead.
    per_token = kv_bytes_per_token_per_layer(info, 1, MODEL_DTYPE_BYTES)
    gpu_state = recurrent_state_bytes_per_layer(info, 1, MODEL_DTYPE_BYTES, MODEL_DTYPE_BYTES)
    block_tokens, slot = hybrid_page_layout(per_token, gpu_state)
    assert block_tokens % 16 == 0 and slot == block_tokens * per_token >= gpu_state


def test_sliding_window_sequences_hold_the_window(vllm_kv_oracle: KvCacheOracle) -> None:
    # Gemma-3-1B, 1 GiB, 32k sequences: 4 full-attention layers hold every token, 22 sliding
    # layers the 512-token window plus one batch of new tokens. vLLM packs the layers into
    # groups of equal size (the last sliding groups pad 3 layers to 4), so modelship's count may
    # be a few percent above vLLM's, never below.
    config = configs.GEMMA_3_1B
    info = model_info_from_config(config, weights=None, parameters=1, files=None)
    length = 32768
    capacity = vllm_kv_oracle.capacity(config, GIB, length)
    block = capacity.block_sizes[0]
    per_token = kv_bytes_per_token_per_layer(info, 1, MODEL_DTYPE_BYTES)
    kinds = info.layer_kinds()
    window = min(int(info.sliding_window or 0) - 1 + capacity.max_num_batched_tokens, length)
    sliding_tokens = (-(-window // block) + 1) * block
    per_sequence = per_token * (
        kinds.count("full_attention") * length + kinds.count("sliding_attention") * sliding_tokens
    )
    modelship = GIB / per_sequence
    assert capacity.max_concurrency <= modelship <= capacity.max_concurrency * 1.05
    assert capacity.tokens <= GIB * length // per_sequence <= capacity.tokens * 1.05


@pytest.mark.parametrize("name", ["FALCON_H1_0_5B_INSTRUCT", "NEMOTRON_H_8B_BASE_8K"])
def test_mamba2_hybrids_pay_tokens_and_three_state_slots(
    vllm_kv_oracle: KvCacheOracle, name: str
) -> None:
    # Falcon-H1 (36 layers of attention and Mamba2 side by side) and Nemotron-H-8B (4 attention
    # and 24 Mamba2 layers, 24 MLP layers with no cache), 4 GiB, 8k sequences. vLLM groups the
    # layers into pages of one size and a sequence takes ceil(8192 / block) attention blocks per
    # attention group and, per Mamba2 group, three state blocks: two (prefix caching's "align"
    # mode) plus the prefill checkpoint MambaMixer2 reserves. The CPU backend keeps 128-token
    # attention blocks and pads them to the state's page; modelship's sizes reproduce its count.
    config = getattr(configs, name)
    info = model_info_from_config(config, weights=None, parameters=1, files=None)
    length = 8192
    capacity = vllm_kv_oracle.capacity(config, 4 * GIB, length)
    state = recurrent_state_bytes_per_layer(info, 1, MODEL_DTYPE_BYTES, CPU_SSM_STATE_BYTES)
    block = 128
    page = max(state, block * kv_bytes_per_token_per_layer(info, 1, MODEL_DTYPE_BYTES))
    assert set(capacity.pages) == {page}
    assert recurrent_state_slots(info) == 3
    kinds = info.layer_kinds()
    attention = sum(kind in ("full_attention", "attention_mamba") for kind in kinds)
    recurrent = sum(kind in ("mamba", "attention_mamba") for kind in kinds)
    per_sequence = page * (attention * (length // block) + recurrent * recurrent_state_slots(info))
    # vLLM counts whole pages of every layer of a group; modelship counts layers.
    assert abs(4 * GIB / per_sequence - capacity.max_concurrency) < 0.01 * capacity.max_concurrency
    assert abs(4 * GIB * length // per_sequence - capacity.tokens) <= 0.01 * capacity.tokens
