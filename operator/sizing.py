"""The sizing engine: `make_plan(ModelInfo, spec, Catalog) -> Plan`, a pure function.

It computes, the way vLLM does, the memory one replica needs — weights for the served format
(AWQ, GPTQ, compressed-tensors, block FP8, MXFP4 with their group and block sizes), activation
peak, runtime overhead, CUDA graphs, and the cache each layer keeps for the requested context
length and concurrency (K/V per token for full and sliding attention, a state per sequence for
Mamba and linear attention) on the heaviest pipeline stage — then enumerates placements over the
catalog (instance type x accelerator count x tensor-parallel degree, and spread placements over
several EFA nodes), rejects each infeasible one with a reason, and ranks the rest by cost. docs/sizing.md explains the model with a
worked example; every constant below names its source (shared/reference/sizing-notes.md gathers
them with citations).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator
from dataclasses import dataclass

from .api import ModelDeploymentSpec, SpecError
from .catalog import AMI_TYPES, GIB, RESOURCE_NAMES, Accelerator, Catalog, InstanceType
from .engine import EngineArgs
from .plan import (
    FULL_ATTENTION_KINDS,
    STATE_KINDS,
    MemoryBreakdown,
    ModelInfo,
    Needs,
    Placement,
    Plan,
    Rejection,
)
from .vllm_options import user_enforce_eager

MIB = 1 << 20

# vLLM's CacheConfig.DEFAULT_BLOCK_SIZE: the KV cache is allocated in blocks of 16 tokens.
BLOCK_SIZE = 16
# Default context when spec.serving.maxModelLen is omitted: the model's own limit, capped here so
# that a 128k-context model does not silently reserve 16x the KV cache a user expects.
DEFAULT_MAX_MODEL_LEN_CAP = 8192
# vLLM's default max_num_seqs on GPUs; the plan sets it explicitly (never less than concurrency).
DEFAULT_MAX_NUM_SEQS = 256
# vLLM V1 chunks prefills into batches of max_num_batched_tokens; its default for the OpenAI
# server is 8192 on GPUs with >= 70 GiB and 2048 below (vllm/engine/arg_utils.py). The plan sets
# it explicitly so the activation peak it budgets is the one vLLM profiles.
BATCHED_TOKENS_LARGE_GPU = 8192
BATCHED_TOKENS_SMALL_GPU = 2048
LARGE_GPU_BYTES = 70 * GIB
# Non-torch memory (CUDA context, cuBLAS/attention workspaces; NCCL buffers once TP > 1):
# 0.3-0.5 GiB at TP=1 and about 1 GiB with TP in vLLM's memory-profiling logs (sizing-notes 1.8).
NON_TORCH_BYTES_SINGLE = 512 * MIB
NON_TORCH_BYTES_PARALLEL = 1 * GIB
# CUDA graphs: 0.36-1.3 GiB per GPU in vLLM logs for dense models; vLLM >= 0.21 reserves the
# estimate before sizing the KV cache (sizing-notes 1.4). None with --enforce-eager.
CUDA_GRAPH_BYTES = 1 * GIB
# Activation peak heuristic, calibrated on vLLM issue 10517's Llama-3-8B log (sizing-notes 1.3):
# max_num_batched_tokens x (3 x intermediate/TP + 4 x hidden) x 2 bytes, plus fp32 logits for
# every scheduled sequence (max_num_seqs x vocab x 4 bytes).
ACTIVATION_ELEMENT_BYTES = 2
LOGIT_BYTES = 4
# Neuron runtime and scratchpad per NeuronCore: the ai-on-eks Llama-3-8B inf2 blueprint reports
# 21.3 GB for 15 GiB of weights + 5 GiB of KV at TP2, about 0.65 GiB per core; rounded up.
NEURON_RUNTIME_BYTES_PER_CORE = 1 * GIB
# Host memory: the pod's share of the node, less what the kubelet, system daemons and the
# device plugins keep (EKS reserves ~1-2 GiB on small nodes): request at most 80% of it.
HOST_MEMORY_FRACTION = 0.8
# GPU pods: Python, tokenizer workers and pinned buffers, plus a slice of the weights that the
# safetensors loader maps through host memory while loading.
GPU_HOST_MEMORY_BASE = 8 * GIB
GPU_HOST_MEMORY_WEIGHT_FRACTION = 0.25
# Neuron: compiling stages the whole model in host memory (the blueprints compile 8B models on
# inf2.8xlarge); loading precompiled artifacts needs far less: AWS's own samples serve an 8B
# bf16 model on inf2.xlarge (16 GiB host) from NEURON_COMPILED_ARTIFACTS. The loading share is
# the GPU loader's (the same memory-mapped safetensors shards in flight).
NEURON_HOST_MEMORY_BASE = 4 * GIB
NEURON_HOST_MEMORY_WEIGHT_FACTOR = 1.1
NEURON_LOAD_WEIGHT_FRACTION = 0.25
# Local disk: the downloaded weights plus room for logs, torch.compile and Neuron caches.
EPHEMERAL_BASE_BYTES = 10 * GIB
EPHEMERAL_WEIGHT_FACTOR = 1.1
# Time to ready (for probes): a conservative in-region S3 pull rate for one pod, load rate from
# local NVMe into device memory, engine start-up (profiling, CUDA graphs), Neuron compilation
# (~15 min for a 15 GB model, sizing-notes section 2) when its cache is cold.
FETCH_BYTES_PER_SECOND = 250 * MIB
LOAD_BYTES_PER_SECOND = 1 * GIB
ENGINE_START_SECONDS = 120
NEURON_COMPILE_SECONDS_PER_GIB = 60
# What to set so that the operator can run a two-step Neuron placement (plan notes, suggestions).
COMPILE_CACHE_SETTING = (
    "set the chart's runtime.neuronCacheUri (MODELSHIP_NEURON_CACHE_URI) to an s3:// prefix the "
    "runtime's service account may read and write"
)
# Grouped int4 (AWQ/GPTQ): an fp16 scale and a packed 4-bit zero per group, and the embeddings
# and lm_head kept in 16 bits (sizing-notes 1.2: "about 3% at group size 128"). The group size is
# the checkpoint's (quantization_config.group_size; -1 is one scale per output channel); 128 is
# what a plan from a parameter count assumes, the common AWQ/GPTQ default.
DEFAULT_INT4_GROUP_SIZE = 128
SCALE_AND_ZERO_BYTES_INT4 = 2 + 0.5
SCALE_AND_ZERO_BYTES_INT8 = 2 + 1
# Block FP8 keeps one fp32 scale (weight_scale_inv) per block_n x block_k weights.
FP8_BLOCK_SCALE_BYTES = 4
# MXFP4 (gpt-oss): 4-bit values plus one E8M0 byte per 32 (OCP Microscaling spec).
MXFP4_BYTES_PER_PARAM = 0.5 + 1 / 32
# Most nodes one replica may span by default (spec.accelerator.maxNodesPerReplica). Four is what
# AWS documents for the largest single-model deployment it publishes (Llama-3.1-405B at TP128 over
# 4 x trn1.32xlarge, NxD Inference docs); beyond that each extra node is one more failure point
# and pipeline bubble for little gain.
DEFAULT_MAX_NODES_PER_REPLICA = 4
EFA_RESOURCE = "vpc.amazonaws.com/efa"
# vLLM keeps two state slots per sequence in every Mamba / linear-attention layer with prefix
# caching on, its default (MambaSpec.max_memory_usage_bytes, mamba_cache_mode "align"); Mamba2
# mixers (MambaMixer2.get_kv_cache_spec: num_prefill_checkpoint_blocks=1) reserve a third for
# the prefill checkpoint. The vLLM oracle test measures both
# (tests/integration/test_kv_oracle_vllm.py).
RECURRENT_STATE_SLOTS = 2
MAMBA2_STATE_SLOTS = 3

BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "fp8": 8, "int8": 8, "int8-gptq": 8, "int4": 4}
BITS.update({"int4-awq": 4, "int4-gptq": 4, "mxfp4": 4})
# Spec names that say "whatever the checkpoint is, as long as it is this kind" (spec value ->
# checkpoint formats it accepts, and the format assumed when planning from a parameter count).
SPEC_ALIASES: dict[str, tuple[tuple[str, ...], str | None]] = {
    "awq": (("int4-awq",), "int4-awq"),
    "gptq": (("int4-gptq", "int8-gptq"), "int4-gptq"),
    "w4a16": (("int4-awq", "int4-gptq"), "int4-gptq"),
    "w8a8": (("int8", "fp8"), "int8"),
    "compressed-tensors": (("fp8", "int8", "int4-gptq"), None),
    "mxfp4": (("mxfp4",), "mxfp4"),
}
# The quant_method a spec name insists on (awq means an AWQ checkpoint, not any int4).
SPEC_METHODS = {"awq": "awq", "gptq": "gptq", "compressed-tensors": "compressed-tensors"}
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class ServedFormat:
    """How the weights are held on the accelerator."""

    name: str  # fp32 | fp16 | bf16 | fp8 | int8 | int8-gptq | int4 | int4-awq | int4-gptq | mxfp4
    dtype: str  # the activation dtype: fp32 | fp16 | bf16
    online_quantization: str | None  # "fp8" when vLLM quantizes a 16-bit checkpoint on load
    explicit_dtype: bool  # the user asked for this exact dtype (no silent fp16 on a T4)
    group_size: int | None = None  # weights per scale group (-1: per channel); None: unknown
    block_size: tuple[int, int] | None = None  # block FP8 (block_n, block_k)

    @property
    def quantized(self) -> bool:
        return self.name not in TORCH_DTYPES


def _matches(checkpoint: str, wanted: str) -> bool:
    return checkpoint == wanted or checkpoint.startswith(wanted + "-")


def _checkpoint_format(info: ModelInfo, base: str) -> ServedFormat:
    """The checkpoint's own format, with its group and block sizes."""
    checkpoint = info.quantization if info.quantization != "none" else info.dtype
    block = info.quantization_block_size
    return ServedFormat(
        checkpoint,
        base,
        None,
        explicit_dtype=False,
        group_size=info.quantization_group_size,
        block_size=(block[0], block[1]) if block else None,
    )


def served_format(info: ModelInfo, quantization: str) -> ServedFormat:
    """The weight format to serve, from spec.model.quantization and what the checkpoint is."""
    field = "spec.model.quantization"
    base = info.dtype if info.dtype in TORCH_DTYPES else "bf16"
    checkpoint = info.quantization if info.quantization != "none" else info.dtype
    hypothetical = info.checkpoint_bytes is None  # planned from a parameter count, no weights read
    if quantization == "auto":
        return _checkpoint_format(info, base)
    if quantization in TORCH_DTYPES:
        if info.quantization != "none":
            raise SpecError(
                field,
                f"{quantization} asks to serve 16/32-bit weights but the checkpoint is "
                f"{info.quantization}; use auto (or {info.quantization}), or point "
                "spec.model.uri at an unquantized checkpoint.",
            )
        return ServedFormat(quantization, quantization, None, explicit_dtype=True)
    if quantization in SPEC_ALIASES:
        accepted, assumed = SPEC_ALIASES[quantization]
        method = SPEC_METHODS.get(quantization)
        if info.quantization in accepted and (method is None or info.quantization_method == method):
            return _checkpoint_format(info, base)
        if info.quantization == "none" and hypothetical and assumed is not None:
            dtype = "bf16" if assumed == "mxfp4" else "fp16"
            return ServedFormat(assumed, dtype, None, explicit_dtype=False)
        if info.quantization == "none" and hypothetical:
            raise SpecError(
                field,
                f"{quantization} names a checkpoint format, not a bit width, and no checkpoint "
                "was read; say w4a16, w8a8, int8 or fp8, or point spec.model.uri at the "
                "checkpoint.",
            )
    elif quantization == "fp8":
        if info.quantization == "fp8":
            return _checkpoint_format(info, base)
        if info.quantization == "none":
            return ServedFormat("fp8", base, None if hypothetical else "fp8", explicit_dtype=False)
    elif _matches(info.quantization, quantization):
        return _checkpoint_format(info, base)
    elif info.quantization == "none" and hypothetical:
        return ServedFormat(quantization, "fp16", None, explicit_dtype=False)
    described = checkpoint + (
        f" ({info.quantization_method})"
        if info.quantization_method and info.quantization_method != checkpoint
        else ""
    )
    raise SpecError(
        field,
        f"the checkpoint is {described} and vLLM cannot convert it to {quantization} on load; "
        f"point spec.model.uri at a {quantization} checkpoint, or use auto"
        + (" or fp8 (quantized on load)." if info.quantization == "none" else "."),
    )


def _attention_parameters(info: ModelInfo) -> int:
    """q, k, v and o projections of every attention layer (MLA counted as the dense form)."""
    attention_layers = sum(
        1
        for kind in info.layer_kinds()
        if kind in FULL_ATTENTION_KINDS or kind == "sliding_attention"
    )
    per_layer = (
        info.hidden_size
        * info.head_dim
        * (2 * info.num_attention_heads + 2 * info.num_key_value_heads)
    )
    return attention_layers * per_layer


def _unquantized_parameters(info: ModelInfo, fmt: ServedFormat) -> int:
    """Parameters a quantized checkpoint keeps in 16 bits: the embeddings and lm_head, plus the
    modules its ignore / modules_to_not_convert list names (gpt-oss: attention)."""
    embeddings = min(info.embedding_parameters, info.parameters)
    modules = info.unquantized_modules if info.quantization == fmt.name else []
    keeps_attention = any("attn" in module for module in modules) or (
        fmt.name == "mxfp4" and not modules  # gpt-oss's published checkpoints keep attention
    )
    attention = _attention_parameters(info) if keeps_attention else 0
    return min(embeddings + attention, info.parameters)


def _bytes_per_quantized_parameter(info: ModelInfo, fmt: ServedFormat) -> float:
    if fmt.name == "mxfp4":
        return MXFP4_BYTES_PER_PARAM
    group = fmt.group_size or DEFAULT_INT4_GROUP_SIZE
    if group == -1:
        group = info.hidden_size  # one scale per output channel of a hidden-wide input
    if BITS[fmt.name] == 4:
        return 0.5 + SCALE_AND_ZERO_BYTES_INT4 / group
    if fmt.name == "int8-gptq":
        return 1 + SCALE_AND_ZERO_BYTES_INT8 / group
    if fmt.block_size:
        return 1 + FP8_BLOCK_SCALE_BYTES / (fmt.block_size[0] * fmt.block_size[1])
    return 1.0  # fp8 / int8 per tensor or per channel: scales are negligible


def weight_bytes(info: ModelInfo, fmt: ServedFormat) -> int:
    """Bytes of weights on the accelerators, whole model, as vLLM loads them.

    A checkpoint already in the served format loads as stored (the safetensors headers' sum:
    packed int4, MXFP4 blocks, FP8 with its scales). Otherwise the bytes follow from the
    parameter count: quantized formats keep embeddings, lm_head and the checkpoint's ignored
    modules in 16 bits and pay for their scales (group size, block size) on the rest.
    """
    checkpoint = info.quantization if info.quantization != "none" else info.dtype
    if info.checkpoint_bytes is not None and fmt.name == checkpoint:
        return info.checkpoint_bytes  # exact: what the safetensors headers say
    if info.checkpoint_bytes is not None and not fmt.quantized and info.quantization == "none":
        return info.checkpoint_bytes * BITS[fmt.name] // BITS[info.dtype]  # a cast on load
    if fmt.name in TORCH_DTYPES:
        return info.parameters * BITS[fmt.name] // 8
    unquantized = _unquantized_parameters(info, fmt)
    body = info.parameters - unquantized
    return unquantized * BITS[fmt.dtype] // 8 + math.ceil(
        body * _bytes_per_quantized_parameter(info, fmt)
    )


def kv_dtype_bytes(kv_cache_dtype: str, fmt: ServedFormat) -> int:
    if kv_cache_dtype.startswith("fp8"):
        return 1
    return BITS[fmt.dtype] // 8


def kv_bytes_per_token_per_layer(
    info: ModelInfo, tensor_parallel_size: int, element_bytes: int
) -> int:
    """K and V of one token in one attention layer on one worker (vllm/v1/kv_cache_interface.py)."""
    if info.uses_mla:
        # MLA caches one latent vector (kv_lora_rank + rope dims) per token, replicated over TP.
        return (int(info.kv_lora_rank or 0) + int(info.qk_rope_head_dim or 0)) * element_bytes
    # KV heads are split over TP, and replicated once TP exceeds them (get_num_kv_heads).
    kv_heads_per_worker = max(1, info.num_key_value_heads // tensor_parallel_size)
    return 2 * kv_heads_per_worker * info.head_dim * element_bytes


def recurrent_state_bytes_per_layer(
    info: ModelInfo, tensor_parallel_size: int, conv_bytes: int, ssm_bytes: int
) -> int:
    """One sequence's state in one Mamba / linear-attention layer on one worker (vLLM's MambaSpec
    page: the convolution state plus the SSM state, both split over TP)."""
    return (
        info.recurrent_conv_elements * conv_bytes + info.recurrent_ssm_elements * ssm_bytes
    ) // tensor_parallel_size


def recurrent_state_slots(info: ModelInfo) -> int:
    """State slots one sequence holds in each Mamba / linear-attention layer (see above)."""
    return MAMBA2_STATE_SLOTS if info.recurrent_mixer == "mamba2" else RECURRENT_STATE_SLOTS


def pipeline_stages(num_layers: int, pipeline_parallel_size: int) -> list[range]:
    """The layers of each pipeline stage, as vLLM splits them (distributed/utils.py
    get_pp_indices): equal shares, the remainder on the stages before the last."""
    sizes = [num_layers // pipeline_parallel_size] * pipeline_parallel_size
    for index in range(2, num_layers % pipeline_parallel_size + 2):
        sizes[-index] += 1
    stages, start = [], 0
    for size in sizes:
        stages.append(range(start, start + size))
        start += size
    return stages


@dataclass(frozen=True)
class _Stage:
    """What one pipeline stage holds on each of its workers."""

    weight_bytes: int
    full_layers: int
    sliding_layers: int
    recurrent_layers: int


def _stages(info: ModelInfo, fmt: ServedFormat, weights: int, tp: int, pp: int) -> list[_Stage]:
    """Per-stage weights per worker and cache layers by kind. Stages hold whole layers; the
    first adds the embedding, the last the lm_head (its own copy when tied, as vLLM's PP does);
    vocab-parallel embedding and lm_head split over TP like the rest."""
    kinds = info.layer_kinds()
    bits = BITS[fmt.dtype] if fmt.quantized else BITS[fmt.name]  # quantized keep them 16-bit
    embedding = min(
        info.vocab_size * info.hidden_size * bits // 8,
        weights if info.tie_word_embeddings else weights // 2,
    )
    untied_head = 0 if info.tie_word_embeddings else embedding
    per_layer = max(weights - embedding - untied_head, 0) / info.num_layers
    head = embedding if (pp > 1 or not info.tie_word_embeddings) else 0
    stages = []
    for index, layers in enumerate(pipeline_stages(info.num_layers, pp)):
        stage_weights = per_layer * len(layers)
        if index == 0:
            stage_weights += embedding
        if index == pp - 1:
            stage_weights += head
        stage_kinds = [kinds[i] for i in layers]
        stages.append(
            _Stage(
                weight_bytes=math.ceil(stage_weights / tp),
                # A Falcon-H1 layer (attention_mamba) holds both K/V and a state.
                full_layers=sum(kind in FULL_ATTENTION_KINDS for kind in stage_kinds),
                sliding_layers=stage_kinds.count("sliding_attention"),
                recurrent_layers=sum(kind in STATE_KINDS for kind in stage_kinds),
            )
        )
    return stages


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class Request:
    """Everything make_plan needs besides the model and the catalog."""

    max_model_len: int
    concurrency: int
    kv_cache_dtype: str
    gpu_memory_utilization: float
    fmt: ServedFormat
    weight_bytes: int
    enforce_eager: bool
    spec: ModelDeploymentSpec
    expert_parallel: bool = False  # --enable-expert-parallel in spec.serving.engineArgs
    # Whether the operator can run a Neuron compile Job on a larger instance: it needs a compile
    # cache the Job and the serving pods share (runtime.neuronCacheUri, an s3:// prefix).
    compile_step: bool = False


def _valid_degrees(info: ModelInfo, fmt: ServedFormat, limit: int = 64) -> list[int]:
    """Power-of-two tensor-parallel degrees up to `limit` that pass every check."""
    degrees, tp = [], 1
    while tp <= limit:
        if _tensor_parallel_problem(info, fmt, tp) is None:
            degrees.append(tp)
        tp *= 2
    return degrees


def _block_fp8_problem(
    info: ModelInfo, block: tuple[int, int], tp: int, expert_parallel: bool
) -> str | None:
    """vLLM's validate_fp8_block_shape(_moe): every dimension TP splits must stay a whole number
    of blocks (column-parallel outputs of block_n, row-parallel inputs of block_k)."""
    block_n, block_k = block
    attention = info.num_attention_heads * info.head_dim
    kv_width = max(1, info.num_key_value_heads // tp) * info.head_dim * tp
    # (dimension name, full size, must divide block_n as an output, block_k as an input)
    dims = [("attention heads x head_dim", attention, True, True)]
    if not info.uses_mla:
        dims.append(("KV heads x head_dim", kv_width, True, False))
    if info.intermediate_size and (not info.num_experts or not info.moe_intermediate_size):
        dims.append(("intermediate_size", info.intermediate_size, True, True))
    # Expert parallelism places whole experts on each GPU: their dimensions are not split.
    if (
        info.num_experts
        and not expert_parallel
        and (info.moe_intermediate_size or info.intermediate_size)
    ):
        moe = int(info.moe_intermediate_size or info.intermediate_size or 0)
        dims.append(("moe_intermediate_size", moe, True, True))
    for name, size, as_output, as_input in dims:
        per_worker = size // tp
        blocks = [b for b, used in ((block_n, as_output), (block_k, as_input)) if used]
        bad = next((b for b in blocks if per_worker % b), None)
        if bad is not None:
            return (
                f"block-quantized FP8 (weight_block_size [{block_n}, {block_k}]): "
                f"tensor-parallel {tp} splits {name} {size} into {per_worker} per GPU, not a "
                f"multiple of the {bad}-wide block, and vLLM refuses to start"
            )
    return None


def _tensor_parallel_problem(
    info: ModelInfo, fmt: ServedFormat, tp: int, expert_parallel: bool = False
) -> str | None:
    if info.num_attention_heads % tp:
        return (
            f"tensor-parallel {tp} does not divide the {info.num_attention_heads} attention heads"
        )
    kv_heads = info.num_key_value_heads
    if not info.uses_mla and kv_heads % tp and tp % kv_heads:
        return f"tensor-parallel {tp} neither divides nor is a multiple of the {kv_heads} KV heads"
    group = fmt.group_size or (DEFAULT_INT4_GROUP_SIZE if fmt.name != "mxfp4" else None)
    if fmt.name in ("int4", "int4-awq", "int4-gptq", "int8-gptq") and group and group > 0:
        # Row-parallel layers (down_proj) need whole groups per GPU; per-channel (-1) does not.
        intermediate = info.moe_intermediate_size or info.intermediate_size
        if intermediate and (intermediate // tp) % group:
            return (
                f"intermediate size {intermediate}/{tp} is not a multiple of the quantization "
                f"group size {group}"
            )
    if tp > 1 and fmt.name == "fp8" and fmt.block_size:
        return _block_fp8_problem(info, fmt.block_size, tp, expert_parallel)
    return None


def _tensor_parallel_advice(info: ModelInfo, fmt: ServedFormat, problem: str) -> str:
    """The problem plus the degrees that work and, for block-FP8 MoE, expert parallelism."""
    valid = _valid_degrees(info, fmt)
    advice = f"; use tensor-parallel {' or '.join(map(str, valid))}" if valid else ""
    if "moe_intermediate_size" in problem:
        advice += (
            " (or keep the degree with expert parallelism: --enable-expert-parallel in "
            "spec.serving.engineArgs places whole experts on each GPU instead of splitting them)"
        )
    return problem + advice


def _activation_bytes(info: ModelInfo, tp: int, batched_tokens: int, max_num_seqs: int) -> int:
    if info.num_experts:
        per_expert = info.moe_intermediate_size or info.intermediate_size or 4 * info.hidden_size
        intermediate = per_expert * (info.num_experts_per_token or 1)
    else:
        intermediate = info.intermediate_size or 4 * info.hidden_size
    hidden_activations = batched_tokens * (3 * intermediate // tp + 4 * info.hidden_size)
    logits = max_num_seqs * info.vocab_size * LOGIT_BYTES
    return hidden_activations * ACTIVATION_ELEMENT_BYTES + logits


def hybrid_page_layout(per_layer: int, state_per_layer: int) -> tuple[int, int]:
    """(attention block tokens, bytes of one state slot) for a model with both attention and
    Mamba / linear-attention layers, as vLLM lays them out on GPUs
    (platforms/interface.py _align_hybrid_block_size): the attention block grows, in steps of 16
    tokens, until its page holds one layer's state, and each state slot is padded to that page."""
    if not per_layer or not state_per_layer:
        return BLOCK_SIZE, state_per_layer
    block = BLOCK_SIZE * math.ceil(state_per_layer / (BLOCK_SIZE * per_layer))
    return block, block * per_layer


def _kv_bytes_per_sequence(
    info: ModelInfo,
    stage: _Stage,
    per_layer: int,
    state_per_layer: int,
    request: Request,
    batched_tokens: int,
) -> int:
    """Cache bytes one full-context sequence holds on one worker of a stage: whole blocks for
    full attention, the window for sliding layers, fixed state slots per recurrent layer."""
    block, slot = hybrid_page_layout(per_layer, state_per_layer)
    full_tokens = _round_up(request.max_model_len, block)
    sliding_layers = stage.sliding_layers if info.sliding_window else 0
    full_layers = stage.full_layers + stage.sliding_layers - sliding_layers
    # SlidingWindowSpec.max_memory_usage_bytes: the window plus one batch of new tokens, +1 block.
    window_tokens = min(int(info.sliding_window or 0) - 1 + batched_tokens, request.max_model_len)
    sliding_tokens = (math.ceil(window_tokens / BLOCK_SIZE) + 1) * BLOCK_SIZE
    return (
        per_layer * (full_layers * full_tokens + sliding_layers * sliding_tokens)
        + stage.recurrent_layers * recurrent_state_slots(info) * slot
    )


def _gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


@dataclass(frozen=True)
class _Candidate:
    instance: InstanceType
    accelerator: Accelerator
    tensor_parallel_size: int
    pipeline_parallel_size: int  # GPUs: one stage per node; Neuron: 1 (TP spans the nodes)
    nodes: int = 1

    @property
    def accelerators_per_node(self) -> int:
        if self.accelerator.vendor == "nvidia":
            return self.tensor_parallel_size
        cores = int(self.accelerator.neuron_cores or 1)
        return math.ceil(self.tensor_parallel_size / self.nodes / cores)

    @property
    def accelerator_count(self) -> int:
        return self.accelerators_per_node * self.nodes


class _Infeasible(Exception):
    pass


def neuron_serving_host_bytes(weights_per_node: int) -> int:
    """Host memory a Neuron pod needs to load an already compiled model: the runtime plus the
    weight shards in flight to the devices (safetensors are memory-mapped, so the rest of the
    file stays reclaimable page cache)."""
    return NEURON_HOST_MEMORY_BASE + int(weights_per_node * NEURON_LOAD_WEIGHT_FRACTION)


def neuron_compile_host_bytes(weights: int) -> int:
    """Host memory NxD Inference needs to trace and compile the model: the whole checkpoint
    held on the CPU while it shards it for every rank, plus the compiler."""
    return NEURON_HOST_MEMORY_BASE + int(weights * NEURON_HOST_MEMORY_WEIGHT_FACTOR)


def neuron_compile_seconds(weights: int) -> int:
    """Predicted time for neuronx-cc to compile a model of `weights` bytes (cold cache)."""
    return int(weights / GIB * NEURON_COMPILE_SECONDS_PER_GIB)


def _host_resources(
    candidate: _Candidate, request: Request, info: ModelInfo
) -> tuple[int, int, int]:
    """(cpu, memory bytes, ephemeral storage bytes) for one pod, or _Infeasible."""
    instance = candidate.instance
    share = candidate.accelerators_per_node / instance.count
    cpu = max(2, min(int(instance.vcpus * share) - 1, 8 * candidate.accelerators_per_node))
    available = int(instance.memory_bytes * share * HOST_MEMORY_FRACTION)
    weights_per_node = request.weight_bytes // candidate.nodes
    if candidate.accelerator.vendor == "nvidia":
        wanted = GPU_HOST_MEMORY_BASE + int(weights_per_node * GPU_HOST_MEMORY_WEIGHT_FRACTION)
        memory = min(wanted, available)
        if memory < GPU_HOST_MEMORY_BASE // 2:
            raise _Infeasible(f"host memory {_gib(available)} is too small for the runtime")
    else:
        needed = neuron_serving_host_bytes(weights_per_node)
        if needed > available:
            raise _Infeasible(
                f"host memory: loading the compiled model streams the weights through host "
                f"memory ({_gib(needed)} needed, {_gib(available)} available on "
                f"{instance.memory_gib:g} GiB)"
            )
        memory = needed
    source_scheme = request.spec.model.uri.split("://", 1)[0]
    in_place = source_scheme == "fsx" or (
        source_scheme in ("efs", "file") and request.spec.model.copy_to_local_disk is False
    )
    weights_on_disk = 0 if in_place else int(request.weight_bytes * EPHEMERAL_WEIGHT_FACTOR)
    if source_scheme == "efs" and request.spec.model.copy_to_local_disk is None:
        weights_on_disk = int(request.weight_bytes * EPHEMERAL_WEIGHT_FACTOR)
    return cpu, memory, EPHEMERAL_BASE_BYTES + weights_on_disk


def _neuron_support_problem(catalog: Catalog, info: ModelInfo, request: Request) -> str | None:
    """What vLLM on Neuron cannot serve (catalog neuronSupport, with its source)."""
    support = catalog.neuron_support
    if request.spec.model.task == "embed":
        return (
            "vLLM on Neuron (NxD Inference) serves no pooling or embedding models "
            f"({support.source})"
        )
    if info.architecture != "unknown" and info.architecture not in support.architectures:
        return (
            f"vLLM on Neuron (NxD Inference) does not serve {info.architecture}; it supports "
            f"{', '.join(support.architectures)} ({support.source})"
        )
    return None


def _dtype_for(candidate: _Candidate, request: Request) -> tuple[str, list[str]]:
    """The dtype vLLM runs with on this accelerator, or _Infeasible; plus notes."""
    accelerator = candidate.accelerator
    fmt = request.fmt
    notes: list[str] = []
    dtype = fmt.dtype
    if accelerator.vendor == "nvidia":
        sm = accelerator.sm_version
        if dtype == "bf16" and not accelerator.bf16:
            if fmt.explicit_dtype:
                raise _Infeasible(
                    f"{accelerator.model} (SM {accelerator.compute_capability}) has no bf16 "
                    "and spec.model.quantization asks for bf16; use fp16 or auto"
                )
            dtype = "fp16"
            notes.append(
                f"{accelerator.model} (SM {accelerator.compute_capability}) has no bf16: "
                "served as float16 (--dtype float16)"
            )
        if BITS[fmt.name] == 8 and fmt.name == "fp8" and sm < 8.0:
            raise _Infeasible(f"FP8 weights need SM 8.0 or newer; {accelerator.model} is SM {sm}")
        if fmt.name == "fp8" and not accelerator.fp8:
            notes.append(
                f"{accelerator.model} has no native FP8: runs as W8A16 Marlin "
                "(memory saving, no compute saving)"
            )
        if fmt.name == "mxfp4" and sm < 8.0:
            raise _Infeasible(
                f"MXFP4 weights need SM 8.0 or newer (Marlin MXFP4 below SM 9.0); "
                f"{accelerator.model} is SM {sm}"
            )
        if BITS[fmt.name] == 4 and sm < 8.0:
            notes.append(f"Marlin int4 kernels need SM 8.0; {accelerator.model} uses slower ones")
        if request.kv_cache_dtype.startswith("fp8") and sm < 8.0:
            raise _Infeasible(
                f"an fp8 KV cache needs SM 8.0 or newer; {accelerator.model} is SM {sm}"
            )
    else:
        if BITS[fmt.name] == 4 or fmt.name == "int8-gptq":
            raise _Infeasible(
                f"NxD Inference on {accelerator.model} does not serve {fmt.name} checkpoints; "
                "use a bf16 or fp16 checkpoint"
            )
        if fmt.name == "fp8" and not accelerator.fp8:
            raise _Infeasible(f"{accelerator.model} does not serve fp8 weights")
        if request.kv_cache_dtype.startswith("fp8") and not accelerator.fp8:
            raise _Infeasible(f"{accelerator.model} does not support an fp8 KV cache")
    return dtype, notes


def _evaluate(
    candidate: _Candidate, request: Request, info: ModelInfo, catalog: Catalog
) -> Placement:
    """One placement with its memory accounting, or _Infeasible with the reason."""
    accelerator = candidate.accelerator
    tp, pp = candidate.tensor_parallel_size, candidate.pipeline_parallel_size
    problem = _tensor_parallel_problem(info, request.fmt, tp, request.expert_parallel)
    if problem:
        raise _Infeasible(_tensor_parallel_advice(info, request.fmt, problem))
    if pp > info.num_layers:
        raise _Infeasible(f"{pp} pipeline stages exceed the {info.num_layers} layers")
    if accelerator.vendor != "nvidia":
        unsupported = _neuron_support_problem(catalog, info, request)
        if unsupported:
            raise _Infeasible(unsupported)
    dtype, notes = _dtype_for(candidate, request)
    fmt = request.fmt
    element_bytes = kv_dtype_bytes(
        request.kv_cache_dtype, ServedFormat(fmt.name, dtype, None, False)
    )
    per_layer = kv_bytes_per_token_per_layer(info, tp, element_bytes)
    # Mamba / DeltaNet state follows the model dtype (vLLM's mamba_ssm_cache_dtype "auto"),
    # except where vLLM keeps the model's SSM state wider (Nemotron-H: float32).
    state_bytes = BITS[dtype] // 8
    ssm_bytes = BITS[info.recurrent_ssm_dtype] // 8 if info.recurrent_ssm_dtype else state_bytes
    state_per_layer = recurrent_state_bytes_per_layer(info, tp, state_bytes, ssm_bytes)
    stages = _stages(info, fmt, request.weight_bytes, tp, pp)
    spec = request.spec

    def stage_per_token(stage: _Stage) -> int:
        return (stage.full_layers + stage.sliding_layers) * per_layer

    if accelerator.vendor == "nvidia":
        device_bytes = accelerator.memory_bytes
        usable = int(device_bytes * request.gpu_memory_utilization)
        batched_tokens = (
            BATCHED_TOKENS_LARGE_GPU
            if device_bytes >= LARGE_GPU_BYTES
            else BATCHED_TOKENS_SMALL_GPU
        )
        max_num_seqs = max(DEFAULT_MAX_NUM_SEQS, request.concurrency)
        batched_tokens = max(batched_tokens, max_num_seqs)
        activations = _activation_bytes(info, tp, batched_tokens, max_num_seqs)
        overhead = NON_TORCH_BYTES_SINGLE if tp * pp == 1 else NON_TORCH_BYTES_PARALLEL
        overhead += int(accelerator.extra_overhead_gib * GIB)  # measured, from the catalog
        graphs = 0 if request.enforce_eager else CUDA_GRAPH_BYTES
        # Every stage sizes its own cache; vLLM then takes the smallest block count of all
        # workers, so the tightest stage (most layers, embeddings or lm_head) decides.
        binding: tuple[int, int, int, _Stage] | None = None
        for stage in stages:
            stage_kv = usable - stage.weight_bytes - activations - overhead - graphs
            if stage_kv <= 0:
                where = f" on the heaviest of {pp} pipeline stages" if pp > 1 else ""
                raise _Infeasible(
                    f"weights {_gib(stage.weight_bytes)} + activations {_gib(activations)} + "
                    f"runtime {_gib(overhead + graphs)} per GPU{where} exceed the "
                    f"{_gib(usable)} vLLM may use ({request.gpu_memory_utilization:g} of "
                    f"{accelerator.memory_gib:g} GiB)"
                )
            per_sequence = _kv_bytes_per_sequence(
                info, stage, per_layer, state_per_layer, request, batched_tokens
            )
            stage_sequences = stage_kv // per_sequence
            per_token = stage_per_token(stage)
            if stage.sliding_layers or stage.recurrent_layers or not per_token:
                # vLLM reports such a cache as max concurrency x max_model_len tokens
                # (kv_cache_utils.get_kv_cache_capacity): windows and states count per sequence.
                stage_tokens = stage_kv * request.max_model_len // per_sequence
            else:
                stage_tokens = (stage_kv // (per_token * BLOCK_SIZE)) * BLOCK_SIZE
            if binding is None or (stage_sequences, stage_tokens) < binding[:2]:
                binding = (stage_sequences, stage_tokens, stage_kv, stage)
        assert binding is not None
        max_sequences, kv_tokens, kv_bytes, heaviest = binding
        weights_per_worker = heaviest.weight_bytes
        kv_per_token = stage_per_token(heaviest)
        memory = MemoryBreakdown(
            device_bytes=device_bytes,
            usable_bytes=usable,
            weight_bytes=weights_per_worker,
            activation_bytes=activations,
            runtime_overhead_bytes=overhead,
            cuda_graph_bytes=graphs,
            kv_cache_bytes=kv_bytes,
        )
        engine_extra = {
            "max_num_batched_tokens": batched_tokens,
            "gpu_memory_utilization": request.gpu_memory_utilization,
        }
        device = "cuda"
    else:
        # NxD Inference pre-allocates a contiguous KV cache of max_num_seqs x max_model_len at
        # compile time; there is no paging and gpu_memory_utilization has no effect.
        cores = int(accelerator.neuron_cores or 1)
        device_bytes = accelerator.memory_bytes // cores
        max_num_seqs = request.concurrency
        heaviest = max(stages, key=lambda stage: stage.weight_bytes)
        weights_per_worker = heaviest.weight_bytes
        kv_per_token = stage_per_token(heaviest)
        kv_bytes = max_num_seqs * request.max_model_len * kv_per_token
        activations = 0
        overhead = NEURON_RUNTIME_BYTES_PER_CORE + int(accelerator.extra_overhead_gib * GIB / cores)
        need = weights_per_worker + kv_bytes + overhead
        if need > device_bytes:
            raise _Infeasible(
                f"weights {_gib(weights_per_worker)} + KV cache {_gib(kv_bytes)} + runtime "
                f"{_gib(overhead)} per NeuronCore exceed its {_gib(device_bytes)}"
            )
        kv_tokens = max_num_seqs * request.max_model_len
        max_sequences = max_num_seqs
        memory = MemoryBreakdown(
            device_bytes=device_bytes,
            usable_bytes=device_bytes,
            weight_bytes=weights_per_worker,
            activation_bytes=0,
            runtime_overhead_bytes=overhead,
            cuda_graph_bytes=0,
            kv_cache_bytes=kv_bytes,
        )
        engine_extra = {}
        device = "neuron"

    if kv_tokens < request.max_model_len:
        raise _Infeasible(
            f"KV cache {_gib(kv_bytes)} holds {kv_tokens:,} tokens, less than one sequence of "
            f"maxModelLen {request.max_model_len:,}"
        )
    if max_sequences < request.concurrency:
        raise _Infeasible(
            f"KV cache {_gib(kv_bytes)} holds {max_sequences} sequences of "
            f"{request.max_model_len:,} tokens; concurrency {request.concurrency} needs more"
        )
    cpu, host_memory, ephemeral = _host_resources(candidate, request, info)
    instance = candidate.instance
    nodes = candidate.nodes
    cost = None if instance.usd_per_hour is None else round(instance.usd_per_hour * nodes, 4)
    compile_instance = None
    if accelerator.vendor != "nvidia":
        compile_instance = _neuron_compile_instance(catalog, candidate, request)
        if compile_instance is not None:
            notes.append(
                f"step 1: compile once on {compile_instance} (a Job on a temporary node pool "
                f"fills the Neuron compile cache; "
                f"{_gib(neuron_compile_host_bytes(request.weight_bytes // nodes))} "
                f"host memory to compile, more than {instance.name} has); step 2: serve on "
                f"{instance.name} from the compiled artifacts"
                + (
                    ""
                    if request.compile_step
                    else f". The operator runs step 1 only with a shared Neuron compile cache: "
                    f"{COMPILE_CACHE_SETTING}"
                )
            )
    if candidate.accelerators_per_node < instance.count:
        notes.append(
            f"uses {candidate.accelerators_per_node} of the {instance.count} accelerators of "
            f"{instance.name}; cost is the whole instance (another replica can share it)"
        )
    if spec.accelerator.capacity_type == "spot":
        notes.append("spot capacity: cost shown is the on-demand price, an upper bound")
    efa_interfaces = 0
    if nodes > 1:
        efa_interfaces = instance.efa_interfaces
        how = (
            f"pipeline parallel {pp} x tensor parallel {tp}"
            if pp > 1
            else f"tensor parallel {tp} across the nodes"
        )
        notes.append(
            f"spread over {nodes} nodes per replica ({how}, LeaderWorkerSet): needs EFA "
            f"({EFA_RESOURCE}: {efa_interfaces} per pod) on an EFA-capable node pool, and "
            f"{nodes} nodes that must all be up (a node loss stops the replica)"
        )
    sampling = spec.serving.sampling
    engine = EngineArgs(
        device=device,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        max_model_len=request.max_model_len,
        max_num_seqs=max_num_seqs,
        dtype=TORCH_DTYPES[dtype],
        quantization=request.fmt.online_quantization,
        kv_cache_dtype=request.kv_cache_dtype,
        runner="pooling" if spec.model.task == "embed" else "generate",
        enforce_eager=request.enforce_eager and not user_enforce_eager(spec.serving.engine_args),
        generation_defaults=sampling.engine_defaults() if sampling else {},
        trust_remote_code=spec.model.trust_remote_code,
        **engine_extra,
    )
    compile_seconds = 0 if device == "cuda" else neuron_compile_seconds(request.weight_bytes)
    ready_seconds = (
        request.weight_bytes / FETCH_BYTES_PER_SECOND
        + weights_per_worker / LOAD_BYTES_PER_SECOND
        + ENGINE_START_SECONDS
        + compile_seconds
    )
    return Placement(
        instance_type=instance.name,
        accelerator_type=accelerator.model,
        accelerator_vendor=accelerator.vendor,
        resource_name=RESOURCE_NAMES[accelerator.vendor],
        resource_count=candidate.accelerators_per_node,
        accelerator_count=candidate.accelerator_count,
        accelerators_per_node=candidate.accelerators_per_node,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        nodes=nodes,
        efa_interfaces=efa_interfaces,
        compile_instance_type=compile_instance,
        weight_bytes=request.weight_bytes,
        kv_cache_bytes_per_token=kv_per_token,
        kv_cache_tokens=kv_tokens,
        max_concurrent_sequences=max_sequences,
        cost_per_hour_usd=cost,
        engine_args=engine.to_argv(),
        engine=engine,
        memory=memory,
        dtype=dtype,
        cpu_request=cpu,
        memory_request_bytes=host_memory,
        ephemeral_storage_bytes=ephemeral,
        capacity_type=spec.accelerator.capacity_type,
        ami_family=AMI_TYPES[accelerator.vendor],
        estimated_ready_seconds=math.ceil(ready_seconds),
        notes=notes,
    )


def _neuron_compile_instance(
    catalog: Catalog, candidate: _Candidate, request: Request
) -> str | None:
    """None when the serving node can compile the model itself; else the cheapest instance of the
    same accelerator with the host memory to compile it (or _Infeasible when none has)."""
    # Each node of a multi-node replica compiles and shards its own ranks' part.
    needed = neuron_compile_host_bytes(request.weight_bytes // candidate.nodes)
    instance = candidate.instance
    share = candidate.accelerators_per_node / instance.count
    if needed <= instance.memory_bytes * share * HOST_MEMORY_FRACTION:
        return None
    larger = [
        other
        for other in catalog.instance_types
        if other.accelerator_name == instance.accelerator_name
        and other.memory_bytes * HOST_MEMORY_FRACTION >= needed
        and other.count * int(candidate.accelerator.neuron_cores or 1)
        >= candidate.tensor_parallel_size // candidate.nodes
    ]
    if not larger:
        raise _Infeasible(
            f"host memory: compiling needs {_gib(needed)} and no "
            f"{candidate.accelerator.model} instance type in the catalog has it"
        )
    cheapest = min(larger, key=lambda other: (other.usd_per_hour is None, other.usd_per_hour or 0))
    return cheapest.name


def _allowed(catalog: Catalog, spec: ModelDeploymentSpec) -> list[InstanceType]:
    constraints = spec.accelerator
    for pattern in constraints.instance_types:
        if not any(fnmatch.fnmatchcase(i.name, pattern) for i in catalog.instance_types):
            raise SpecError(
                "spec.accelerator.instanceTypes",
                f"{pattern!r} matches no instance type in the catalog; `modelship catalog` "
                "lists them (add new ones with a catalog override).",
            )
    allowed = []
    for instance in catalog.instance_types:
        vendor = catalog.vendor(instance)
        if constraints.family != "auto" and vendor != constraints.family:
            continue
        if constraints.instance_types and not any(
            fnmatch.fnmatchcase(instance.name, p) for p in constraints.instance_types
        ):
            continue
        if any(fnmatch.fnmatchcase(instance.name, p) for p in constraints.exclude_instance_types):
            continue
        allowed.append(instance)
    if not allowed:
        raise SpecError(
            "spec.accelerator",
            f"no instance type is left after family={constraints.family}, instanceTypes and "
            "excludeInstanceTypes; widen them.",
        )
    return allowed


def _single_node_candidates(catalog: Catalog, instance: InstanceType) -> Iterator[_Candidate]:
    accelerator = catalog.accelerator(instance)
    if accelerator.vendor == "nvidia":
        # Power-of-two TP degrees (vLLM's custom all-reduce and NCCL rings favour them).
        tp = 1
        while tp <= instance.count:
            yield _Candidate(instance, accelerator, tp, 1)
            tp *= 2
    else:
        cores = int(accelerator.neuron_cores or 1)
        for chips in range(1, instance.count + 1):
            yield _Candidate(instance, accelerator, chips * cores, 1)


def _rank_key(
    placement: Placement, compile_step: bool = True
) -> tuple[bool, bool, float, int, int, int]:
    cost = placement.cost_per_hour_usd
    # At equal cost: fewer nodes, more KV cache; then on GPUs the placement using more of the
    # instance (more KV headroom), on Neuron the one with fewer chips (a shorter compile and the
    # static KV cache is the same size either way).
    chips = placement.accelerator_count
    return (
        cost is None,
        # Without a shared compile cache the operator cannot run a placement's compile Job: such
        # placements come after every placement it brings up on its own (and are never chosen).
        not compile_step and placement.compile_instance_type is not None,
        cost or 0.0,
        placement.nodes,
        -placement.kv_cache_tokens,
        chips if placement.accelerator_vendor != "nvidia" else -chips,
    )


def _enumerate(
    catalog: Catalog, info: ModelInfo, request: Request
) -> tuple[list[Placement], list[Rejection]]:
    spec = request.spec
    max_accelerators = spec.accelerator.max_accelerators
    max_cost = spec.accelerator.max_cost_per_hour
    feasible: list[Placement] = []
    rejected: list[Rejection] = []

    def consider(candidate: _Candidate) -> Placement | None:
        name = candidate.instance.name
        if candidate.nodes > 1:
            name = f"{candidate.nodes} x {name}"
        pinned_tp = spec.accelerator.tensor_parallel_size
        if pinned_tp is not None and candidate.tensor_parallel_size != pinned_tp:
            return None  # not a rejection: the user pinned another degree
        try:
            if max_accelerators is not None and candidate.accelerator_count > max_accelerators:
                raise _Infeasible(
                    f"needs {candidate.accelerator_count} accelerators; "
                    f"spec.accelerator.maxAccelerators is {max_accelerators}"
                )
            placement = _evaluate(candidate, request, info, catalog)
            if max_cost is not None:
                if placement.cost_per_hour_usd is None:
                    raise _Infeasible(
                        "no on-demand price in the catalog to compare with maxCostPerHour"
                    )
                if placement.cost_per_hour_usd > max_cost:
                    raise _Infeasible(
                        f"costs ${placement.cost_per_hour_usd:.2f}/h, above "
                        f"spec.accelerator.maxCostPerHour ${max_cost:.2f}"
                    )
        except _Infeasible as reason:
            rejected.append(
                Rejection(
                    instance_type=name,
                    accelerator_count=candidate.accelerator_count,
                    reason=str(reason),
                )
            )
            return None
        feasible.append(placement)
        return placement

    allowed = _allowed(catalog, spec)
    max_nodes = spec.accelerator.max_nodes_per_replica
    for instance in allowed:
        fits_one_node = False
        for candidate in _single_node_candidates(catalog, instance):
            fits_one_node = consider(candidate) is not None or fits_one_node
        if fits_one_node or instance.count < 2 or max_nodes < 2:
            continue  # more nodes of a type that already fits only cost more
        # Spread placements, always considered and ranked with the rest: TP inside each node and
        # pipeline stages across GPU nodes (ai-on-eks multi-node blueprints), or one TP group
        # across Trainium nodes (NxD Inference: Llama-3.1-405B at TP128 on 4 x trn1.32xlarge).
        accelerator = catalog.accelerator(instance)
        if not instance.efa:
            rejected.append(
                Rejection(
                    instance_type=instance.name,
                    accelerator_count=instance.count,
                    reason="spreading a replica over nodes needs EFA, which this instance type "
                    "lacks",
                )
            )
            continue
        for nodes in range(2, max_nodes + 1):
            if accelerator.vendor == "nvidia":
                candidate = _Candidate(instance, accelerator, instance.count, nodes, nodes)
            else:
                cores = instance.count * int(accelerator.neuron_cores or 1) * nodes
                candidate = _Candidate(instance, accelerator, cores, 1, nodes)
            if consider(candidate) or (
                max_accelerators is not None and candidate.accelerator_count > max_accelerators
            ):
                break  # fits, or more nodes would only exceed maxAccelerators further
    return feasible, rejected


def _best_per_instance(placements: list[Placement], compile_step: bool) -> list[Placement]:
    """Rank, and keep one placement per (instance type, nodes): the others cost the same and
    hold less KV cache."""
    best: dict[tuple[str, int], Placement] = {}
    for placement in sorted(placements, key=lambda p: _rank_key(p, compile_step)):
        best.setdefault((placement.instance_type, placement.nodes), placement)
    return list(best.values())


def runnable(placement: Placement, compile_step: bool) -> bool:
    """Whether the operator can bring `placement` up: a two-step Neuron placement needs the
    compile step (a shared compile cache)."""
    return compile_step or placement.compile_instance_type is None


def resolve_needs(
    info: ModelInfo, spec: ModelDeploymentSpec, compile_step: bool = False
) -> Request:
    """Apply defaults and check the spec against the model; SpecError on a contradiction."""
    serving = spec.serving
    max_model_len = serving.max_model_len or min(
        info.max_position_embeddings, DEFAULT_MAX_MODEL_LEN_CAP
    )
    if max_model_len > info.max_position_embeddings:
        raise SpecError(
            "spec.serving.maxModelLen",
            f"{max_model_len} exceeds the model's max_position_embeddings "
            f"({info.max_position_embeddings}); lower it to at most {info.max_position_embeddings}.",
        )
    fmt = served_format(info, spec.model.quantization)
    pinned_tp = spec.accelerator.tensor_parallel_size
    if pinned_tp is not None:
        expert_parallel = "--enable-expert-parallel" in serving.engine_args
        problem = _tensor_parallel_problem(info, fmt, pinned_tp, expert_parallel)
        if problem:
            valid = [
                tp
                for tp in range(1, info.num_attention_heads + 1)
                if _tensor_parallel_problem(info, fmt, tp, expert_parallel) is None
            ]
            hint = (
                "; or keep it with expert parallelism (--enable-expert-parallel in "
                "spec.serving.engineArgs places whole experts on each GPU)"
                if "moe_intermediate_size" in problem
                else ""
            )
            raise SpecError(
                "spec.accelerator.tensorParallelSize",
                f"{problem}; use one of {', '.join(map(str, valid))}, or leave it out{hint}.",
            )
    return Request(
        max_model_len=max_model_len,
        concurrency=serving.concurrency,
        kv_cache_dtype=serving.kv_cache_dtype,
        gpu_memory_utilization=serving.gpu_memory_utilization,
        fmt=fmt,
        weight_bytes=weight_bytes(info, fmt),
        enforce_eager=user_enforce_eager(serving.engine_args),
        spec=spec,
        expert_parallel="--enable-expert-parallel" in serving.engine_args,
        compile_step=compile_step,
    )


def _replace_request(request: Request, **changes: object) -> Request:
    fields = {**request.__dict__, **changes}
    return Request(**fields)


def _suggest(
    catalog: Catalog, info: ModelInfo, request: Request, fits_somewhere: bool = False
) -> list[str]:
    """When nothing fits: the nearest changes that would, each checked by planning again.
    `fits_somewhere`: a placement the operator cannot run alone fits (no catch-all advice)."""
    suggestions: list[str] = []

    def cheapest(changed: Request) -> Placement | None:
        try:
            feasible, _ = _enumerate(catalog, info, changed)
        except SpecError:
            return None
        feasible = [p for p in feasible if runnable(p, request.compile_step)]
        return min(feasible, key=_rank_key) if feasible else None

    def where(placement: Placement) -> str:
        cost = (
            f"${placement.cost_per_hour_usd:.2f}/h" if placement.cost_per_hour_usd else "no price"
        )
        nodes = f"{placement.nodes} x " if placement.nodes > 1 else ""
        return f"{nodes}{placement.instance_type} (TP {placement.tensor_parallel_size}, {cost})"

    length = request.max_model_len
    while length > 512:
        length //= 2
        placement = cheapest(_replace_request(request, max_model_len=length))
        if placement:
            suggestions.append(
                f"shorter context: spec.serving.maxModelLen {length} fits on {where(placement)}"
            )
            break
    if request.concurrency > 1:
        concurrency = request.concurrency
        while concurrency > 1:
            concurrency //= 2
            placement = cheapest(_replace_request(request, concurrency=concurrency))
            if placement:
                suggestions.append(
                    f"fewer sequences: spec.serving.concurrency {concurrency} fits on {where(placement)}"
                )
                break
    if not request.kv_cache_dtype.startswith("fp8"):
        placement = cheapest(_replace_request(request, kv_cache_dtype="fp8"))
        if placement:
            suggestions.append(
                f"a smaller KV cache: spec.serving.kvCacheDtype fp8 fits on {where(placement)}"
            )
    for stronger in ("fp8", "int4"):
        if BITS[request.fmt.name] <= BITS[stronger]:
            continue
        fmt = ServedFormat(stronger, request.fmt.dtype, None, False)
        placement = cheapest(
            _replace_request(request, fmt=fmt, weight_bytes=weight_bytes(info, fmt))
        )
        if placement:
            how = "quantized on load" if stronger == "fp8" else "an AWQ/GPTQ checkpoint"
            suggestions.append(
                f"a stronger quantization: spec.model.quantization {stronger} ({how}) fits on {where(placement)}"
            )
            break
    constraints = request.spec.accelerator
    if (
        constraints.family != "auto"
        or constraints.instance_types
        or constraints.max_accelerators
        or constraints.max_cost_per_hour
        or constraints.exclude_instance_types
    ):
        open_spec = request.spec.model_copy(
            update={"accelerator": type(constraints)(capacity_type=constraints.capacity_type)}
        )
        placement = cheapest(_replace_request(request, spec=open_spec))
        if placement:
            suggestions.append(
                f"other hardware: without the spec.accelerator limits it fits on {where(placement)}"
            )
    if not suggestions and not fits_somewhere:
        suggestions.append(
            "nothing in the catalog holds this model at any context length; add larger instance "
            "types with a catalog override, or serve a smaller or quantized model"
        )
    return suggestions


def make_plan(
    info: ModelInfo, spec: ModelDeploymentSpec, catalog: Catalog, *, compile_step: bool = False
) -> Plan:
    """Size the hardware for one replica: the chosen placement, the alternatives (cheapest
    first), the rejected ones with reasons and, when nothing fits, what would.

    `compile_step`: the operator can run a Neuron compile Job on a larger instance than the one
    that serves (a shared compile cache is configured). Without it a placement that needs one
    ranks last and is never chosen; when nothing else fits, the suggestions say what to set."""
    request = resolve_needs(info, spec, compile_step)
    feasible, rejected = _enumerate(catalog, info, request)
    ranked = _best_per_instance(feasible, compile_step)
    chosen = next((p for p in ranked if runnable(p, compile_step)), None)
    needs = Needs(
        max_model_len=request.max_model_len,
        concurrency=request.concurrency,
        quantization=request.fmt.name,
        kv_cache_dtype=request.kv_cache_dtype,
        gpu_memory_utilization=request.gpu_memory_utilization,
    )
    suggestions: list[str] = []
    if chosen is None and ranked:
        two_step = ranked[0]
        suggestions.append(
            f"a shared Neuron compile cache: {COMPILE_CACHE_SETTING}; the operator then compiles "
            f"once on {two_step.compile_instance_type} and serves on {two_step.instance_type}"
        )
    if chosen is None:
        suggestions += _suggest(catalog, info, request, fits_somewhere=bool(ranked))
    return Plan(
        model=info,
        needs=needs,
        chosen=chosen,
        alternatives=[p for p in ranked if p is not chosen],
        rejected=rejected,
        suggestions=suggestions,
    )
