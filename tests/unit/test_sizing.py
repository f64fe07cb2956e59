"""The sizing engine against published deployments and vLLM's own memory accounting.

Each real-world case names where the fact comes from; the config.json shapes are the published
ones (tests/unit/configs.py). Sizing facts and their citations are gathered in
shared/reference/sizing-notes.md (SN below, with its section).
"""

from __future__ import annotations

from typing import Any

import pytest
from modelship.operator.api import SpecError, load_spec
from modelship.operator.catalog import GIB, load_catalog
from modelship.operator.modelinfo import model_info_from_config
from modelship.operator.plan import ModelInfo, Plan
from modelship.operator.sizing import (
    BLOCK_SIZE,
    kv_bytes_per_token_per_layer,
    make_plan,
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


def plan(info: ModelInfo, **spec: Any) -> Plan:
    body: dict[str, Any] = {"model": {"uri": "s3://models/m", **spec.pop("model", {})}}
    body.update(spec)
    return make_plan(info, load_spec(body), CATALOG)


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
        # ai-on-eks Llama-3-8B on Inferentia2: tensor-parallel 2 (one chip's two NeuronCores),
        # 10 sequences x 4096. The blueprint compiles and serves on inf2.8xlarge (128 GiB host);
        # AWS's own samples serve an 8B bf16 model on inf2.xlarge (16 GiB host) from artifacts
        # compiled elsewhere, so the plan serves on inf2.xlarge and compiles once on inf2.8xlarge.
        result = plan(
            LLAMA_3_8B,
            serving={"maxModelLen": 4096, "concurrency": 10},
            **only(family="inferentia"),
        )
        chosen = result.chosen
        assert chosen is not None
        assert chosen.instance_type == "inf2.xlarge"
        assert chosen.compile_instance_type == "inf2.8xlarge"
        assert any("step 1: compile once on inf2.8xlarge" in note for note in chosen.notes)
        assert (chosen.tensor_parallel_size, chosen.accelerator_count) == (2, 1)
        assert chosen.resource_name == "aws.amazon.com/neuron"
        assert chosen.engine.device == "neuron"
        # Loading 16 GB of compiled model fits the 12.8 GiB a pod may take of inf2.xlarge.
        assert chosen.memory_request_bytes < 12 * GIB
        eight = [p for p in result.alternatives if p.instance_type == "inf2.8xlarge"]
        assert eight and eight[0].compile_instance_type is None  # compiles where it serves
        # blueprint: "21.3GB accelerator memory" for this setup: 15 GiB weights + 5 GiB KV
        per_core = chosen.memory
        assert (
            9.5 * GIB
            < per_core.weight_bytes + per_core.kv_cache_bytes + per_core.runtime_overhead_bytes
            < 11.5 * GIB
        )

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
        costs = [
            p.cost_per_hour_usd
            for p in [result.chosen, *result.alternatives]
            if p and p.cost_per_hour_usd
        ]
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
