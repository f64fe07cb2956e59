"""The sizing engine against published deployments and vLLM's own memory accounting.

Each real-world case names where the fact comes from; the config.json shapes are the published
ones (tests/unit/configs.py). Sizing facts and their citations are gathered in
shared/reference/sizing-notes.md (SN below, with its section).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from modelship.operator.api import SpecError, load_spec
from modelship.operator.catalog import GIB, load_catalog
from modelship.operator.modelinfo import model_info_from_config
from modelship.operator.plan import ModelInfo, Plan
from modelship.operator.sizing import (
    BLOCK_SIZE,
    hybrid_page_layout,
    kv_bytes_per_token_per_layer,
    make_plan,
    pipeline_stages,
    recurrent_state_bytes_per_layer,
    served_format,
    weight_bytes,
)

from . import configs

CATALOG = load_catalog()
KIB = 1024


def info_for(
    config: dict[str, Any], parameters: int, *, checkpoint_bytes: int | None = None
) -> ModelInfo:
    info = model_info_from_config(config, weights=None, parameters=parameters, files=None)
    if checkpoint_bytes is not None:
        info = info.model_copy(
            update={"checkpoint_bytes": checkpoint_bytes, "parameters_source": "safetensors"}
        )
    return info


def plan(info: ModelInfo, compile_step: bool = False, **spec: Any) -> Plan:
    body: dict[str, Any] = {"model": {"uri": "s3://models/m", **spec.pop("model", {})}}
    body.update(spec)
    return make_plan(info, load_spec(body), CATALOG, compile_step=compile_step)


# Published parameter counts (model cards) and checkpoint sizes.
LLAMA_3_8B = info_for(configs.LLAMA_3_8B, 8_030_261_248, checkpoint_bytes=16_060_522_496)
LLAMA_3_70B = info_for(configs.LLAMA_3_70B, 70_553_706_496)
LLAMA_3_1_405B = info_for(configs.LLAMA_3_1_405B, 405_853_388_800)
MIXTRAL = info_for(configs.MIXTRAL_8X7B, 46_702_792_704)


def only(**accelerator: Any) -> dict[str, Any]:
    return {"accelerator": accelerator}


class TestKvCacheBytes:
    """Per-token KV sizes from SN 1.5 (vLLM's AttentionSpec page size / block size)."""

    @pytest.mark.parametrize(
        ("config", "parameters", "kib_per_token"),
        [
            (configs.LLAMA_3_8B, 8_030_261_248, 128),
            (configs.LLAMA_3_70B, 70_553_706_496, 320),
            (configs.QWEN2_5_7B, 7_615_616_512, 56),
            (configs.MIXTRAL_8X7B, 46_702_792_704, 128),
            (configs.PHI_3_MINI, 3_821_079_552, 384),
        ],
    )
    def test_full_model_per_token(
        self, config: dict[str, Any], parameters: int, kib_per_token: int
    ) -> None:
        info = info_for(config, parameters)
        per_layer = kv_bytes_per_token_per_layer(info, tensor_parallel_size=1, element_bytes=2)
        assert per_layer * info.num_layers == kib_per_token * KIB

    def test_kv_heads_split_then_replicated_over_tensor_parallel(self) -> None:
        # get_num_kv_heads: max(1, kv_heads // TP): 8 KV heads at TP 16 still hold one head each.
        per_tp = {tp: kv_bytes_per_token_per_layer(LLAMA_3_70B, tp, 2) for tp in (1, 2, 8, 16)}
        assert per_tp[1] == 2 * 8 * 128 * 2
        assert per_tp[2] == per_tp[1] // 2
        assert per_tp[8] == per_tp[16] == 2 * 1 * 128 * 2

    def test_mla_caches_one_latent_vector_not_divided_by_tp(self) -> None:
        # DeepSeek-V3: kv_lora_rank 512 + qk_rope_head_dim 64 = 576 elements per layer (SN 1.5).
        info = info_for(configs.DEEPSEEK_V3, 671_026_419_200)
        assert info.uses_mla
        assert kv_bytes_per_token_per_layer(info, 1, 2) == 576 * 2
        assert kv_bytes_per_token_per_layer(info, 8, 2) == 576 * 2

    def test_fp8_kv_cache_halves_the_cache(self) -> None:
        auto = plan(LLAMA_3_8B, serving={"maxModelLen": 8192}, **only(instanceTypes=["g6.xlarge"]))
        fp8 = plan(
            LLAMA_3_8B,
            serving={"maxModelLen": 8192, "kvCacheDtype": "fp8"},
            **only(instanceTypes=["g6.xlarge"]),
        )
        assert auto.chosen and fp8.chosen
        assert fp8.chosen.kv_cache_bytes_per_token * 2 == auto.chosen.kv_cache_bytes_per_token
        assert fp8.chosen.kv_cache_tokens >= 2 * auto.chosen.kv_cache_tokens - BLOCK_SIZE
        assert "--kv-cache-dtype" in fp8.chosen.engine_args


class TestWeights:
    def test_checkpoint_bytes_are_used_exactly(self) -> None:
        fmt = served_format(LLAMA_3_8B, "auto")
        assert weight_bytes(LLAMA_3_8B, fmt) == 16_060_522_496

    def test_int4_keeps_embeddings_in_16_bits_and_pays_group_scales(self) -> None:
        # Llama-3-70B AWQ checkpoints are ~39.8 GB (SN 1.2: ~0.5 B/param + ~3% scales, 16-bit
        # embeddings and lm_head).
        fmt = served_format(LLAMA_3_70B, "int4-awq")
        size = weight_bytes(LLAMA_3_70B, fmt)
        assert 38e9 < size < 41e9
        naive = LLAMA_3_70B.parameters // 2
        assert size > naive * 1.05

    def test_fp8_online_quantization_from_a_bf16_checkpoint(self) -> None:
        result = plan(
            LLAMA_3_8B, model={"quantization": "fp8"}, **only(instanceTypes=["g6.xlarge"])
        )
        assert result.chosen
        # embeddings (2 x 128256 x 4096) stay bf16, the rest is one byte per parameter
        assert 8.5e9 < result.chosen.weight_bytes < 9.2e9
        assert (
            result.chosen.engine_args[result.chosen.engine_args.index("--quantization") + 1]
            == "fp8"
        )

    def test_int4_from_a_bf16_checkpoint_is_refused_not_guessed(self) -> None:
        with pytest.raises(SpecError) as error:
            plan(LLAMA_3_8B, model={"quantization": "int4-awq"})
        assert error.value.field == "spec.model.quantization"
        assert "fp8" in error.value.message


class TestPublishedDeployments:
    def test_8b_bf16_fits_one_24gb_gpu_at_8k(self) -> None:
        # Llama-3.1-8B bf16 on a 24 GB GPU: "Loading model weights took 14.99 GiB" and ~3.8 GiB
        # of KV cache at util 0.9 (vLLM issue 10517; ai-on-eks runs it on g5/g6 single GPUs).
        result = plan(LLAMA_3_8B, serving={"maxModelLen": 8192}, **only(family="nvidia"))
        chosen = result.chosen
        assert chosen is not None
        assert chosen.instance_type == "g6.xlarge"  # the cheapest 24 GB GPU
        assert (chosen.accelerator_count, chosen.tensor_parallel_size) == (1, 1)
        assert 20_000 < chosen.kv_cache_tokens < 35_000
        assert chosen.memory.weight_bytes == 16_060_522_496

    def test_8b_bf16_does_not_fit_a_16gb_t4(self) -> None:
        result = plan(
            LLAMA_3_8B, serving={"maxModelLen": 8192}, **only(instanceTypes=["g4dn.xlarge"])
        )
        assert result.chosen is None
        assert "exceed" in result.rejected[0].reason

    def test_70b_bf16_needs_four_80gb_gpus_at_a_useful_context(self) -> None:
        # Llama-3-70B bf16 (~131 GiB) is served at TP4 on 4 x 80 GB in vLLM's and Meta's recipes;
        # on 2 x 80 GB only ~2 GiB per GPU remain for KV cache: one 8k sequence, not eight.
        needs = {"maxModelLen": 8192, "concurrency": 8}
        two = plan(
            LLAMA_3_70B, serving=needs, **only(instanceTypes=["p4de.24xlarge"], maxAccelerators=2)
        )
        assert two.chosen is None
        tp2 = [r for r in two.rejected if r.accelerator_count == 2]
        assert "1 sequences" in tp2[0].reason
        four = plan(
            LLAMA_3_70B, serving=needs, **only(instanceTypes=["p4de.24xlarge"], maxAccelerators=4)
        )
        assert four.chosen is not None
        assert four.chosen.tensor_parallel_size == 4
        assert four.chosen.max_concurrent_sequences >= 8

    def test_70b_int4_fits_two_48gb_gpus(self) -> None:
        # Llama-3-70B AWQ (~40 GB) on 2 x L40S/A6000 48 GB is the standard AutoAWQ/vLLM setup.
        needs = {"maxModelLen": 8192, "concurrency": 4}
        two = plan(
            LLAMA_3_70B,
            model={"quantization": "int4-awq"},
            serving=needs,
            **only(instanceTypes=["g6e.12xlarge"], maxAccelerators=2),
        )
        assert two.chosen is not None
        assert two.chosen.tensor_parallel_size == 2
        one = plan(
            LLAMA_3_70B,
            model={"quantization": "int4-awq"},
            serving=needs,
            **only(instanceTypes=["g6e.xlarge"]),
        )
        assert one.chosen is None

    def test_bf16_on_a_t4_is_served_as_fp16(self) -> None:
        # T4 (SM 7.5) has no bf16: "Bfloat16 is only supported on GPUs with compute capability
        # of at least 8.0" (vLLM issue 1153, on g4dn.xlarge); --dtype half works.
        qwen = info_for(configs.QWEN2_5_1_5B, 1_543_714_304)
        result = plan(qwen, serving={"maxModelLen": 4096}, **only(instanceTypes=["g4dn.xlarge"]))
        assert result.chosen is not None
        assert result.chosen.dtype == "fp16"
        assert (
            result.chosen.engine_args[result.chosen.engine_args.index("--dtype") + 1] == "float16"
        )
        assert any("no bf16" in note for note in result.chosen.notes)

    def test_explicit_bf16_on_a_t4_is_rejected_with_the_reason(self) -> None:
        qwen = info_for(configs.QWEN2_5_1_5B, 1_543_714_304)
        result = plan(
            qwen,
            model={"quantization": "bf16"},
            serving={"maxModelLen": 4096},
            **only(instanceTypes=["g4dn.xlarge"]),
        )
        assert result.chosen is None
        assert "has no bf16" in result.rejected[0].reason

    def test_llama3_8b_on_one_inferentia2_chip_at_tp2(self) -> None:
        # ai-on-eks Llama-3-8B on Inferentia2: inf2.8xlarge, tensor-parallel 2 (one chip's two
        # NeuronCores), 10 sequences x 4096; it compiles and serves there (128 GiB host).
        result = plan(
            LLAMA_3_8B,
            serving={"maxModelLen": 4096, "concurrency": 10},
            **only(family="inferentia"),
        )
        chosen = result.chosen
        assert chosen is not None
        assert chosen.instance_type == "inf2.8xlarge"
        assert chosen.compile_instance_type is None  # compiles where it serves
        assert (chosen.tensor_parallel_size, chosen.accelerator_count) == (2, 1)
        assert chosen.resource_name == "aws.amazon.com/neuron"
        assert chosen.engine.device == "neuron"
        # AWS's own samples serve an 8B bf16 model on inf2.xlarge (16 GiB host) from artifacts
        # compiled elsewhere: feasible, with both steps in the plan. Without a shared compile
        # cache the operator cannot run step 1, so it ranks after the placements the operator
        # brings up alone, and its note names the setting.
        xlarge = [p for p in result.alternatives if p.instance_type == "inf2.xlarge"]
        assert xlarge and xlarge[0].compile_instance_type == "inf2.8xlarge"
        assert any("step 1: compile once on inf2.8xlarge" in n for n in xlarge[0].notes)
        assert any("step 2: serve on inf2.xlarge" in n for n in xlarge[0].notes)
        assert any("runtime.neuronCacheUri" in n for n in xlarge[0].notes)
        # Loading 16 GB of compiled model fits the 12.8 GiB a pod may take of inf2.xlarge.
        assert xlarge[0].memory_request_bytes < 12 * GIB
        pinned = plan(
            LLAMA_3_8B,
            serving={"maxModelLen": 4096, "concurrency": 10},
            **only(instanceTypes=["inf2.xlarge"]),
        )
        # Only the two-step placement fits and nothing can run step 1: refused, naming the fix.
        assert pinned.chosen is None
        assert [p.instance_type for p in pinned.alternatives] == ["inf2.xlarge"]
        assert "runtime.neuronCacheUri" in pinned.suggestions[0]
        assert "compiles once on inf2.8xlarge and serves on inf2.xlarge" in pinned.suggestions[0]
        assert not any("nothing in the catalog" in s for s in pinned.suggestions)

    def test_two_step_neuron_placement_with_a_shared_compile_cache(self) -> None:
        # With a shared compile cache the operator runs the compile Job, so the cheaper serving
        # instance wins on cost: inf2.xlarge ($0.76/h) serves what inf2.8xlarge compiles.
        result = plan(
            LLAMA_3_8B,
            compile_step=True,
            serving={"maxModelLen": 4096, "concurrency": 10},
            **only(family="inferentia"),
        )
        chosen = result.chosen
        assert chosen is not None
        assert (chosen.instance_type, chosen.compile_instance_type) == (
            "inf2.xlarge",
            "inf2.8xlarge",
        )
        assert any("step 1: compile once on inf2.8xlarge" in n for n in chosen.notes)
        assert not any("runtime.neuronCacheUri" in n for n in chosen.notes)
        costs = [p.cost_per_hour_usd or 0.0 for p in [chosen, *result.alternatives]]
        assert costs == sorted(costs)

    def test_70b_on_trainium_uses_the_32_cores_of_a_trn1_32xlarge(self) -> None:
        # ai-on-eks / Neuron tutorials serve Llama-3-70B on trn1.32xlarge at TP 32 (SN 2).
        result = plan(
            LLAMA_3_70B,
            serving={"maxModelLen": 8192, "concurrency": 4},
            **only(family="trainium", instanceTypes=["trn1.32xlarge"], tensorParallelSize=32),
        )
        assert result.chosen is not None
        assert result.chosen.tensor_parallel_size == 32
        assert result.chosen.accelerator_count == 16

    def test_neuron_ties_go_to_fewer_chips(self) -> None:
        # The whole trn1.32xlarge costs the same whether the replica uses 8 or 16 chips; NxD's
        # KV cache is static (the same tokens either way), so the plan takes fewer chips.
        result = plan(
            LLAMA_3_70B,
            serving={"maxModelLen": 8192, "concurrency": 4},
            **only(family="trainium", instanceTypes=["trn1.32xlarge"]),
        )
        assert result.chosen is not None
        assert (result.chosen.accelerator_count, result.chosen.tensor_parallel_size) == (8, 16)

    def test_405b_bf16_spans_two_h100_nodes_with_pipeline_parallel(self) -> None:
        # vLLM's distributed serving docs: Llama-3.1-405B on 2 nodes x 8 H100 with TP 8, PP 2.
        result = plan(
            LLAMA_3_1_405B, serving={"maxModelLen": 8192}, **only(instanceTypes=["p5.48xlarge"])
        )
        chosen = result.chosen
        assert chosen is not None
        assert (chosen.nodes, chosen.tensor_parallel_size, chosen.pipeline_parallel_size) == (
            2,
            8,
            2,
        )
        assert chosen.cost_per_hour_usd == pytest.approx(2 * 55.04)
        assert "--pipeline-parallel-size" in chosen.engine_args

    def test_405b_fp8_fits_one_8xh100_node(self) -> None:
        # Meta released Llama-3.1-405B-FP8 for a single 8 x H100 node; vLLM loads 57.75 GiB per
        # GPU at TP 8 (issue 6746) because the checkpoint keeps attention in bf16. With the
        # checkpoint's bytes known, the plan uses them exactly.
        fp8 = LLAMA_3_1_405B.model_copy(
            update={
                "quantization": "fp8",
                "checkpoint_bytes": int(8 * 57.75 * GIB),
                "parameters_source": "safetensors",
            }
        )
        result = plan(fp8, serving={"maxModelLen": 8192}, **only(instanceTypes=["p5.48xlarge"]))
        assert result.chosen is not None
        assert (result.chosen.nodes, result.chosen.tensor_parallel_size) == (1, 8)
        assert result.chosen.memory.weight_bytes == pytest.approx(57.75 * GIB, rel=1e-6)
        # Planned from the parameter count alone (every linear layer in fp8), it is a lower bound.
        online = plan(
            LLAMA_3_1_405B,
            model={"quantization": "fp8"},
            serving={"maxModelLen": 8192},
            **only(instanceTypes=["p5.48xlarge"]),
        )
        assert online.chosen is not None
        assert 45 * GIB < online.chosen.memory.weight_bytes < 57.75 * GIB

    def test_405b_bf16_fits_one_8xh200_node(self) -> None:
        # 405B in bf16 (~756 GiB) fits the 8 x 141 GB of a p5en.48xlarge at TP 8.
        result = plan(
            LLAMA_3_1_405B,
            serving={"maxModelLen": 8192},
            **only(family="nvidia", maxNodesPerReplica=1),
        )
        assert result.chosen is not None
        assert result.chosen.instance_type == "p5en.48xlarge"
        assert (result.chosen.nodes, result.chosen.tensor_parallel_size) == (1, 8)

    def test_405b_bf16_is_cheapest_on_trainium2(self) -> None:
        # AWS's Neuron tutorial serves Llama-3.1-405B on one trn2.48xlarge (TP 64 at LNC=2);
        # at $35.76/h it undercuts p5en's $63.30/h.
        result = plan(LLAMA_3_1_405B, serving={"maxModelLen": 8192})
        assert result.chosen is not None
        assert result.chosen.instance_type == "trn2.48xlarge"
        assert result.chosen.nodes == 1
        assert result.chosen.tensor_parallel_size <= 64


class TestPlacementRules:
    def test_tensor_parallel_must_divide_heads(self) -> None:
        # Llama-2-13B has 40 heads: TP 16 is invalid, 8 is fine (vLLM verify_with_parallel_config).
        info = info_for(configs.LLAMA_2_13B, 13_015_864_320)
        with pytest.raises(SpecError) as error:
            plan(info, **only(tensorParallelSize=16))
        assert error.value.field == "spec.accelerator.tensorParallelSize"
        assert "40 attention heads" in error.value.message
        assert plan(info, **only(tensorParallelSize=8, instanceTypes=["g6e.48xlarge"])).chosen

    def test_int4_group_size_limits_tensor_parallel(self) -> None:
        # Qwen2-VL-72B AWQ: intermediate 29568 / 2 / 128 is not whole, so TP 2/4/8 fail (SN 1.7).
        awq = info_for(configs.QWEN2_72B, 72_706_203_648).model_copy(
            update={"intermediate_size": 29568}
        )
        result = plan(
            awq, model={"quantization": "int4-awq"}, **only(instanceTypes=["g6e.12xlarge"])
        )
        reasons = [r.reason for r in result.rejected if r.accelerator_count in (2, 4)]
        assert reasons and all("group size 128" in reason for reason in reasons)

    def test_sliding_window_layers_hold_only_the_window(self) -> None:
        mistral = info_for(configs.MISTRAL_7B_V0_1, 7_241_732_096)
        full = mistral.model_copy(update={"sliding_window": None, "sliding_window_layers": 0})
        needs = {"maxModelLen": 32768}
        windowed = plan(mistral, serving=needs, **only(instanceTypes=["g6e.xlarge"]))
        unbounded = plan(full, serving=needs, **only(instanceTypes=["g6e.xlarge"]))
        assert windowed.chosen and unbounded.chosen
        assert (
            windowed.chosen.max_concurrent_sequences > 4 * unbounded.chosen.max_concurrent_sequences
        )

    def test_max_model_len_beyond_the_model_is_a_spec_error(self) -> None:
        with pytest.raises(SpecError) as error:
            plan(LLAMA_3_8B, serving={"maxModelLen": 100_000})
        assert error.value.field == "spec.serving.maxModelLen"
        assert "8192" in error.value.message

    def test_default_context_is_capped(self) -> None:
        long = info_for(configs.LLAMA_3_1_8B, 8_030_261_248)
        assert plan(long).needs.max_model_len == 8192

    def test_cost_ceiling_and_allow_list(self) -> None:
        result = plan(LLAMA_3_8B, **only(maxCostPerHour=0.9))
        assert result.chosen and result.chosen.cost_per_hour_usd is not None
        assert result.chosen.cost_per_hour_usd <= 0.9
        assert all(p.cost_per_hour_usd and p.cost_per_hour_usd <= 0.9 for p in result.alternatives)
        with pytest.raises(SpecError) as error:
            plan(LLAMA_3_8B, **only(instanceTypes=["x9.huge"]))
        assert error.value.field == "spec.accelerator.instanceTypes"

    def test_alternatives_are_ranked_by_cost(self) -> None:
        result = plan(LLAMA_3_8B, serving={"maxModelLen": 8192})
        ranked = [p for p in [result.chosen, *result.alternatives] if p and p.cost_per_hour_usd]
        # Placements that need a compile Job the operator cannot run (no shared cache) come last.
        self_contained = [p for p in ranked if p.compile_instance_type is None]
        assert ranked[: len(self_contained)] == self_contained
        costs = [p.cost_per_hour_usd for p in self_contained]
        assert costs == sorted(costs)
        assert len({(p.instance_type, p.nodes) for p in result.alternatives}) == len(
            result.alternatives
        )

    def test_nothing_fits_says_what_would(self) -> None:
        result = plan(
            LLAMA_3_70B, serving={"maxModelLen": 8192}, **only(instanceTypes=["g5.xlarge"])
        )
        assert result.chosen is None
        text = " ".join(result.suggestions)
        assert "spec.model.quantization" in text or "spec.accelerator" in text
        assert any("without the spec.accelerator limits" in s for s in result.suggestions)

    def test_embedding_models_use_the_pooling_runner(self) -> None:
        result = plan(LLAMA_3_8B, model={"task": "embed"})
        assert result.chosen
        assert (
            result.chosen.engine_args[result.chosen.engine_args.index("--runner") + 1] == "pooling"
        )

    def test_sampling_defaults_become_generation_config_overrides(self) -> None:
        result = plan(
            LLAMA_3_8B, serving={"sampling": {"temperature": 0.2, "topP": 0.9, "maxTokens": 512}}
        )
        assert result.chosen
        args = result.chosen.engine_args
        assert (
            args[args.index("--override-generation-config") + 1]
            == '{"max_new_tokens":512,"temperature":0.2,"top_p":0.9}'
        )

    def test_moe_and_mla_models_plan(self) -> None:
        mixtral = plan(
            MIXTRAL, serving={"maxModelLen": 8192, "concurrency": 4}, **only(family="nvidia")
        )
        assert mixtral.chosen and mixtral.chosen.accelerator_count >= 2
        v2_lite = info_for(configs.DEEPSEEK_V2_LITE, 15_706_484_224)
        assert plan(v2_lite, serving={"maxModelLen": 8192}).chosen

    def test_plan_json_contract(self) -> None:
        data = plan(LLAMA_3_8B).to_json_dict()
        assert set(data) >= {"model", "chosen", "alternatives", "rejected"}
        chosen = data["chosen"]
        for key in [
            "instanceType",
            "acceleratorType",
            "acceleratorCount",
            "tensorParallelSize",
            "pipelineParallelSize",
            "nodes",
            "weightBytes",
            "kvCacheBytesPerToken",
            "kvCacheTokens",
            "maxConcurrentSequences",
            "costPerHourUsd",
            "engineArgs",
        ]:
            assert key in chosen, key
        assert (
            set(data["rejected"][0]) == {"instanceType", "acceleratorCount", "reason"}
            if data["rejected"]
            else True
        )


# --- checkpoint formats ------------------------------------------------------------------------


def quantized(config: dict[str, Any], quantization_config: dict[str, Any]) -> dict[str, Any]:
    return {**config, "quantization_config": quantization_config}


QWEN3_30B_A3B_FP8 = info_for(configs.QWEN3_30B_A3B_FP8, 30_532_122_624)
GPT_OSS_120B = info_for(configs.GPT_OSS_120B, 116_829_156_672)  # openai/gpt-oss-120b card
JAMBA = info_for(configs.JAMBA_1_5_MINI, 51_570_000_000)  # ai21labs/AI21-Jamba-1.5-Mini card
# The model cards' sizes: Falcon-H1-0.5B-Instruct 0.5B, Nemotron-H-8B-Base-8K 8.1B.
FALCON_H1 = info_for(configs.FALCON_H1_0_5B_INSTRUCT, 500_000_000)
NEMOTRON_H = info_for(configs.NEMOTRON_H_8B_BASE_8K, 8_100_000_000)


class TestCheckpointFormats:
    def test_names_users_write_select_the_checkpoint_format(self) -> None:
        # Qwen/Qwen2.5-72B-Instruct-AWQ: quant_method awq, 4 bits, group 128.
        awq = info_for(configs.QWEN2_5_72B_AWQ, 72_700_000_000, checkpoint_bytes=41_600_000_000)
        for name in ("awq", "int4", "int4-awq", "w4a16", "auto"):
            fmt = served_format(awq, name)
            assert (fmt.name, fmt.group_size) == ("int4-awq", 128), name
            assert weight_bytes(awq, fmt) == 41_600_000_000  # loads as stored
        for wrong in ("gptq", "compressed-tensors", "mxfp4", "w8a8"):
            with pytest.raises(SpecError, match=r"spec\.model\.quantization.*int4-awq \(awq\)"):
                served_format(awq, wrong)
        # Planned from a parameter count alone: the alias says which kernels and bit width.
        assert served_format(LLAMA_3_70B, "gptq").name == "int4-gptq"
        assert served_format(LLAMA_3_70B, "w8a8").name == "int8"
        with pytest.raises(SpecError, match="names a checkpoint format, not a bit width"):
            served_format(LLAMA_3_70B, "compressed-tensors")

    def test_compressed_tensors_checkpoints_are_sized_by_scheme(self) -> None:
        # llm-compressor's schemes (W4A16 group 128, W8A8 int8 per channel, FP8-dynamic).
        def scheme(weights: dict[str, Any]) -> dict[str, Any]:
            return {
                "quant_method": "compressed-tensors",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
                "ignore": ["lm_head"],
            }

        w4a16 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}
        w8a8 = {"num_bits": 8, "type": "int", "strategy": "channel"}
        fp8 = {"num_bits": 8, "type": "float", "strategy": "channel"}
        sizes = {}
        for label, weights in (("w4a16", w4a16), ("w8a8", w8a8), ("fp8", fp8)):
            info = info_for(quantized(configs.LLAMA_3_1_8B, scheme(weights)), 8_030_261_248)
            assert info.quantization_method == "compressed-tensors"
            assert served_format(info, "compressed-tensors").name == info.quantization
            sizes[label] = weight_bytes(info, served_format(info, "auto"))
        # 16-bit embeddings + lm_head (1.05B params) plus 0.5 B/param (+ scales) or 1 B/param.
        embeddings = 2 * 128_256 * 4096
        body = 8_030_261_248 - embeddings
        assert sizes["w4a16"] == embeddings * 2 + math.ceil(body * (0.5 + 2.5 / 128))
        assert sizes["w8a8"] == sizes["fp8"] == embeddings * 2 + body

    def test_per_channel_int4_is_not_held_to_a_group_size(self) -> None:
        # Qwen2-72B's intermediate 29568 / 2 = 14784 is not a multiple of 128, so grouped int4
        # refuses TP 2 (SN 1.7, Qwen2.5-VL-72B AWQ); with group_size -1 (one scale per output
        # channel) vLLM's GPTQ layers take the whole input as the group and TP 2 / 4 work.
        grouped = info_for(
            quantized(configs.QWEN2_72B, {"quant_method": "gptq", "bits": 4, "group_size": 128}),
            72_700_000_000,
        )
        per_channel = info_for(
            quantized(configs.QWEN2_72B, {"quant_method": "gptq", "bits": 4, "group_size": -1}),
            72_700_000_000,
        )
        assert per_channel.quantization_group_size == -1
        for tp in (2, 4):
            with pytest.raises(SpecError, match="quantization group size 128"):
                plan(grouped, **only(tensorParallelSize=tp))
            result = plan(per_channel, **only(tensorParallelSize=tp))
            assert result.chosen is not None and result.chosen.tensor_parallel_size == tp
        # Per-channel scales cost ~nothing: 0.5 B/param plus 16-bit embeddings.
        fmt = served_format(per_channel, "auto")
        assert weight_bytes(per_channel, fmt) < weight_bytes(
            grouped, served_format(grouped, "gptq")
        )

    def test_block_fp8_tensor_parallel_must_keep_whole_blocks(self) -> None:
        # Qwen/Qwen3-30B-A3B-FP8: weight_block_size [128, 128], moe_intermediate_size 768.
        # TP 8 leaves 96 per GPU and vLLM refuses to start (fp8_utils.py
        # validate_fp8_block_shape_moe); TP 4 leaves 192 (vllm-project/recipes Qwen3 FP8 notes).
        assert QWEN3_30B_A3B_FP8.quantization_block_size == [128, 128]
        with pytest.raises(SpecError) as error:
            plan(QWEN3_30B_A3B_FP8, **only(tensorParallelSize=8))
        message = str(error.value)
        assert "moe_intermediate_size 768 into 96 per GPU" in message
        assert "use one of 1, 2," in message
        assert "--enable-expert-parallel" in message
        result = plan(QWEN3_30B_A3B_FP8, **only(instanceTypes=["p5.48xlarge"]))
        assert result.chosen is not None and result.chosen.tensor_parallel_size in (1, 2)
        # With expert parallelism the experts are not split: TP 8 is accepted.
        expert_parallel = plan(
            QWEN3_30B_A3B_FP8,
            serving={"engineArgs": ["--enable-expert-parallel"]},
            **only(tensorParallelSize=8, instanceTypes=["p5.48xlarge"]),
        )
        assert expert_parallel.chosen is not None
        assert expert_parallel.chosen.tensor_parallel_size == 8
        reasons = {r.accelerator_count: r.reason for r in result.rejected}
        assert "into 192 per GPU" in reasons[4] and "into 96 per GPU" in reasons[8]
        # The block scales: one fp32 per 128 x 128 weights on top of one byte per weight.
        fmt = served_format(QWEN3_30B_A3B_FP8, "auto")
        assert fmt.block_size == (128, 128)
        embeddings = 2 * 151_936 * 2048
        body = 30_532_122_624 - embeddings
        assert weight_bytes(QWEN3_30B_A3B_FP8, fmt) == embeddings * 2 + math.ceil(
            body * (1 + 4 / (128 * 128))
        )

    def test_gpt_oss_mxfp4_fits_one_80gb_gpu(self) -> None:
        # OpenAI's gpt-oss model card: MXFP4 experts, attention and embeddings in bf16; "the
        # 120b model fits into a single 80GB GPU" (the published checkpoint is about 65 GB).
        assert (GPT_OSS_120B.quantization, GPT_OSS_120B.quantization_method) == ("mxfp4", "mxfp4")
        fmt = served_format(GPT_OSS_120B, "mxfp4")
        assert 60e9 < weight_bytes(GPT_OSS_120B, fmt) < 67e9
        result = plan(
            GPT_OSS_120B, serving={"maxModelLen": 8192}, **only(instanceTypes=["p5.4xlarge"])
        )
        assert result.chosen is not None and result.chosen.tensor_parallel_size == 1
        # MXFP4 has no kernels before Ampere, and vLLM on Neuron does not serve it.
        everywhere = plan(GPT_OSS_120B, serving={"maxModelLen": 8192})
        t4 = [r for r in everywhere.rejected if r.instance_type.startswith("g4dn")]
        assert t4 and all("MXFP4 weights need SM 8.0" in r.reason for r in t4)
        assert all(p.accelerator_vendor == "nvidia" for p in everywhere.alternatives)


# --- per-layer caches --------------------------------------------------------------------------


class TestPerLayerCaches:
    def test_hybrid_mamba_layers_hold_state_per_sequence_not_per_token(self) -> None:
        # AI21-Jamba-1.5-Mini: 4 attention layers in 32 (the rest Mamba: vLLM MambaSpec, one
        # state per sequence; tests/integration/test_kv_oracle_vllm.py checks both sizes).
        assert JAMBA.layer_kinds().count("full_attention") == 4
        result = plan(
            JAMBA, serving={"maxModelLen": 65536, "concurrency": 4}, **only(family="nvidia")
        )
        chosen = result.chosen
        assert chosen is not None
        per_layer = kv_bytes_per_token_per_layer(JAMBA, chosen.tensor_parallel_size, 2)
        layers_per_stage = math.ceil(32 / chosen.pipeline_parallel_size)
        assert chosen.kv_cache_bytes_per_token < layers_per_stage * per_layer / 4
        state = recurrent_state_bytes_per_layer(JAMBA, 1, 2, 2)
        assert state == (3 * 8192 + 8192 * 16) * 2  # conv (d_conv - 1) x inner + inner x d_state

    def test_falcon_h1_layers_pay_tokens_and_state_slots_in_every_layer(self) -> None:
        # Falcon-H1-0.5B: 36 layers, each with attention (2 KV heads x 64, bf16: 512 bytes a
        # token) and a Mamba2 state. vLLM pages both on one size: the attention block grows to
        # 16 x ceil(state / (16 x 512)) tokens and each state slot is padded to that page; a
        # Mamba2 layer holds three slots per sequence (two, plus the prefill checkpoint).
        # tests/integration/test_kv_oracle_vllm.py checks the sizes and slots against vLLM.
        length = 16384
        result = plan(
            FALCON_H1, serving={"maxModelLen": length}, **only(instanceTypes=["g6.xlarge"])
        )
        chosen = result.chosen
        assert chosen is not None and chosen.tensor_parallel_size == 1
        per_token = 2 * 2 * 64 * 2
        state = (3 * (1536 + 2 * 128) + 24 * 64 * 128) * 2
        assert recurrent_state_bytes_per_layer(FALCON_H1, 1, 2, 2) == state
        block, slot = hybrid_page_layout(per_token, state)
        assert (block, slot) == (800, 800 * per_token)
        assert chosen.kv_cache_bytes_per_token == 36 * per_token
        per_sequence = 36 * per_token * (-(-length // block) * block) + (36 * 3 * slot)
        kv_bytes = chosen.memory.kv_cache_bytes
        assert chosen.max_concurrent_sequences == kv_bytes // per_sequence
        assert chosen.kv_cache_tokens == kv_bytes * length // per_sequence
        # The states cost real room: attention alone would hold more tokens.
        attention_only = kv_bytes // (36 * per_token)
        assert chosen.kv_cache_tokens < attention_only

    def test_nemotron_h_sizes_only_the_pattern_s_attention_and_mamba_layers(self) -> None:
        # Nemotron-H-8B: 4 attention layers (8 KV heads x 128, bf16: 4 KiB a token), 24 Mamba2
        # layers whose SSM state vLLM keeps in float32, 24 MLP layers that cache nothing.
        length = 8192
        result = plan(
            NEMOTRON_H,
            serving={"maxModelLen": length, "concurrency": 8},
            **only(instanceTypes=["g6e.xlarge"]),
        )
        chosen = result.chosen
        assert chosen is not None and chosen.tensor_parallel_size == 1
        per_token = 2 * 8 * 128 * 2
        state = 3 * (128 * 64 + 2 * 8 * 128) * 2 + 128 * 64 * 128 * 4  # conv bf16, SSM fp32
        assert recurrent_state_bytes_per_layer(NEMOTRON_H, 1, 2, 4) == state
        assert chosen.kv_cache_bytes_per_token == 4 * per_token
        block, slot = hybrid_page_layout(per_token, state)
        per_sequence = 4 * per_token * (-(-length // block) * block) + (24 * 3 * slot)
        kv_bytes = chosen.memory.kv_cache_bytes
        assert chosen.max_concurrent_sequences == kv_bytes // per_sequence
        assert chosen.kv_cache_tokens == kv_bytes * length // per_sequence

    def test_gpt_oss_alternates_sliding_and_full_attention(self) -> None:
        # gpt-oss layer_types: sliding_attention (128 tokens) and full_attention, alternating.
        kinds = GPT_OSS_120B.layer_kinds()
        assert kinds[:4] == ["sliding_attention", "full_attention"] * 2
        assert (GPT_OSS_120B.sliding_window, kinds.count("sliding_attention")) == (128, 18)

    def test_sliding_layers_shrink_what_a_sequence_holds(self) -> None:
        # Gemma 3 1B: 5 of every 6 layers see 512 tokens (sliding_window_pattern 6).
        gemma = info_for(configs.GEMMA_3_1B, 999_885_952)
        assert gemma.layer_kinds()[:6] == ["sliding_attention"] * 5 + ["full_attention"]
        long = plan(gemma, serving={"maxModelLen": 32768}, **only(instanceTypes=["g6.xlarge"]))
        assert long.chosen is not None
        full_only = gemma.model_copy(update={"layer_types": [], "sliding_window": None})
        baseline = plan(
            full_only, serving={"maxModelLen": 32768}, **only(instanceTypes=["g6.xlarge"])
        )
        assert baseline.chosen is not None
        assert long.chosen.max_concurrent_sequences > 3 * baseline.chosen.max_concurrent_sequences


# --- placements ----------------------------------------------------------------------------------


class TestPlacements:
    def test_pipeline_stages_hold_whole_layers_as_vllm_splits_them(self) -> None:
        # vllm/distributed/utils.py get_pp_indices: the remainder goes to the stages before the
        # last, the middle ones first (80 layers over 3 stages: 27, 27, 26; 126 over 4: 31, 32,
        # 32, 31, which keeps the embedding and lm_head stages light).
        assert [len(stage) for stage in pipeline_stages(80, 3)] == [27, 27, 26]
        assert [len(stage) for stage in pipeline_stages(126, 4)] == [31, 32, 32, 31]

    def test_the_heaviest_stage_decides(self) -> None:
        # 70B bf16, 8 sequences of 8k over g6.12xlarge nodes (TP 4): two nodes lack KV room, three
        # do. The first stage holds 27 layers and the embedding, more than a third of the
        # weights; its KV room (27 layers per token) is what vLLM allocates on every stage.
        result = plan(
            LLAMA_3_70B,
            serving={"maxModelLen": 8192, "concurrency": 8},
            **only(instanceTypes=["g6.12xlarge"]),
        )
        chosen = result.chosen
        assert chosen is not None
        assert (chosen.nodes, chosen.pipeline_parallel_size) == (3, 3)
        total = weight_bytes(LLAMA_3_70B, served_format(LLAMA_3_70B, "auto"))
        embedding = 128_256 * 8192 * 2
        body_per_layer = (total - 2 * embedding) / 80
        assert chosen.memory.weight_bytes == math.ceil((27 * body_per_layer + embedding) / 4)
        assert chosen.memory.weight_bytes > total / 12
        assert chosen.kv_cache_bytes_per_token == 27 * kv_bytes_per_token_per_layer(
            LLAMA_3_70B, 4, 2
        )
        two = [r for r in result.rejected if r.instance_type == "2 x g6.12xlarge"]
        assert two and "concurrency 8 needs more" in two[0].reason

    def test_spread_placements_are_ranked_with_the_rest(self) -> None:
        # 70B bf16 at 8k: 2 x g6.12xlarge (TP 4 x PP 2, $9.20/h) is cheaper than one
        # g6e.12xlarge ($10.49/h); the plan says what the spread costs.
        result = plan(LLAMA_3_70B, serving={"maxModelLen": 8192})
        chosen = result.chosen
        assert chosen is not None
        assert (chosen.instance_type, chosen.nodes) == ("g6.12xlarge", 2)
        assert (chosen.tensor_parallel_size, chosen.pipeline_parallel_size) == (4, 2)
        assert chosen.efa_interfaces == 1
        assert any("vpc.amazonaws.com/efa" in n and "node loss" in n for n in chosen.notes)
        single = [p for p in result.alternatives if p.instance_type == "g6e.12xlarge"]
        assert single and single[0].nodes == 1 and single[0].efa_interfaces == 0
        assert chosen.cost_per_hour_usd is not None
        assert chosen.cost_per_hour_usd < (single[0].cost_per_hour_usd or 0)
        one_node = plan(LLAMA_3_70B, serving={"maxModelLen": 8192}, **only(maxNodesPerReplica=1))
        assert one_node.chosen is not None and one_node.chosen.instance_type == "g6e.12xlarge"
        assert all(p.nodes == 1 for p in one_node.alternatives)

    def test_405b_on_four_trainium_nodes_at_tp128(self) -> None:
        # AWS NxD Inference docs: Llama-3.1-405B bf16 at TP 128 over 4 x trn1.32xlarge (32
        # NeuronCores each), multi-node over EFA (trn1.32xlarge: 8 EFA devices).
        result = plan(
            LLAMA_3_1_405B, serving={"maxModelLen": 8192}, **only(instanceTypes=["trn1.32xlarge"])
        )
        chosen = result.chosen
        assert chosen is not None
        assert (chosen.nodes, chosen.tensor_parallel_size, chosen.pipeline_parallel_size) == (
            4,
            128,
            1,
        )
        assert (chosen.accelerators_per_node, chosen.accelerator_count) == (16, 64)
        assert chosen.efa_interfaces == 8
        assert chosen.cost_per_hour_usd == 4 * 21.5
        assert chosen.engine_args[:2] == ["--tensor-parallel-size", "128"]

    def test_neuron_is_never_offered_for_what_it_cannot_serve(self) -> None:
        # NxD Inference vLLM user guide: no pooling / embedding models, and a listed set of
        # architectures (catalog neuronSupport).
        qwen = info_for(configs.QWEN2_5_1_5B, 1_543_714_304)
        embed = plan(qwen, model={"task": "embed"})
        assert embed.chosen is not None
        offered = [embed.chosen, *embed.alternatives]
        assert all(p.accelerator_vendor == "nvidia" for p in offered)
        inf2 = [r for r in embed.rejected if r.instance_type == "inf2.xlarge"]
        assert inf2 and "no pooling or embedding models" in inf2[0].reason
        assert plan(qwen).chosen is not None  # generation on Qwen2 is supported
        mixtral = plan(MIXTRAL, serving={"maxModelLen": 8192})
        trn = [r for r in mixtral.rejected if r.instance_type == "trn1.32xlarge"]
        assert trn and "does not serve MixtralForCausalLM" in trn[0].reason
