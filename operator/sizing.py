"""The sizing engine: `make_plan(ModelInfo, spec, Catalog) -> Plan`, a pure function.

It computes, the way vLLM does, the memory one replica needs — weights for the served format,
activation peak, runtime overhead, CUDA graphs, and the KV cache for the requested context length
and concurrency — then enumerates placements over the catalog (instance type x accelerator count
x tensor-parallel degree, and pipeline stages across nodes when no single node fits), rejects each
infeasible one with a reason, and ranks the rest by cost. docs/sizing.md explains the model with a
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
from .plan import MemoryBreakdown, ModelInfo, Needs, Placement, Plan, Rejection
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
# Neuron pods stage the whole model in host memory while loading and compiling (the blueprints
# put 8B models on inf2.8xlarge, never inf2.xlarge's 16 GiB).
NEURON_HOST_MEMORY_BASE = 4 * GIB
NEURON_HOST_MEMORY_WEIGHT_FACTOR = 1.1
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
# Grouped int4 (AWQ/GPTQ, group size 128): an fp16 scale and a packed 4-bit zero per group, and
# the embeddings and lm_head kept in 16 bits (sizing-notes 1.2: "about 3% at group size 128").
INT4_GROUP_SIZE = 128
INT4_BYTES_PER_PARAM = 0.5 + (2 + 0.5) / INT4_GROUP_SIZE
# Multi-node replicas (pipeline stages on separate nodes) need EFA between them.
MAX_PIPELINE_NODES = 8

BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "fp8": 8, "int8": 8, "int8-gptq": 8, "int4": 4}
BITS.update({"int4-awq": 4, "int4-gptq": 4})
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class ServedFormat:
    """How the weights are held on the accelerator."""

    name: str  # fp32 | fp16 | bf16 | fp8 | int8 | int8-gptq | int4 | int4-awq | int4-gptq
    dtype: str  # the activation dtype: fp32 | fp16 | bf16
    online_quantization: str | None  # "fp8" when vLLM quantizes a 16-bit checkpoint on load
    explicit_dtype: bool  # the user asked for this exact dtype (no silent fp16 on a T4)

    @property
    def quantized(self) -> bool:
        return self.name not in TORCH_DTYPES


def _matches(checkpoint: str, wanted: str) -> bool:
    return checkpoint == wanted or checkpoint.startswith(wanted + "-")


def served_format(info: ModelInfo, quantization: str) -> ServedFormat:
    """The weight format to serve, from spec.model.quantization and what the checkpoint is."""
    field = "spec.model.quantization"
    base = info.dtype if info.dtype in TORCH_DTYPES else "bf16"
    checkpoint = info.quantization if info.quantization != "none" else info.dtype
    hypothetical = info.checkpoint_bytes is None  # planned from a parameter count, no weights read
    if quantization == "auto":
        return ServedFormat(checkpoint, base, None, explicit_dtype=False)
    if quantization in TORCH_DTYPES:
        if info.quantization != "none":
            raise SpecError(
                field,
                f"{quantization} asks to serve 16/32-bit weights but the checkpoint is "
                f"{info.quantization}; use auto (or {info.quantization}), or point "
                "spec.model.uri at an unquantized checkpoint.",
            )
        return ServedFormat(quantization, quantization, None, explicit_dtype=True)
    if quantization == "fp8":
        if info.quantization == "fp8":
            return ServedFormat("fp8", base, None, explicit_dtype=False)
        if info.quantization == "none":
            return ServedFormat("fp8", base, None if hypothetical else "fp8", explicit_dtype=False)
    elif _matches(info.quantization, quantization):
        return ServedFormat(info.quantization, base, None, explicit_dtype=False)
    elif info.quantization == "none" and hypothetical:
        return ServedFormat(quantization, "fp16", None, explicit_dtype=False)
    raise SpecError(
        field,
        f"the checkpoint is {checkpoint} and vLLM cannot convert it to {quantization} on load; "
        f"point spec.model.uri at a {quantization} checkpoint, or use auto"
        + (" or fp8 (quantized on load)." if info.quantization == "none" else "."),
    )


def weight_bytes(info: ModelInfo, fmt: ServedFormat) -> int:
    """Bytes of weights on the accelerators, whole model."""
    checkpoint = info.quantization if info.quantization != "none" else info.dtype
    if info.checkpoint_bytes is not None and fmt.name == checkpoint:
        return info.checkpoint_bytes  # exact: what the safetensors headers say
    if info.checkpoint_bytes is not None and not fmt.quantized and info.quantization == "none":
        return info.checkpoint_bytes * BITS[fmt.name] // BITS[info.dtype]  # a cast on load
    embeddings = min(info.embedding_parameters, info.parameters)
    body = info.parameters - embeddings
    if fmt.name in TORCH_DTYPES:
        return info.parameters * BITS[fmt.name] // 8
    embedding_bytes = embeddings * BITS[fmt.dtype] // 8  # quantized formats keep them in 16 bits
    if BITS[fmt.name] == 4:
        return embedding_bytes + math.ceil(body * INT4_BYTES_PER_PARAM)
    return embedding_bytes + body  # fp8 / int8: one byte per parameter, per-channel scales aside


def kv_dtype_bytes(kv_cache_dtype: str, fmt: ServedFormat) -> int:
    if kv_cache_dtype.startswith("fp8"):
        return 1
    return BITS[fmt.dtype] // 8


def kv_bytes_per_token_per_layer(
    info: ModelInfo, tensor_parallel_size: int, element_bytes: int
) -> int:
    """K and V of one token in one layer on one worker (vllm/v1/kv_cache_interface.py)."""
    if info.uses_mla:
        # MLA caches one latent vector (kv_lora_rank + rope dims) per token, replicated over TP.
        return (int(info.kv_lora_rank or 0) + int(info.qk_rope_head_dim or 0)) * element_bytes
    # KV heads are split over TP, and replicated once TP exceeds them (get_num_kv_heads).
    kv_heads_per_worker = max(1, info.num_key_value_heads // tensor_parallel_size)
    return 2 * kv_heads_per_worker * info.head_dim * element_bytes


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


def _tensor_parallel_problem(info: ModelInfo, fmt: ServedFormat, tp: int) -> str | None:
    if info.num_attention_heads % tp:
        return (
            f"tensor-parallel {tp} does not divide the {info.num_attention_heads} attention heads"
        )
    kv_heads = info.num_key_value_heads
    if not info.uses_mla and kv_heads % tp and tp % kv_heads:
        return f"tensor-parallel {tp} neither divides nor is a multiple of the {kv_heads} KV heads"
    if BITS[fmt.name] == 4:
        intermediate = info.moe_intermediate_size or info.intermediate_size
        if intermediate and (intermediate // tp) % INT4_GROUP_SIZE:
            return (
                f"intermediate size {intermediate}/{tp} is not a multiple of the int4 group "
                f"size {INT4_GROUP_SIZE}"
            )
    return None


def _activation_bytes(info: ModelInfo, tp: int, batched_tokens: int, max_num_seqs: int) -> int:
    if info.num_experts:
        per_expert = info.moe_intermediate_size or info.intermediate_size or 4 * info.hidden_size
        intermediate = per_expert * (info.num_experts_per_token or 1)
    else:
        intermediate = info.intermediate_size or 4 * info.hidden_size
    hidden_activations = batched_tokens * (3 * intermediate // tp + 4 * info.hidden_size)
    logits = max_num_seqs * info.vocab_size * LOGIT_BYTES
    return hidden_activations * ACTIVATION_ELEMENT_BYTES + logits


def _kv_bytes_per_sequence(
    info: ModelInfo, layers: int, per_layer: int, request: Request, batched_tokens: int
) -> int:
    """KV bytes one full-context sequence holds on one worker (whole blocks, sliding aware)."""
    full_tokens = _round_up(request.max_model_len, BLOCK_SIZE)
    sliding_layers = 0
    if info.sliding_window and info.sliding_window_layers and not info.uses_mla:
        sliding_layers = math.ceil(info.sliding_window_layers * layers / info.num_layers)
    # SlidingWindowSpec.max_memory_usage_bytes: the window plus one batch of new tokens, +1 block.
    window_tokens = min(int(info.sliding_window or 0) - 1 + batched_tokens, request.max_model_len)
    sliding_tokens = (math.ceil(window_tokens / BLOCK_SIZE) + 1) * BLOCK_SIZE
    return per_layer * ((layers - sliding_layers) * full_tokens + sliding_layers * sliding_tokens)


def _gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


@dataclass(frozen=True)
class _Candidate:
    instance: InstanceType
    accelerator: Accelerator
    tensor_parallel_size: int
    pipeline_parallel_size: int  # = nodes

    @property
    def accelerators_per_node(self) -> int:
        if self.accelerator.vendor == "nvidia":
            return self.tensor_parallel_size
        return math.ceil(self.tensor_parallel_size / int(self.accelerator.neuron_cores or 1))

    @property
    def accelerator_count(self) -> int:
        return self.accelerators_per_node * self.pipeline_parallel_size


class _Infeasible(Exception):
    pass


def _host_resources(
    candidate: _Candidate, request: Request, info: ModelInfo
) -> tuple[int, int, int]:
    """(cpu, memory bytes, ephemeral storage bytes) for one pod, or _Infeasible."""
    instance = candidate.instance
    share = candidate.accelerators_per_node / instance.count
    cpu = max(2, min(int(instance.vcpus * share) - 1, 8 * candidate.accelerators_per_node))
    available = int(instance.memory_bytes * share * HOST_MEMORY_FRACTION)
    weights_per_node = request.weight_bytes // candidate.pipeline_parallel_size
    if candidate.accelerator.vendor == "nvidia":
        wanted = GPU_HOST_MEMORY_BASE + int(weights_per_node * GPU_HOST_MEMORY_WEIGHT_FRACTION)
        memory = min(wanted, available)
        if memory < GPU_HOST_MEMORY_BASE // 2:
            raise _Infeasible(f"host memory {_gib(available)} is too small for the runtime")
    else:
        needed = NEURON_HOST_MEMORY_BASE + int(weights_per_node * NEURON_HOST_MEMORY_WEIGHT_FACTOR)
        if needed > available:
            raise _Infeasible(
                f"host memory: Neuron stages the weights in host memory while loading "
                f"({_gib(needed)} needed, {_gib(available)} available on "
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


def _evaluate(candidate: _Candidate, request: Request, info: ModelInfo) -> Placement:
    """One placement with its memory accounting, or _Infeasible with the reason."""
    accelerator = candidate.accelerator
    tp, pp = candidate.tensor_parallel_size, candidate.pipeline_parallel_size
    problem = _tensor_parallel_problem(info, request.fmt, tp)
    if problem:
        raise _Infeasible(problem)
    if pp > info.num_layers:
        raise _Infeasible(f"{pp} pipeline stages exceed the {info.num_layers} layers")
    dtype, notes = _dtype_for(candidate, request)
    fmt = request.fmt
    element_bytes = kv_dtype_bytes(
        request.kv_cache_dtype, ServedFormat(fmt.name, dtype, None, False)
    )
    layers = math.ceil(info.num_layers / pp)
    per_layer = kv_bytes_per_token_per_layer(info, tp, element_bytes)
    kv_per_token = layers * per_layer
    weights_per_worker = math.ceil(request.weight_bytes / (tp * pp))
    spec = request.spec

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
        graphs = 0 if request.enforce_eager else CUDA_GRAPH_BYTES
        kv_bytes = usable - weights_per_worker - activations - overhead - graphs
        if kv_bytes <= 0:
            raise _Infeasible(
                f"weights {_gib(weights_per_worker)} + activations {_gib(activations)} + "
                f"runtime {_gib(overhead + graphs)} per GPU exceed the "
                f"{_gib(usable)} vLLM may use ({request.gpu_memory_utilization:g} of "
                f"{accelerator.memory_gib:g} GiB)"
            )
        blocks = kv_bytes // (kv_per_token * BLOCK_SIZE)
        kv_tokens = blocks * BLOCK_SIZE
        per_sequence = _kv_bytes_per_sequence(info, layers, per_layer, request, batched_tokens)
        max_sequences = kv_bytes // per_sequence
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
        kv_bytes = max_num_seqs * request.max_model_len * kv_per_token
        activations = 0
        overhead = NEURON_RUNTIME_BYTES_PER_CORE
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
    cost = None if instance.usd_per_hour is None else round(instance.usd_per_hour * pp, 4)
    if candidate.accelerators_per_node < instance.count:
        notes.append(
            f"uses {candidate.accelerators_per_node} of the {instance.count} accelerators of "
            f"{instance.name}; cost is the whole instance (another replica can share it)"
        )
    if spec.accelerator.capacity_type == "spot":
        notes.append("spot capacity: cost shown is the on-demand price, an upper bound")
    if pp > 1:
        notes.append(f"{pp} nodes per replica (pipeline parallel over EFA, LeaderWorkerSet)")
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
    compile_seconds = (
        0 if device == "cuda" else int(request.weight_bytes / GIB * NEURON_COMPILE_SECONDS_PER_GIB)
    )
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
        nodes=pp,
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


def _rank_key(placement: Placement) -> tuple[bool, float, int, int, int]:
    cost = placement.cost_per_hour_usd
    return (
        cost is None,
        cost or 0.0,
        placement.nodes,
        -placement.kv_cache_tokens,
        -placement.accelerator_count,
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
        if candidate.pipeline_parallel_size > 1:
            name = f"{candidate.pipeline_parallel_size} x {name}"
        pinned_tp = spec.accelerator.tensor_parallel_size
        if pinned_tp is not None and candidate.tensor_parallel_size != pinned_tp:
            return None  # not a rejection: the user pinned another degree
        try:
            if max_accelerators is not None and candidate.accelerator_count > max_accelerators:
                raise _Infeasible(
                    f"needs {candidate.accelerator_count} accelerators; "
                    f"spec.accelerator.maxAccelerators is {max_accelerators}"
                )
            placement = _evaluate(candidate, request, info)
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
    for instance in allowed:
        for candidate in _single_node_candidates(catalog, instance):
            consider(candidate)
    if not feasible:
        # No single node holds the model: pipeline stages over several nodes of the largest GPU
        # instances (TP inside a node, PP across nodes over EFA, as the ai-on-eks blueprints do).
        for instance in allowed:
            accelerator = catalog.accelerator(instance)
            if accelerator.vendor != "nvidia" or instance.count < 2:
                continue
            if not instance.efa:
                rejected.append(
                    Rejection(
                        instance_type=instance.name,
                        accelerator_count=instance.count,
                        reason="multi-node serving needs EFA, which this instance type lacks",
                    )
                )
                continue
            for nodes in range(2, MAX_PIPELINE_NODES + 1):
                candidate = _Candidate(instance, accelerator, instance.count, nodes)
                if consider(candidate) or (
                    max_accelerators is not None and candidate.accelerator_count > max_accelerators
                ):
                    break  # fits, or more nodes would only exceed maxAccelerators further
    return feasible, rejected


def _best_per_instance(placements: list[Placement]) -> list[Placement]:
    """Rank, and keep one placement per (instance type, nodes): the others cost the same and
    hold less KV cache."""
    best: dict[tuple[str, int], Placement] = {}
    for placement in sorted(placements, key=_rank_key):
        best.setdefault((placement.instance_type, placement.nodes), placement)
    return list(best.values())


def resolve_needs(info: ModelInfo, spec: ModelDeploymentSpec) -> Request:
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
        problem = _tensor_parallel_problem(info, fmt, pinned_tp)
        if problem:
            valid = [
                tp
                for tp in range(1, info.num_attention_heads + 1)
                if _tensor_parallel_problem(info, fmt, tp) is None
            ]
            raise SpecError(
                "spec.accelerator.tensorParallelSize",
                f"{problem}; use one of {', '.join(map(str, valid))}, or leave it out.",
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
    )


def _replace_request(request: Request, **changes: object) -> Request:
    fields = {**request.__dict__, **changes}
    return Request(**fields)


def _suggest(catalog: Catalog, info: ModelInfo, request: Request) -> list[str]:
    """When nothing fits: the nearest changes that would, each checked by planning again."""
    suggestions: list[str] = []

    def cheapest(changed: Request) -> Placement | None:
        try:
            feasible, _ = _enumerate(catalog, info, changed)
        except SpecError:
            return None
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
    if not suggestions:
        suggestions.append(
            "nothing in the catalog holds this model at any context length; add larger instance "
            "types with a catalog override, or serve a smaller or quantized model"
        )
    return suggestions


def make_plan(info: ModelInfo, spec: ModelDeploymentSpec, catalog: Catalog) -> Plan:
    """Size the hardware for one replica: the chosen placement, the alternatives (cheapest
    first), the rejected ones with reasons and, when nothing fits, what would."""
    request = resolve_needs(info, spec)
    feasible, rejected = _enumerate(catalog, info, request)
    ranked = _best_per_instance(feasible)
    needs = Needs(
        max_model_len=request.max_model_len,
        concurrency=request.concurrency,
        quantization=request.fmt.name,
        kv_cache_dtype=request.kv_cache_dtype,
        gpu_memory_utilization=request.gpu_memory_utilization,
    )
    return Plan(
        model=info,
        needs=needs,
        chosen=ranked[0] if ranked else None,
        alternatives=ranked[1:],
        rejected=rejected,
        suggestions=[] if ranked else _suggest(catalog, info, request),
    )
