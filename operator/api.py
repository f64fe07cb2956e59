"""The ModelDeployment API (group modelship.dev, version v1alpha1).

These pydantic models are the single source of truth: `crds/modeldeployments.modelship.dev.yaml`
is generated from them (`modelship crd`), and a test fails when the two drift. Field
descriptions become `kubectl explain` text; `x-kubernetes-validations` carry the cross-field
rules the API server enforces (CEL); the same rules are enforced here for offline use.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.alias_generators import to_camel

from .source import URI_PATTERN, ModelSource, SourceError, parse_source
from .vllm_options import EngineArgsError, check_user_engine_args

GROUP = "modelship.dev"
VERSION = "v1alpha1"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SINGULAR = "modeldeployment"
SHORT_NAMES = ["md"]
API_VERSION = f"{GROUP}/{VERSION}"

Quantization = Literal[
    "auto",
    "fp32",
    "fp16",
    "bf16",
    "fp8",
    "int8",
    "int8-gptq",
    "int4",
    "int4-awq",
    "int4-gptq",
    "awq",
    "gptq",
    "compressed-tensors",
    "w4a16",
    "w8a8",
    "mxfp4",
]
QUANTIZATIONS: tuple[str, ...] = Quantization.__args__  # type: ignore[attr-defined]
KvCacheDtype = Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]
AcceleratorFamily = Literal["auto", "nvidia", "inferentia", "trainium"]
CapacityType = Literal["on-demand", "spot"]

_PARAMS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMbBtT]?)\s*$")
_PARAM_SCALE = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}


class SpecError(ValueError):
    """A ModelDeployment that cannot be served as written: `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def parse_parameter_count(value: str | int, field: str = "spec.model.parameters") -> int:
    """'8B' -> 8_000_000_000, '70.6B' -> 70_600_000_000, 1500000 -> 1500000."""
    if isinstance(value, bool):
        raise SpecError(
            field, f"{value!r} is not a parameter count; write e.g. 8B, 70.6B or 7000000000."
        )
    if isinstance(value, int):
        count = value
    else:
        match = _PARAMS.match(str(value))
        if not match:
            raise SpecError(
                field,
                f"{value!r} is not a parameter count; write e.g. 8B, 70.6B, 350M or 7000000000.",
            )
        count = round(float(match.group(1)) * _PARAM_SCALE[match.group(2).lower()])
    if count <= 0:
        raise SpecError(
            field, f"{value!r} must be a positive parameter count, e.g. 8B or 7000000000."
        )
    return count


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )

    def to_k8s(self) -> dict[str, Any]:
        """The camelCase dict as it appears in Kubernetes objects."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class Architecture(_Model):
    """Architecture facts that override (or stand in for) the model's config.json."""

    known_model: str | None = Field(
        None,
        max_length=200,
        description=(
            "A well-known model whose published config.json facts and parameter count stand in "
            "for the model's own files when those cannot be read: fsx:// and efs:// volumes the "
            "operator does not mount, and previews (modelship plan, render) without access to "
            "the bucket. A Hugging Face repository id such as meta-llama/Llama-3.1-8B-Instruct; "
            "`modelship models` lists them. The other architecture fields and "
            "spec.model.parameters override its facts."
        ),
    )
    num_layers: int | None = Field(
        None, ge=1, description="Transformer layers (num_hidden_layers)."
    )
    hidden_size: int | None = Field(None, ge=1, description="Hidden size (d_model).")
    intermediate_size: int | None = Field(None, ge=1, description="MLP intermediate size.")
    num_attention_heads: int | None = Field(None, ge=1, description="Attention (query) heads.")
    num_key_value_heads: int | None = Field(
        None, ge=1, description="Key/value heads (GQA); equal to the attention heads for MHA."
    )
    head_dim: int | None = Field(None, ge=1, description="Dimension of one attention head.")
    vocab_size: int | None = Field(None, ge=1, description="Vocabulary size.")
    max_position_embeddings: int | None = Field(
        None, ge=1, description="Longest context the model was trained for."
    )
    sliding_window: int | None = Field(
        None, ge=1, description="Sliding-window attention span in tokens, if the model uses one."
    )
    num_experts: int | None = Field(None, ge=1, description="Routed experts per MoE layer.")
    num_experts_per_token: int | None = Field(None, ge=1, description="Experts used per token.")
    kv_lora_rank: int | None = Field(
        None, ge=1, description="MLA latent KV rank (DeepSeek-V2/V3 style attention)."
    )
    qk_rope_head_dim: int | None = Field(None, ge=1, description="MLA rotary head dimension.")

    @field_validator("known_model")
    @classmethod
    def _is_known(cls, value: str | None) -> str | None:
        if value is not None:
            from .knownmodels import KnownModelError, get_known_model

            try:
                get_known_model(value)
            except KnownModelError as error:
                raise ValueError(str(error)) from None
        return value


class ModelSpec(_Model):
    uri: str = Field(
        ...,
        # In the CRD for the API server; here the validator below says what is wrong in words.
        json_schema_extra={"pattern": URI_PATTERN},
        description=(
            "Where the model package lives: s3://bucket/prefix, fsx://<pvc>/<path>, "
            "efs://<pvc>/<path>, or file:///dir for local use."
        ),
    )
    name: str | None = Field(
        None,
        max_length=253,
        description="Model name served on the OpenAI API; defaults to the ModelDeployment's name.",
    )
    parameters: int | str | None = Field(
        None,
        description=(
            "Parameter count ('8B', '70.6B', '350M' or an integer). Read from the safetensors "
            "headers when omitted; required when the package has no safetensors."
        ),
        json_schema_extra={"x-kubernetes-int-or-string": True},
    )
    quantization: Quantization = Field(
        "auto",
        description=(
            "Weight format served: auto (as the checkpoint is), fp32, fp16, bf16, fp8 (a 16-bit "
            "checkpoint is quantized on load; FP8 checkpoints, block-quantized too), int8, "
            "int8-gptq, int4 (AWQ or GPTQ), int4-awq or int4-gptq; or the checkpoint's format "
            "by name: awq, gptq, compressed-tensors, w4a16, w8a8, mxfp4 (gpt-oss). All but fp8 "
            "need a checkpoint already quantized that way."
        ),
    )
    task: Literal["generate", "embed"] = Field(
        "generate", description="generate (chat/completions) or embed (embeddings)."
    )
    trust_pickle: bool = Field(
        False,
        description=(
            "Allow pickle weight formats (.bin, .pt). Off by default: only safetensors are "
            "fetched and loaded, since pickle files can run code."
        ),
    )
    trust_remote_code: bool = Field(
        False,
        description=(
            "Run the Python code the model package ships (vLLM's --trust-remote-code), for "
            "architectures vLLM does not implement itself. Off by default: that code runs in the "
            "runtime pod with its credentials. The only way to turn it on; engineArgs may not."
        ),
    )
    copy_to_local_disk: bool | None = Field(
        None,
        description=(
            "For fsx:// and efs:// sources: copy the model to the node's local disk before "
            "serving. Default: yes for EFS (slow random reads), no for FSx for Lustre."
        ),
    )
    architecture: Architecture | None = Field(
        None,
        description=(
            "Architecture facts that override the model's config.json, or stand in for it "
            "where it cannot be read (knownModel names a well-known model's published facts)."
        ),
    )

    @field_validator("parameters", mode="before")
    @classmethod
    def _valid_parameters(cls, value: Any) -> Any:
        # Before pydantic's coercion, which would read `true` as the integer 1.
        if value is not None and not isinstance(value, int | str):
            raise ValueError(f"{value!r} is not a parameter count; write e.g. 8B or 7000000000.")
        if value is not None:
            try:
                parse_parameter_count(value)
            except SpecError as error:
                raise ValueError(error.message) from None  # load_spec names the field
        return value

    @field_validator("copy_to_local_disk")
    @classmethod
    def _copy_only_volumes(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        # The CEL rule of the same name (SPEC_CEL_RULES), for offline use.
        uri = str(info.data.get("uri", ""))
        if value is not None and not uri.startswith(("fsx://", "efs://")):
            raise ValueError(
                "applies only to fsx:// and efs:// sources (S3 models are always fetched to the "
                "node's disk); remove it."
            )
        return value

    @field_validator("uri")
    @classmethod
    def _valid_uri(cls, value: str) -> str:
        try:
            parse_source(value)
        except SourceError as error:
            raise ValueError(error.problem) from None
        if not re.match(URI_PATTERN, value):
            # parse_source forgives what the API server's pattern does not: say it the same way.
            raise ValueError(
                f"{value!r} must be written exactly as the API server accepts it: a lowercase "
                "scheme (s3://, fsx://, efs://, file://) and no spaces around the URI."
            )
        return value

    @property
    def source(self) -> ModelSource:
        return parse_source(self.uri)

    @property
    def parameter_count(self) -> int | None:
        return None if self.parameters is None else parse_parameter_count(self.parameters)


class Sampling(_Model):
    """Generation defaults for requests that leave them out (passed to vLLM)."""

    temperature: float | None = Field(None, ge=0, le=2, description="Sampling temperature.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling probability mass.")
    top_k: int | None = Field(None, ge=-1, description="Top-k sampling; -1 disables it.")
    max_tokens: int | None = Field(None, ge=1, description="Default maximum new tokens.")

    def engine_defaults(self) -> dict[str, float | int]:
        """The keys vLLM reads from --override-generation-config."""
        mapping = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_tokens,
        }
        return {key: value for key, value in mapping.items() if value is not None}


class ServingSpec(_Model):
    max_model_len: int | None = Field(
        None,
        ge=16,
        description=(
            "Longest sequence (prompt + output) served, in tokens. Default: the model's "
            "max_position_embeddings, capped at 8192."
        ),
    )
    concurrency: int = Field(
        1,
        ge=1,
        le=4096,
        description=(
            "Sequences served at once at full context per replica; the plan reserves KV cache for "
            "maxModelLen x concurrency tokens."
        ),
    )
    kv_cache_dtype: KvCacheDtype = Field(
        "auto", description="KV-cache element type: auto (the model's dtype) or an fp8 variant."
    )
    gpu_memory_utilization: float = Field(
        0.90,
        gt=0.3,
        le=0.98,
        description="Fraction of each GPU's memory vLLM may use (weights, activations, KV cache).",
    )
    sampling: Sampling | None = Field(None, description="Generation defaults (see Sampling).")
    engine_args: list[str] = Field(
        default_factory=list,
        description=(
            "Extra vLLM arguments, e.g. ['--enable-prefix-caching']. They are parsed the way vLLM "
            "parses them (underscores, --flag=value, abbreviations, short options); options the "
            "plan sets (parallelism, lengths, memory, dtype, quantization, port, "
            "--trust-remote-code) are refused in any spelling: set the matching spec field."
        ),
    )
    image: str | None = Field(
        None, description="Runtime image override (default: the operator's configured image)."
    )

    @field_validator("engine_args")
    @classmethod
    def _no_planned_flags(cls, args: list[str]) -> list[str]:
        # Parsed the way vLLM parses them: --max_model_len, --max-model=4096, -tp 2, -qfp8 and
        # --device-memory-utilization are all refused, not just the literal planned names.
        try:
            check_user_engine_args(args, field="engineArgs")
        except EngineArgsError as error:
            raise ValueError(str(error).removeprefix("engineArgs: ")) from None
        return args


class AcceleratorSpec(_Model):
    family: AcceleratorFamily = Field(
        "auto", description="auto (cheapest that fits), nvidia, inferentia or trainium."
    )
    instance_types: list[str] = Field(
        default_factory=list,
        description="Allowed EC2 instance types; shell patterns such as 'g6e.*' are accepted.",
    )
    exclude_instance_types: list[str] = Field(
        default_factory=list, description="Instance types (or patterns) never to use."
    )
    max_accelerators: int | None = Field(
        None, ge=1, description="Most accelerators (GPUs or Neuron chips) one replica may use."
    )
    tensor_parallel_size: int | None = Field(
        None,
        ge=1,
        description=(
            "Pin the tensor-parallel degree (GPUs, or NeuronCores on Neuron); it must divide the "
            "model's attention heads. Default: the planner chooses."
        ),
    )
    max_cost_per_hour: float | None = Field(
        None, gt=0, description="Most on-demand USD per hour one replica may cost."
    )
    max_nodes_per_replica: int = Field(
        4,
        ge=1,
        le=16,
        description=(
            "Most nodes one replica may span (tensor parallel inside a node, pipeline stages or "
            "a Trainium TP group across nodes over EFA). Default 4: AWS's largest published "
            "single-model deployment (Llama-3.1-405B on 4 x trn1.32xlarge); each node is one "
            "more failure point. 1 keeps every replica on one node."
        ),
    )
    capacity_type: CapacityType = Field("on-demand", description="on-demand or spot capacity.")


class ReplicasSpec(_Model):
    min: int = Field(
        1, ge=0, description="Fewest replicas; 0 lets the autoscaler scale to zero when idle."
    )
    max: int | None = Field(
        None, ge=1, description="Most replicas; defaults to min (no autoscaling)."
    )

    @field_validator("max")
    @classmethod
    def _max_not_below_min(cls, value: int | None, info: ValidationInfo) -> int | None:
        minimum = info.data.get("min", 1)
        if value is not None and value < max(minimum, 1):
            raise ValueError(
                f"{value} is below replicas.min ({minimum}); raise replicas.max or lower replicas.min."
            )
        return value

    target_queue_length: int = Field(
        4,
        ge=1,
        description="Waiting requests per replica (vllm:num_requests_waiting) that trigger a scale-up.",
    )


class ModelDeploymentSpec(_Model):
    model: ModelSpec = Field(..., description="What to serve and where its weights are.")
    serving: ServingSpec = Field(
        default_factory=ServingSpec, description="Context length, concurrency and engine settings."
    )
    accelerator: AcceleratorSpec = Field(
        default_factory=AcceleratorSpec,
        description="Constraints on the hardware the plan may pick.",
    )
    replicas: ReplicasSpec = Field(
        default_factory=ReplicasSpec, description="Replica bounds for the autoscaler."
    )


# CEL rules the API server enforces on the spec (the pydantic validators above say the same).
SPEC_CEL_RULES = [
    {
        "rule": "!has(self.replicas) || !has(self.replicas.max) || self.replicas.max >= self.replicas.min",
        "message": "spec.replicas.max must be at least spec.replicas.min",
        "fieldPath": ".replicas.max",
    },
    {
        "rule": (
            "!has(self.model.copyToLocalDisk) || self.model.uri.startsWith('fsx://') "
            "|| self.model.uri.startsWith('efs://')"
        ),
        "message": "spec.model.copyToLocalDisk applies only to fsx:// and efs:// sources",
        "fieldPath": ".model.copyToLocalDisk",
    },
]


class Condition(_Model):
    type: str = Field(
        ...,
        description="Validated, Planned, CapacityReady, Available, Degraded or KVCacheAsPredicted.",
    )
    status: Literal["True", "False", "Unknown"] = Field(..., description="True, False or Unknown.")
    reason: str = Field(..., description="One CamelCase word for machines.")
    message: str = Field("", description="What happened, for people.")
    last_transition_time: str = Field(..., description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="The generation this condition saw.")


class PlanSummary(_Model):
    instance_type: str = Field(..., description="EC2 instance type of each node.")
    accelerator_type: str = Field(..., description="Accelerator model, e.g. NVIDIA L40S.")
    accelerator_count: int = Field(..., description="Accelerators per replica.")
    tensor_parallel_size: int = Field(..., description="Tensor-parallel degree.")
    pipeline_parallel_size: int = Field(..., description="Pipeline stages (nodes) per replica.")
    nodes: int = Field(..., description="Nodes per replica.")
    kv_cache_tokens: int = Field(..., description="Predicted KV-cache capacity in tokens.")
    max_concurrent_sequences: int = Field(
        ..., description="Predicted sequences at full context that fit in the KV cache."
    )
    cost_per_hour_usd: str | None = Field(
        None, description="On-demand cost of one replica, USD per hour (decimal string)."
    )
    node_pool: str | None = Field(None, description="The node pool the replicas run on.")


class KVCacheStatus(_Model):
    predicted_tokens: int = Field(
        ..., description="KV-cache tokens the plan predicted per replica."
    )
    measured_tokens: int | None = Field(
        None,
        description="KV-cache tokens vLLM allocated (the smallest among the replicas), from "
        "Prometheus; see the KVCacheAsPredicted condition.",
    )


class ModelDeploymentStatus(_Model):
    observed_generation: int | None = Field(None, description="The spec generation last acted on.")
    phase: str | None = Field(
        None,
        description=(
            "Pending, NodeProvisioning, Scheduling, WeightsLoading, Compiling, Ready, Degraded "
            "or Failed."
        ),
    )
    conditions: list[Condition] = Field(default_factory=list, description="Kubernetes conditions.")
    plan: PlanSummary | None = Field(None, description="The chosen placement.")
    replicas: int | None = Field(None, description="Desired replicas.")
    ready_replicas: int | None = Field(None, description="Replicas serving requests.")
    selector: str | None = Field(
        None, description="Label selector of the replicas (scale subresource)."
    )
    endpoint: str | None = Field(None, description="In-cluster OpenAI-compatible base URL.")
    kv_cache: KVCacheStatus | None = Field(
        None, description="KV-cache capacity: predicted by the plan, measured from vLLM."
    )
    message: str | None = Field(None, description="What is happening, for people.")
    last_good: str | None = Field(
        None,
        description=(
            "The last plan that applied, as JSON (generation, spec, placement, and placements "
            "still draining): what the running children are made from. Any operator replica "
            "restores them from it without reading the model again. Written by the operator."
        ),
    )


def load_spec(spec: dict[str, Any], field_prefix: str = "spec") -> ModelDeploymentSpec:
    """Validate a spec dict, turning pydantic's errors into one SpecError naming the field."""
    try:
        return ModelDeploymentSpec.model_validate(spec)
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in first["loc"] if part != "__root__")
        field = f"{field_prefix}.{location}" if location else field_prefix
        message = str(first["msg"]).removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = (
                "unknown field; check its spelling against `kubectl explain modeldeployment.spec`"
            )
        elif first["type"] == "missing":
            message = "is required"
        elif first["type"] == "literal_error":
            message = f"{first.get('input')!r} is not allowed; {message.lower()}"
        raise SpecError(field, message) from None


def load_manifest(document: dict[str, Any]) -> tuple[str, ModelDeploymentSpec]:
    """Validate a whole ModelDeployment object; returns (name, spec)."""
    if not isinstance(document, dict):
        raise SpecError("(document)", "is not a YAML mapping; give a ModelDeployment object.")
    if document.get("kind") != KIND:
        raise SpecError("kind", f"is {document.get('kind')!r}; expected {KIND}.")
    if document.get("apiVersion") != API_VERSION:
        raise SpecError("apiVersion", f"is {document.get('apiVersion')!r}; expected {API_VERSION}.")
    name = (document.get("metadata") or {}).get("name")
    if not name:
        raise SpecError("metadata.name", "is required.")
    return str(name), load_spec(document.get("spec") or {})


# A ModelDeployment's name is its Service's name and a label value on every child and pod:
# a DNS-1035 label (RFC 1035) of at most 63 characters, stricter than Kubernetes' object names.
NAME_MAX_LENGTH = 63
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
NAME_CEL_RULES = [
    {
        "rule": (
            f"self.metadata.name.size() <= {NAME_MAX_LENGTH} "
            f"&& self.metadata.name.matches('{NAME_PATTERN}')"
        ),
        "message": (
            "metadata.name must be at most 63 characters of lowercase letters, digits and '-', "
            "starting with a letter and ending with a letter or digit: it names the Service and "
            "labels every pod"
        ),
    }
]


def check_name(name: str) -> None:
    """Raise SpecError naming metadata.name when it cannot name a Service and label pods."""
    if len(name) > NAME_MAX_LENGTH or not re.match(NAME_PATTERN, name):
        raise SpecError(
            "metadata.name",
            f"{name!r} ({len(name)} characters) cannot name the model's Service and label its "
            f"pods: use at most {NAME_MAX_LENGTH} lowercase letters, digits and '-', starting with "
            "a letter and ending with a letter or digit (delete it and create it again with such a "
            "name; a name cannot be changed).",
        )
