"""The data that flows between inspection, sizing, render and the runtime: ModelInfo and Plan.

Both are plain, frozen data. JSON uses camelCase (the `modelship plan --output json` contract).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from .engine import EngineArgs

AcceleratorVendor = Literal["nvidia", "inferentia", "trainium"]
WeightDtype = Literal["fp32", "fp16", "bf16", "fp8", "int8", "int4"]
CheckpointQuantization = Literal[
    "none", "fp8", "int8", "int8-gptq", "int4-awq", "int4-gptq", "mxfp4"
]
# What one layer holds per token or per sequence (vLLM's KV-cache spec kinds):
# full_attention and sliding_attention keep K/V per token (MLA models keep one latent);
# mamba and linear_attention keep a fixed recurrent state per sequence; attention_mamba runs
# both side by side (Falcon-H1: K/V per token and a Mamba2 state per sequence); mlp is an MLP or
# MoE block alone (Nemotron-H's "-" and "E") and caches nothing.
LayerKind = Literal[
    "full_attention", "sliding_attention", "mamba", "linear_attention", "attention_mamba", "mlp"
]
# What keeps a recurrent layer's state (vLLM's mixer classes): mamba (MambaMixer, Jamba),
# mamba2 (MambaMixer2: Granite 4, Bamba, Falcon-H1, Nemotron-H), gated_deltanet (Qwen3-Next).
RecurrentMixer = Literal["mamba", "mamba2", "gated_deltanet"]
# The kinds that keep K/V per token (full context), and those that keep a state per sequence.
FULL_ATTENTION_KINDS: frozenset[LayerKind] = frozenset({"full_attention", "attention_mamba"})
STATE_KINDS: frozenset[LayerKind] = frozenset({"mamba", "linear_attention", "attention_mamba"})


class _Data(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json")


class ModelInfo(_Data):
    """What the model is, read from config.json and the safetensors headers."""

    architecture: str = Field(description="config.json architectures[0], e.g. LlamaForCausalLM.")
    model_type: str = Field(description="config.json model_type, e.g. llama.")
    parameters: int = Field(description="Total parameter count.")
    parameters_source: Literal["safetensors", "spec"] = Field(
        description="Where the count came from: counted in the headers, or given in the spec."
    )
    dtype: WeightDtype = Field(description="Element type of the (unquantized) weights.")
    quantization: CheckpointQuantization = "none"
    quantization_method: str | None = Field(
        None,
        description="config.json quantization_config.quant_method (awq, gptq, compressed-tensors, "
        "fp8, mxfp4, ...), as the checkpoint says.",
    )
    quantization_group_size: int | None = Field(
        None, description="Weights per quantization group; -1 means one scale per output channel."
    )
    quantization_block_size: list[int] | None = Field(
        None, description="Block-quantized FP8: [block_n, block_k] (weight_block_size)."
    )
    unquantized_modules: list[str] = Field(
        default_factory=list,
        description="Modules the checkpoint keeps in 16 bits (ignore / modules_to_not_convert).",
    )
    checkpoint_bytes: int | None = Field(
        None, description="Exact bytes of all weight tensors, when the headers were read."
    )
    num_layers: int
    hidden_size: int
    intermediate_size: int | None = None
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    vocab_size: int
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    sliding_window_layers: int = Field(
        0, description="Layers that use the sliding window (the rest attend to the full context)."
    )
    layer_types: list[LayerKind] = Field(
        default_factory=list,
        description="What each layer caches, in order; empty: full attention, less the "
        "sliding_window_layers.",
    )
    recurrent_conv_elements: int = Field(
        0,
        description="Elements of one mamba / linear-attention layer's convolution state for one "
        "sequence, whole model width (split over tensor parallel).",
    )
    recurrent_ssm_elements: int = Field(
        0,
        description="Elements of one mamba / linear-attention layer's SSM (or DeltaNet) state "
        "for one sequence, whole model width (split over tensor parallel).",
    )
    recurrent_ssm_dtype: WeightDtype | None = Field(
        None,
        description="Element type of the SSM state when vLLM does not keep it in the model's "
        "(Nemotron-H: mamba_ssm_cache_dtype, float32 by default); unset: the model's dtype.",
    )
    recurrent_mixer: RecurrentMixer | None = Field(
        None, description="The mixer of the mamba / linear-attention layers (vLLM's class)."
    )
    num_experts: int | None = None
    num_experts_per_token: int | None = None
    moe_intermediate_size: int | None = None
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    weight_files: list[str] = Field(default_factory=list)
    has_tokenizer: bool | None = None
    is_training_checkpoint: bool = False
    warnings: list[str] = Field(default_factory=list)

    @property
    def uses_mla(self) -> bool:
        return self.kv_lora_rank is not None

    def layer_kinds(self) -> list[LayerKind]:
        """What each layer caches: layer_types, or full attention with the sliding layers."""
        if self.layer_types:
            return list(self.layer_types)
        sliding = self.sliding_window_layers if self.sliding_window else 0
        # Without a per-layer list the sliding layers are spread evenly (Gemma-style).
        kinds: list[LayerKind] = ["full_attention"] * self.num_layers
        for index in range(sliding):
            kinds[index * self.num_layers // sliding] = "sliding_attention"
        return kinds

    @property
    def embedding_parameters(self) -> int:
        """Input embedding plus (untied) output head, which quantized formats keep in 16 bits."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)


class MemoryBreakdown(_Data):
    """Per accelerator (GPU, or NeuronCore on Neuron), in bytes."""

    device_bytes: int
    usable_bytes: int = Field(description="device_bytes x gpu_memory_utilization (GPU).")
    weight_bytes: int
    activation_bytes: int
    runtime_overhead_bytes: int
    cuda_graph_bytes: int
    kv_cache_bytes: int


class Placement(_Data):
    instance_type: str
    accelerator_type: str
    accelerator_vendor: AcceleratorVendor
    resource_name: str = Field(description="Kubernetes extended resource requested per pod.")
    resource_count: int = Field(description="Units of resource_name per pod (per node).")
    accelerator_count: int = Field(description="Accelerators (GPUs or Neuron chips) per replica.")
    accelerators_per_node: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    nodes: int
    efa_interfaces: int = Field(
        0, description="vpc.amazonaws.com/efa devices per pod; multi-node placements only."
    )
    compile_instance_type: str | None = Field(
        None,
        description="Neuron: the instance type a one-off compile Job runs on, when the serving "
        "node has too little host memory to compile the model itself.",
    )
    weight_bytes: int = Field(description="Bytes of weights served, whole model.")
    kv_cache_bytes_per_token: int = Field(description="Per accelerator (worker), all its layers.")
    kv_cache_tokens: int = Field(description="Tokens the KV cache holds (per replica).")
    max_concurrent_sequences: int = Field(description="Sequences at full context that fit.")
    cost_per_hour_usd: float | None = Field(description="On-demand, all nodes of one replica.")
    engine_args: list[str]
    engine: EngineArgs
    memory: MemoryBreakdown
    dtype: str = Field(description="Activation dtype vLLM runs with.")
    cpu_request: int = Field(description="vCPUs requested per pod.")
    memory_request_bytes: int = Field(description="Host memory requested per pod.")
    ephemeral_storage_bytes: int = Field(description="Local disk per pod for weights and caches.")
    capacity_type: str
    ami_family: str = Field(description="EKS-optimized AMI family for the node pool.")
    estimated_ready_seconds: int = Field(
        description="Predicted node-ready-to-serving time: weights download, load and compile."
    )
    notes: list[str] = Field(default_factory=list)


class Rejection(_Data):
    instance_type: str
    accelerator_count: int
    reason: str


class Needs(_Data):
    """The serving needs the plan was made for (after defaults)."""

    max_model_len: int
    concurrency: int
    quantization: str
    kv_cache_dtype: str
    gpu_memory_utilization: float


class Plan(_Data):
    model: ModelInfo
    needs: Needs
    chosen: Placement | None
    alternatives: list[Placement]
    rejected: list[Rejection]
    suggestions: list[str] = Field(
        default_factory=list, description="When nothing fits: what would."
    )

    def to_json_dict(self) -> dict[str, Any]:
        data = super().to_json_dict()
        for placement in [data["chosen"], *data["alternatives"]]:
            if placement is not None:
                placement.pop("engine")  # engineArgs carries the same, rendered
        return data
