"""Model inspection: what a model is, read from its config.json and its safetensors headers.

Only metadata is read: config.json, model.safetensors.index.json and, for each shard, its
header through ranged reads (the 8-byte little-endian header length, then the JSON header).
The weights themselves are never downloaded. Explicit spec values (spec.model.architecture,
spec.model.parameters) override what the files say; what is missing is an error naming the
file or field and the fix, never a guess.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol

from .api import Architecture
from .lru import Lru
from .packagerules import TOKENIZER_RULE, find_tokenizer
from .plan import (
    STATE_KINDS,
    CheckpointQuantization,
    LayerKind,
    ModelInfo,
    RecurrentMixer,
    WeightDtype,
)
from .source import LocalSource, ModelSource, S3Source, VolumeSource

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

    from .knownmodels import KnownModel

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
# One speculative ranged read of this size holds the whole header of nearly every shard (a
# 560-tensor DeepSeek-V3 shard's is 68 KB); 1 MiB read 4x the bytes for no time saved (bench/).
HEADER_PROBE_BYTES = 256 << 10
# safetensors itself refuses headers above 100 MB; a larger length means "not safetensors".
MAX_HEADER_BYTES = 100_000_000
# spec.model.parameters further than this from the counted value earns a warning.
PARAMETER_MISMATCH_RATIO = 0.05
HEADER_READ_THREADS = 8

# Bits per element of each safetensors dtype.
_DTYPE_BITS = {
    "F64": 64,
    "F32": 32,
    "F16": 16,
    "BF16": 16,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "I64": 64,
    "I32": 32,
    "I16": 16,
    "I8": 8,
    "U64": 64,
    "U32": 32,
    "U16": 16,
    "U8": 8,
    "BOOL": 8,
}
_FLOAT_DTYPES: dict[str, WeightDtype] = {
    "F32": "fp32",
    "F16": "fp16",
    "BF16": "bf16",
    "F8_E4M3": "fp8",
    "F8_E5M2": "fp8",
}
_CONFIG_DTYPES: dict[str, WeightDtype] = {
    "float32": "fp32",
    "float": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
    "float8_e4m3fn": "fp8",
    "float8_e5m2": "fp8",
}
# Tensors packing several low-bit weights per integer element (AWQ, GPTQ, compressed-tensors).
# gpt-oss MXFP4 experts are *_blocks (two FP4 values per U8) with *_scales (E8M0) beside them.
_PACKED_SUFFIXES = (".qweight", ".weight_packed", "_blocks")
# Quantization metadata and buffers: stored in the checkpoint, but not model parameters.
_NOT_PARAMETER_SUFFIXES = (
    ".qzeros",
    ".scales",
    ".g_idx",
    ".weight_scale",
    ".weight_scale_inv",
    ".weight_zero_point",
    ".weight_g_idx",
    ".weight_shape",
    ".input_scale",
    ".input_zero_point",
    ".output_scale",
    ".k_scale",
    ".v_scale",
    "_proj_scales",
    "rotary_emb.inv_freq",
)
_OUTPUT_HEAD_SUFFIXES = ("lm_head.weight", "lm_head.qweight", "lm_head.weight_packed")
# Model families whose config class ties the output head to the embedding when unsaid.
_TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text", "paligemma"}
_TRAINING_STATE = re.compile(
    r"^(optimizer\.(pt|bin)|scheduler\.pt|rng_state.*\.pth|trainer_state\.json"
    r"|training_args\.bin|global_step\d+)$"
)
_PICKLE_WEIGHTS = re.compile(r"^(pytorch_model.*\.bin|.*\.pt|.*\.pth|consolidated.*\.pth)$")


QuantizationName = CheckpointQuantization


class ModelInfoError(ValueError):
    """The model cannot be inspected; the message names the file or field and the fix.

    `transient`: the store failed (throttling, a 5xx, a timeout, no connection, STS), so the same
    request may succeed later; otherwise the answer is final until something changes."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


# S3 error codes that say "not now" rather than "no" (AWS S3 error responses).
_TRANSIENT_S3_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestLimitExceeded",
        "InternalError",
        "ServiceUnavailable",
        "ExpiredToken",
    }
)


class ModelUnreadableError(ModelInfoError):
    """The model's files could not be read at all (no credentials, no access, no such bucket or
    path, a volume this process does not mount), as opposed to files that were read and are wrong.
    `reason` says why in a few words; a preview can then plan from facts the user names."""

    def __init__(self, message: str, reason: str, transient: bool = False) -> None:
        super().__init__(message, transient=transient)
        self.reason = reason


# --- safetensors headers --------------------------------------------------------------------


def _read_header(read_range: Callable[[int, int], bytes], name: str) -> tuple[dict[str, Any], int]:
    """The parsed header and its length in bytes (data starts at 8 + that length)."""
    head = read_range(0, HEADER_PROBE_BYTES)
    if len(head) < 8:
        raise ModelInfoError(
            f"{name} is {len(head)} bytes long, too short for a safetensors file; "
            "re-upload the shard."
        )
    (header_bytes,) = struct.unpack("<Q", head[:8])
    if header_bytes > MAX_HEADER_BYTES:
        raise ModelInfoError(
            f"{name} does not start with a safetensors header (declared header length "
            f"{header_bytes} bytes); check that the file really is safetensors."
        )
    end = 8 + header_bytes
    if len(head) < end and len(head) >= HEADER_PROBE_BYTES:
        head += read_range(len(head), end - len(head))  # the rare header longer than the probe
    if len(head) < end:
        raise ModelInfoError(
            f"{name} is truncated: its header needs {end} bytes but the file ends at "
            f"{len(head)}; re-upload the shard."
        )
    try:
        header = json.loads(head[8:end])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelInfoError(
            f"{name}: the safetensors header is not valid JSON ({error}); re-upload the shard."
        ) from None
    if not isinstance(header, dict):
        raise ModelInfoError(f"{name}: the safetensors header is not a JSON object.")
    for tensor, entry in header.items():
        if tensor == "__metadata__":
            continue
        if not (
            isinstance(entry, dict)
            and entry.get("dtype") in _DTYPE_BITS
            and isinstance(entry.get("shape"), list)
            and all(isinstance(dim, int) and dim >= 0 for dim in entry["shape"])
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
            and all(isinstance(offset, int) for offset in entry["data_offsets"])
            and 0 <= entry["data_offsets"][0] <= entry["data_offsets"][1]
        ):
            raise ModelInfoError(
                f"{name}: tensor {tensor!r} has an unreadable header entry {entry!r} "
                "(expected dtype, shape and data_offsets)."
            )
    return header, header_bytes


def read_safetensors_header(
    read_range: Callable[[int, int], bytes], *, name: str = "safetensors file"
) -> dict[str, Any]:
    """Parse a safetensors header through `read_range(offset, length) -> bytes`.

    Reads at most two ranges: one speculative read of the first HEADER_PROBE_BYTES (the
    8-byte little-endian header length plus, nearly always, the whole JSON header), and a
    second one only when the header is longer. `read_range` may return fewer bytes than
    asked at the end of the file. Returns the header dict (tensor name -> dtype, shape,
    data_offsets; plus "__metadata__" when present).
    """
    return _read_header(read_range, name)[0]


@dataclass(frozen=True)
class WeightsSummary:
    """What the safetensors headers say, summed over all shards."""

    parameters: int
    checkpoint_bytes: int
    dtype: WeightDtype | None  # majority (by bytes) of the floating-point parameter tensors
    files: tuple[str, ...]
    has_output_head: bool  # an lm_head tensor exists (so embeddings are not tied)


def summarize_weights(
    headers: Mapping[str, Mapping[str, Any]], *, quantization_bits: int | None = None
) -> WeightsSummary:
    """Count parameters, bytes and the dominant dtype over parsed headers (file -> header).

    Packed low-bit tensors (AWQ/GPTQ qweight, compressed-tensors weight_packed) count as the
    logical weights they hold (element bits / quantization_bits each); quantization scales,
    zero points, group indices and FP8 scales are stored bytes but not parameters.
    """
    parameters = 0
    checkpoint_bytes = 0
    float_bytes: dict[WeightDtype, int] = {}
    has_output_head = False
    for file, header in headers.items():
        for tensor, entry in header.items():
            if tensor == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            checkpoint_bytes += end - start
            if tensor.endswith(_NOT_PARAMETER_SUFFIXES):
                continue
            elements = 1
            for dim in entry["shape"]:
                elements *= dim
            dtype = entry["dtype"]
            if tensor.endswith(_PACKED_SUFFIXES) and dtype not in _FLOAT_DTYPES:
                if quantization_bits is None:
                    raise ModelInfoError(
                        f"{file}: tensor {tensor!r} is packed low-bit weights but config.json "
                        "has no quantization_config.bits; add the quantization_config the "
                        "quantizer wrote to config.json."
                    )
                elements *= _DTYPE_BITS[dtype] // quantization_bits
            parameters += elements
            if tensor.endswith(_OUTPUT_HEAD_SUFFIXES):
                has_output_head = True
            if dtype in _FLOAT_DTYPES:
                weight_dtype = _FLOAT_DTYPES[dtype]
                float_bytes[weight_dtype] = float_bytes.get(weight_dtype, 0) + end - start
    dtype_by_bytes = max(float_bytes.items(), key=lambda item: item[1])[0] if float_bytes else None
    return WeightsSummary(
        parameters=parameters,
        checkpoint_bytes=checkpoint_bytes,
        dtype=dtype_by_bytes,
        files=tuple(headers),
        has_output_head=has_output_head,
    )


# --- quantization -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Quantization:
    """The checkpoint's quantization, from config.json quantization_config."""

    name: QuantizationName
    bits: int | None  # bits per packed weight (None: not packed, or a plain 8-bit dtype)
    group_size: int | None  # weights per scale group; -1: one scale per output channel
    method: str | None = None  # quant_method as written (awq, gptq, compressed-tensors, ...)
    block_size: tuple[int, int] | None = None  # block FP8: (block_n, block_k)
    unquantized_modules: tuple[str, ...] = ()  # kept in 16 bits (ignore, modules_to_not_convert)


_NO_QUANTIZATION = Quantization("none", None, None)


def _group_size(value: Any) -> int | None:
    """group_size as written: a positive size, or -1 for per-channel scales (GPTQ, AWQ)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if value > 0 else (-1 if value == -1 else None)


def _module_list(*values: Any) -> tuple[str, ...]:
    names: list[str] = []
    for value in values:
        if isinstance(value, list):
            names.extend(str(item) for item in value if isinstance(item, str))
    return tuple(names)


def _block_size(value: Any, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return value[0], value[1]
    raise ModelInfoError(
        f"config.json {where} is {value!r}; expected two positive integers [block_n, block_k] "
        "(e.g. [128, 128]). Fix config.json."
    )


def quantization_from_config(config: Mapping[str, Any]) -> Quantization:
    """Map config.json quantization_config to ModelInfo's quantization, or raise naming it."""
    text = config.get("text_config")
    qc = config.get("quantization_config")
    if qc is None and isinstance(text, dict):
        qc = text.get("quantization_config")
    if qc is None:
        return _NO_QUANTIZATION
    if not isinstance(qc, dict):
        raise ModelInfoError("config.json quantization_config is not an object.")
    method = str(qc.get("quant_method", "")).lower()
    group_size = _group_size(qc.get("group_size", qc.get("q_group_size")))
    unquantized = _module_list(
        qc.get("modules_to_not_convert"), qc.get("ignored_layers"), qc.get("ignore")
    )
    if method in ("awq", "gptq"):
        bits = qc.get("bits", qc.get("w_bit"))
        if method == "awq" and bits == 4:
            return Quantization("int4-awq", 4, group_size, method, None, unquantized)
        if method == "gptq" and bits in (4, 8):
            name: QuantizationName = "int4-gptq" if bits == 4 else "int8-gptq"
            return Quantization(name, bits, group_size, method, None, unquantized)
        raise ModelInfoError(
            f"config.json quantization_config.bits is {bits!r} for {method}; modelship serves "
            "4-bit AWQ and 4- or 8-bit GPTQ checkpoints."
        )
    if method in ("fp8", "fbgemm_fp8"):
        block = _block_size(qc.get("weight_block_size"), "quantization_config.weight_block_size")
        return Quantization("fp8", None, None, method, block, unquantized)
    if method == "mxfp4":
        # OCP MX FP4 (gpt-oss): 4-bit E2M1 weights, one 8-bit E8M0 scale per 32 weights.
        return Quantization("mxfp4", 4, MXFP4_BLOCK, method, None, unquantized)
    if method == "compressed-tensors":
        return _compressed_tensors(qc, unquantized)
    raise ModelInfoError(
        f"config.json quantization_config.quant_method {method or None!r} is not supported; "
        "modelship serves awq, gptq, fp8 (per-tensor, per-channel or block), mxfp4 and "
        "compressed-tensors checkpoints (or an unquantized checkpoint with "
        "spec.model.quantization)."
    )


# OCP Microscaling: 32 FP4 elements share one E8M0 scale (gpt-oss model card, vLLM mxfp4.py).
MXFP4_BLOCK = 32


def _compressed_tensors(qc: Mapping[str, Any], unquantized: tuple[str, ...]) -> Quantization:
    groups = qc.get("config_groups")
    schemes = set()
    group_sizes = set()
    blocks = set()
    if isinstance(groups, dict):
        for group in groups.values():
            weights = group.get("weights") if isinstance(group, dict) else None
            if isinstance(weights, dict):
                schemes.add((weights.get("type"), weights.get("num_bits")))
                strategy = weights.get("strategy")
                if strategy == "channel":
                    group_sizes.add(-1)
                elif strategy == "block":
                    where = "quantization_config.config_groups.*.weights.block_structure"
                    blocks.add(_block_size(weights.get("block_structure"), where))
                else:
                    size = _group_size(weights.get("group_size"))
                    if size is not None:
                        group_sizes.add(size)
    if len(schemes) == 1:
        kind, bits = schemes.pop()
        group = group_sizes.pop() if len(group_sizes) == 1 else None
        block = blocks.pop() if len(blocks) == 1 else None
        method = "compressed-tensors"
        if (kind, bits) == ("float", 8):  # FP8 W8A8 / FP8-dynamic, per-tensor/channel/block
            return Quantization("fp8", None, None, method, block, unquantized)
        if (kind, bits) == ("int", 8):  # W8A8 int8 (or W8A16)
            return Quantization("int8", 8, group, method, None, unquantized)
        if (kind, bits) == ("int", 4):
            # W4A16: vLLM runs 4-bit integer compressed-tensors with the GPTQ (Marlin) kernels.
            return Quantization("int4-gptq", 4, group, method, None, unquantized)
    raise ModelInfoError(
        "config.json quantization_config.config_groups (compressed-tensors) is not one simple "
        f"weight scheme (found {sorted(map(str, schemes)) or 'none'}); modelship understands "
        "8-bit float, 8-bit int and 4-bit int weights in a single group."
    )


# --- config.json -> ModelInfo -----------------------------------------------------------------

# ModelInfo field -> (config.json names, spec.model.architecture field).
_REQUIRED = {
    "num_layers": (("num_hidden_layers", "n_layer", "num_layers"), "numLayers"),
    "hidden_size": (("hidden_size", "n_embd", "d_model"), "hiddenSize"),
    "num_attention_heads": (("num_attention_heads", "n_head"), "numAttentionHeads"),
    "vocab_size": (("vocab_size",), "vocabSize"),
    "max_position_embeddings": (
        ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"),
        "maxPositionEmbeddings",
    ),
}


class _Config:
    """Looks a key up in text_config (multimodal wrappers) first, then the top level."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        text = config.get("text_config")
        self.layers = [text, config] if isinstance(text, dict) else [config]

    def get(self, *keys: str) -> Any:
        for layer in self.layers:
            for key in keys:
                if layer.get(key) is not None:
                    return layer[key]
        return None

    def positive_int(self, *keys: str) -> int | None:
        value = self.get(*keys)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelInfoError(
                f"config.json {keys[0]} is {value!r}, not a positive integer; fix config.json "
                "or set the matching spec.model.architecture field."
            )
        return value


def _sliding_window(
    config: _Config, overrides: Architecture, num_layers: int, max_positions: int
) -> tuple[int | None, int]:
    """The window and how many layers use it (the others attend to the whole context)."""
    window = overrides.sliding_window
    if window is None:
        if config.get("use_sliding_window") is False:
            return None, 0  # Qwen2: sliding_window is written, but switched off
        window = config.positive_int("sliding_window")
    if window is None or window >= max_positions:
        return None, 0  # a window as long as the context is full attention
    layer_types = config.get("layer_types")
    pattern = config.get("sliding_window_pattern")
    if isinstance(layer_types, list) and layer_types:
        layers = sum(1 for kind in layer_types if kind == "sliding_attention")
    elif config.get("model_type") == "gemma2":
        layers = (num_layers + 1) // 2  # even layers slide, odd layers are global
    elif isinstance(pattern, int) and pattern > 0:
        layers = num_layers - num_layers // pattern  # Gemma-3: every pattern-th layer is global
    elif config.get("use_sliding_window") and isinstance(config.get("max_window_layers"), int):
        layers = max(num_layers - config.get("max_window_layers"), 0)  # Qwen2: the top layers
    else:
        layers = num_layers
    return (window, layers) if layers else (None, 0)


# config.json layer_types values -> what the layer caches (vLLM's KV-cache spec kinds).
_LAYER_KINDS: dict[str, LayerKind] = {
    "full_attention": "full_attention",
    "attention": "full_attention",  # Granite 4 hybrids
    "chunked_attention": "full_attention",  # Llama 4: chunks are sized as full attention
    "sliding_attention": "sliding_attention",
    "linear_attention": "linear_attention",  # Qwen3-Next Gated DeltaNet
    "mamba": "mamba",
    "mamba2": "mamba",
    "hybrid": "attention_mamba",  # Falcon-H1's layers_block_type
    "mlp": "mlp",  # Nemotron-H layers_block_type: an MLP or MoE block alone caches nothing
    "moe": "mlp",
}
# Nemotron-H hybrid_override_pattern characters (vLLM nemotron_h.py ALL_DECODER_LAYER_TYPES):
# M a Mamba2 mixer, * attention, - an MLP, E a mixture of experts.
_NEMOTRON_H_PATTERN: dict[str, LayerKind] = {
    "M": "mamba",
    "*": "full_attention",
    "-": "mlp",
    "E": "mlp",
}


def _layer_kinds(config: _Config, num_layers: int, window_layers: int) -> list[LayerKind]:
    """What each layer caches, from layer_types or the family's layer pattern."""
    model_type = config.get("model_type")
    if model_type == "falcon_h1":
        # Falcon-H1 runs attention and a Mamba2 mixer side by side in every decoder layer
        # (vLLM falcon_h1.py FalconH1ParallelHybrid: self_attn and mamba in each layer).
        return ["attention_mamba"] * num_layers
    pattern = config.get("hybrid_override_pattern")
    if isinstance(pattern, str) and pattern:
        unknown = sorted(set(pattern) - set(_NEMOTRON_H_PATTERN))
        if unknown:
            raise ModelInfoError(
                f"config.json hybrid_override_pattern has {', '.join(map(repr, unknown))}, "
                "which modelship cannot size (it knows M for Mamba, * for attention, - for MLP "
                "and E for MoE layers); fix config.json."
            )
        if len(pattern) != num_layers:
            raise ModelInfoError(
                f"config.json hybrid_override_pattern describes {len(pattern)} layers but "
                f"num_hidden_layers is {num_layers}; vLLM builds one layer per character, so fix "
                "num_hidden_layers (or the pattern) in config.json."
            )
        return [_NEMOTRON_H_PATTERN[char] for char in pattern]
    layer_types = config.get("layer_types", "layers_block_type")
    if isinstance(layer_types, list) and layer_types:
        if len(layer_types) != num_layers:
            raise ModelInfoError(
                f"config.json layer_types lists {len(layer_types)} layers but "
                f"num_hidden_layers is {num_layers}; fix config.json."
            )
        unknown = sorted({str(kind) for kind in layer_types if kind not in _LAYER_KINDS})
        if unknown:
            raise ModelInfoError(
                f"config.json layer_types has {', '.join(unknown)}, which modelship cannot size "
                f"(it knows {', '.join(sorted(_LAYER_KINDS))})."
            )
        listed: list[LayerKind] = [_LAYER_KINDS[kind] for kind in layer_types]
        if model_type == "nemotron_h":
            # transformers writes Nemotron-H's Mamba2 layers as linear_attention.
            listed = ["mamba" if kind == "linear_attention" else kind for kind in listed]
        if not window_layers:  # a sliding window as long as the context is full attention
            return ["full_attention" if k == "sliding_attention" else k for k in listed]
        return listed
    period, offset = config.get("attn_layer_period"), config.get("attn_layer_offset")
    if isinstance(period, int) and isinstance(offset, int) and period > 0:
        # Jamba: attention where layer % period == offset, Mamba elsewhere (JambaConfig).
        return ["full_attention" if i % period == offset else "mamba" for i in range(num_layers)]
    interval = config.get("full_attention_interval")
    if isinstance(interval, int) and interval > 0:
        # Qwen3-Next: full attention every interval-th layer, Gated DeltaNet in between.
        return [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention"
            for i in range(num_layers)
        ]
    kinds: list[LayerKind] = ["full_attention"] * num_layers
    if not window_layers:
        return kinds
    pattern = config.get("sliding_window_pattern")
    if config.get("model_type") == "gemma2":
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    if isinstance(pattern, int) and pattern > 0:
        # Gemma 3: every pattern-th layer is global (vLLM gemma3.py: (i + 1) % pattern).
        return [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(num_layers)
        ]
    if window_layers < num_layers:  # Qwen2 max_window_layers: the top layers slide
        full: list[LayerKind] = ["full_attention"] * (num_layers - window_layers)
        sliding: list[LayerKind] = ["sliding_attention"] * window_layers
        return full + sliding
    return ["sliding_attention"] * num_layers


def _recurrent_state_elements(
    config: _Config, hidden_size: int
) -> tuple[int, int, RecurrentMixer | None]:
    """(convolution, SSM) elements of one Mamba / linear-attention layer's state for one
    sequence, whole width, and the mixer that keeps it.

    The shapes are vLLM's MambaStateShapeCalculator (mamba_utils.py): a causal-convolution
    state of (kernel - 1) x conv_dim plus the SSM (or DeltaNet) state.
    """
    if config.get("linear_num_value_heads") is not None:  # Gated DeltaNet (Qwen3-Next)
        key_heads = config.positive_int("linear_num_key_heads") or 0
        value_heads = config.positive_int("linear_num_value_heads") or 0
        key_dim = config.positive_int("linear_key_head_dim") or 0
        value_dim = config.positive_int("linear_value_head_dim") or 0
        kernel = config.positive_int("linear_conv_kernel_dim") or 4
        conv_dim = 2 * key_heads * key_dim + value_heads * value_dim
        return (kernel - 1) * conv_dim, value_heads * key_dim * value_dim, "gated_deltanet"
    state = config.positive_int("mamba_d_state", "ssm_state_size", "state_size")
    if state is None:
        return 0, 0, None
    kernel = config.positive_int("mamba_d_conv", "conv_kernel") or 4
    heads = config.positive_int("mamba_n_heads", "mamba_num_heads")
    if heads is not None:  # Mamba2 (Granite 4, Bamba, Falcon-H1, Nemotron-H)
        if config.get("mamba_d_head") == "auto":  # Falcon-H1: the Mamba width over the heads
            width = config.positive_int("mamba_d_ssm") or (
                (config.positive_int("mamba_expand") or 2) * hidden_size
            )
            head_dim = width // heads
        else:
            head_dim = config.positive_int("mamba_d_head", "mamba_head_dim") or 64
        groups = config.positive_int("mamba_n_groups", "n_groups") or 1
        inner = heads * head_dim
        return (kernel - 1) * (inner + 2 * groups * state), heads * head_dim * state, "mamba2"
    expand = config.positive_int("mamba_expand", "expand") or 2  # Mamba1 (Jamba)
    inner = expand * hidden_size
    return (kernel - 1) * inner, inner * state, "mamba"


def _config_dtype(config: _Config, key: str = "torch_dtype") -> WeightDtype | None:
    value = config.get(key, "dtype") if key == "torch_dtype" else config.get(key)
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in _CONFIG_DTYPES:
        raise ModelInfoError(
            f"config.json {key} {value!r} is not a dtype modelship knows "
            f"({', '.join(sorted(_CONFIG_DTYPES))}); fix config.json."
        )
    return _CONFIG_DTYPES[name]


def _ssm_state_dtype(config: _Config) -> WeightDtype | None:
    """The dtype vLLM keeps the SSM state in when it is not the model's: Nemotron-H's
    mamba_ssm_cache_dtype, float32 when unsaid (vLLM models/config.py
    NemotronHForCausalLMConfig, applied while --mamba-ssm-cache-dtype is auto)."""
    if config.get("model_type") != "nemotron_h":
        return None
    return _config_dtype(config, "mamba_ssm_cache_dtype") or "fp32"


def model_info_from_config(
    config: Mapping[str, Any],
    *,
    weights: WeightsSummary | None,
    overrides: Architecture | None = None,
    parameters: int | None = None,
    files: list[str] | None = None,
) -> ModelInfo:
    """Build ModelInfo from a parsed config.json, the weights summary and spec overrides.

    `config` may be empty when spec.model.architecture covers every required field. `files`
    lists the package's files (relative paths) for the tokenizer and training-checkpoint
    checks; None means they could not be listed. Pure: reads nothing.
    """
    overrides = overrides or Architecture()
    cfg = _Config(config)
    warnings: list[str] = []

    required: dict[str, int] = {}
    missing: list[str] = []
    for field, (keys, spec_field) in _REQUIRED.items():
        value = getattr(overrides, field) or cfg.positive_int(*keys)
        if value is None:
            missing.append(f"{keys[0]} (spec.model.architecture.{spec_field})")
        else:
            required[field] = value
    if missing:
        where = "config.json has no" if config else "there is no config.json, so no"
        raise ModelInfoError(
            f"{where} {', '.join(missing)}; add the field to config.json or set it in "
            "spec.model.architecture."
        )
    num_layers = required["num_layers"]
    hidden_size = required["hidden_size"]
    heads = required["num_attention_heads"]
    max_positions = required["max_position_embeddings"]

    kv_lora_rank = overrides.kv_lora_rank or cfg.positive_int("kv_lora_rank")
    qk_rope_head_dim = None
    if kv_lora_rank is not None:
        qk_rope_head_dim = overrides.qk_rope_head_dim or cfg.positive_int("qk_rope_head_dim")
        if qk_rope_head_dim is None:
            raise ModelInfoError(
                "the model uses MLA (kv_lora_rank is set) but config.json has no "
                "qk_rope_head_dim; set spec.model.architecture.qkRopeHeadDim."
            )

    # attention_head_dim: Nemotron-H's name for it.
    head_dim = overrides.head_dim or cfg.positive_int("head_dim", "attention_head_dim")
    if head_dim is None and kv_lora_rank is not None and cfg.get("qk_nope_head_dim"):
        # MLA: a query/key head is its non-rotary plus its rotary part (DeepSeek: 128 + 64).
        head_dim = cfg.positive_int("qk_nope_head_dim") + qk_rope_head_dim  # type: ignore[operator]
    if head_dim is None:
        if hidden_size % heads:
            raise ModelInfoError(
                f"hidden_size {hidden_size} is not a multiple of num_attention_heads {heads} and "
                "config.json has no head_dim; set spec.model.architecture.headDim."
            )
        head_dim = hidden_size // heads

    kv_heads = (
        overrides.num_key_value_heads
        or cfg.positive_int("num_key_value_heads", "num_kv_heads")
        or heads
    )

    window, window_layers = _sliding_window(cfg, overrides, num_layers, max_positions)

    layer_kinds = _layer_kinds(cfg, num_layers, window_layers)
    recurrent = any(kind in STATE_KINDS for kind in layer_kinds)
    conv_elements, ssm_elements, mixer = (
        _recurrent_state_elements(cfg, hidden_size) if recurrent else (0, 0, None)
    )
    if recurrent and not ssm_elements:
        raise ModelInfoError(
            "config.json has Mamba or linear-attention layers but no state sizes "
            "(mamba_d_state / ssm_state_size, or linear_*_head_dim); fix config.json."
        )
    if window_layers:
        window_layers = sum(1 for kind in layer_kinds if kind == "sliding_attention")

    experts = overrides.num_experts or cfg.get(
        "num_local_experts", "n_routed_experts", "num_experts"
    )
    experts = experts if isinstance(experts, int) and experts > 0 else None
    experts_per_token = overrides.num_experts_per_token
    moe_intermediate_size = None
    if experts is not None:
        experts_per_token = experts_per_token or cfg.positive_int("num_experts_per_tok")
        moe_intermediate_size = cfg.positive_int("moe_intermediate_size")

    quantization = quantization_from_config(config)

    tied = cfg.get("tie_word_embeddings")
    if not isinstance(tied, bool):
        if weights is not None:
            tied = not weights.has_output_head
        else:
            tied = cfg.get("model_type") in _TIED_BY_DEFAULT

    config_dtype = _config_dtype(cfg)
    dtype: WeightDtype
    if weights is not None and weights.dtype is not None:
        dtype = weights.dtype
        if config_dtype not in (None, dtype) and quantization.name == "none":
            warnings.append(
                f"config.json says torch_dtype {config_dtype} but the weights are stored as "
                f"{dtype}; sizing uses the stored {dtype}."
            )
    elif quantization.name == "fp8":
        dtype = "fp8"
    elif config_dtype is not None:
        dtype = config_dtype
    else:
        dtype = "fp32"
        warnings.append(
            "config.json has no torch_dtype and no safetensors were read; assuming fp32, "
            "transformers' default for a config without torch_dtype."
        )

    if weights is not None:
        parameter_count = weights.parameters
        parameters_source = "safetensors"
        if parameters is not None and abs(parameters - parameter_count) > (
            PARAMETER_MISMATCH_RATIO * parameter_count
        ):
            warnings.append(
                f"spec.model.parameters is {parameters:,} but the safetensors headers count "
                f"{parameter_count:,} ({abs(parameters - parameter_count) / parameter_count:.0%} "
                "apart); using the counted value. Fix or remove spec.model.parameters."
            )
    elif parameters is not None:
        parameter_count = parameters
        parameters_source = "spec"
    else:
        raise ModelInfoError(
            "there are no *.safetensors weights to count parameters from; set "
            "spec.model.parameters (e.g. 8B), or --params on the command line."
        )

    has_tokenizer = None
    is_training_checkpoint = False
    if files is not None:
        top_level = {path for path in files if "/" not in path}
        # The same rule as the runtime's verify (operator/packagerules.py).
        has_tokenizer = find_tokenizer(top_level) is not None
        if not has_tokenizer:
            warnings.append(
                f"the package has no tokenizer ({TOKENIZER_RULE} next to config.json); vLLM "
                "will fail to start. Add the tokenizer files of the base model."
            )
        training_state = sorted(
            {
                part
                for path in files
                for part in PurePosixPath(path).parts
                if _TRAINING_STATE.match(part)
            }
        )
        if training_state:
            is_training_checkpoint = True
            warnings.append(
                f"this is a training checkpoint ({', '.join(training_state)}): only config, "
                "tokenizer and *.safetensors weights are used; optimizer, scheduler and RNG "
                "state and global_step*/ folders are skipped."
            )
        pickles = sorted(name for name in top_level if _PICKLE_WEIGHTS.match(name))
        if weights is None and pickles:
            warnings.append(
                f"the weights are pickle files ({', '.join(pickles[:3])}); their parameters "
                "cannot be counted without loading them, so spec.model.parameters is used. "
                "Convert them to safetensors, or set spec.model.trustPickle to serve them."
            )

    architectures = config.get("architectures")
    if config and not (isinstance(architectures, list) and architectures):
        warnings.append(
            "config.json has no architectures list; vLLM needs it to choose the model class."
        )
    return ModelInfo(
        architecture=str(architectures[0]) if architectures else "unknown",
        model_type=str(config.get("model_type") or "unknown"),
        parameters=parameter_count,
        parameters_source=parameters_source,
        dtype=dtype,
        quantization=quantization.name,
        quantization_method=quantization.method,
        quantization_group_size=quantization.group_size,
        quantization_block_size=list(quantization.block_size) if quantization.block_size else None,
        unquantized_modules=list(quantization.unquantized_modules),
        checkpoint_bytes=weights.checkpoint_bytes if weights is not None else None,
        num_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=overrides.intermediate_size
        or cfg.positive_int("intermediate_size", "ffn_hidden_size", "n_inner"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        vocab_size=required["vocab_size"],
        tie_word_embeddings=tied,
        sliding_window=window,
        sliding_window_layers=window_layers,
        layer_types=layer_kinds if layer_kinds.count("full_attention") != num_layers else [],
        recurrent_conv_elements=conv_elements,
        recurrent_ssm_elements=ssm_elements,
        recurrent_ssm_dtype=_ssm_state_dtype(cfg) if recurrent else None,
        recurrent_mixer=mixer,
        num_experts=experts,
        num_experts_per_token=experts_per_token if experts is not None else None,
        moe_intermediate_size=moe_intermediate_size,
        kv_lora_rank=kv_lora_rank,
        qk_rope_head_dim=qk_rope_head_dim,
        weight_files=list(weights.files) if weights is not None else [],
        has_tokenizer=has_tokenizer,
        is_training_checkpoint=is_training_checkpoint,
        warnings=warnings,
    )


# --- reading a package ------------------------------------------------------------------------


class ModelPackage(Protocol):
    """The files of one model package, wherever they live."""

    uri: str
    # Set by list_files where the store names each object's content (S3's ETags): two packages
    # with the same `version` hold the same bytes, so what was read of one holds for the other.
    version: str | None

    def list_files(self) -> dict[str, int]:
        """Every file, as path relative to the package root -> size in bytes."""
        ...

    def read_bytes(self, path: str) -> bytes:
        """A whole (small) file."""
        ...

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        """Up to `length` bytes from `offset`; fewer at the end of the file."""
        ...


class LocalPackage:
    """A model directory on a local (or mounted) file system."""

    def __init__(self, root: Path, uri: str | None = None) -> None:
        self.root = root
        self.uri = uri or f"file://{root}"
        self.version: str | None = None  # a file can change in place without its size

    def list_files(self) -> dict[str, int]:
        if not self.root.is_dir():
            raise ModelInfoError(
                f"{self.uri} is not a directory; check spec.model.uri points at the model folder."
            )
        files: dict[str, int] = {}
        for directory, _, names in os.walk(self.root, followlinks=True):
            for name in names:
                path = Path(directory, name)
                if path.is_file():  # follows the symlinks of a Hugging Face cache snapshot
                    files[path.relative_to(self.root).as_posix()] = path.stat().st_size
        return files

    def read_bytes(self, path: str) -> bytes:
        return (self.root / path).read_bytes()

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        with (self.root / path).open("rb") as file:
            file.seek(offset)
            return file.read(length)


def s3_client(endpoint_url: str | None = None) -> S3Client:
    """A boto3 S3 client for AWS or an S3-compatible store (endpoint or AWS_ENDPOINT_URL)."""
    import boto3
    from botocore.config import Config

    endpoint = (
        endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )
    config = Config(
        # S3-compatible stores may send the whole object's checksum on ranged GETs.
        response_checksum_validation="when_required",
        request_checksum_calculation="when_required",
        retries={"max_attempts": 5, "mode": "standard"},
        max_pool_connections=HEADER_READ_THREADS * 2,
    )
    return boto3.client("s3", endpoint_url=endpoint or None, config=config)


class S3Package:
    """Objects under an S3 prefix, read with GetObject (ranged for shard headers)."""

    def __init__(self, source: S3Source, client: S3Client) -> None:
        self.source = source
        self.client = client
        self.uri = source.uri
        self.version: str | None = None
        self._sizes: dict[str, int] = {}

    def _fail(self, action: str, error: Exception) -> ModelInfoError:
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            CredentialRetrievalError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        code = (
            error.response.get("Error", {}).get("Code", "")
            if isinstance(error, ClientError)
            else ""
        )
        status = (
            int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if isinstance(error, ClientError)
            else 0
        )
        unreachable = (
            EndpointConnectionError,
            ConnectTimeoutError,
            ReadTimeoutError,
            ConnectionClosedError,
            CredentialRetrievalError,
        )
        reason = f"{code or type(error).__name__}: {error}"
        if isinstance(error, unreachable) or code in _TRANSIENT_S3_CODES or status >= 500:
            return ModelUnreadableError(
                f"cannot {action} for now ({reason}); retrying with backoff.",
                reason,
                transient=True,
            )
        if isinstance(error, NoCredentialsError):
            return ModelUnreadableError(
                f"cannot {action}: the operator has no AWS credentials. Give its ServiceAccount "
                "an IAM role that may s3:ListBucket and s3:GetObject on the model bucket (Helm: "
                "serviceAccount.annotations eks.amazonaws.com/role-arn, or an EKS Pod Identity "
                "association; docs/storage.md).",
                reason,
            )
        fix = {
            "NoSuchBucket": f"bucket {self.source.bucket!r} does not exist; check spec.model.uri.",
            "AccessDenied": (
                f"give the operator's IAM role s3:ListBucket and s3:GetObject on "
                f"arn:aws:s3:::{self.source.bucket}/{self.source.prefix}*."
            ),
            "NoSuchKey": "the object is gone; check the upload is complete.",
        }.get(code, "check the endpoint, credentials and spec.model.uri.")
        return ModelUnreadableError(f"cannot {action} ({reason}); {fix}", reason)

    def list_files(self) -> dict[str, int]:
        from botocore.exceptions import BotoCoreError, ClientError

        files: dict[str, int] = {}
        listed: list[tuple[str, int, str]] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.source.bucket, Prefix=self.source.prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"]
                    if not key.endswith("/"):  # folder markers
                        files[key[len(self.source.prefix) :]] = item["Size"]
                        listed.append((key, item["Size"], str(item.get("ETag", ""))))
        except (BotoCoreError, ClientError) as error:
            raise self._fail(f"list {self.uri}", error) from None
        self._sizes = files
        # An object rewritten in place gets a new ETag; one without an ETag is never cached.
        if all(etag for _, _, etag in listed):
            endpoint = str(getattr(self.client.meta, "endpoint_url", ""))
            self.version = hashlib.sha256(
                json.dumps([endpoint, sorted(listed)]).encode()
            ).hexdigest()
        return files

    def read_bytes(self, path: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.get_object(
                Bucket=self.source.bucket, Key=self.source.prefix + path
            )
            return response["Body"].read()
        except (BotoCoreError, ClientError) as error:
            raise self._fail(f"read {self.uri}{path}", error) from None

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        size = self._sizes.get(path)
        if size is not None:
            length = min(length, size - offset)  # a range past the end is an error on S3
        if length <= 0:
            return b""
        try:
            response = self.client.get_object(
                Bucket=self.source.bucket,
                Key=self.source.prefix + path,
                Range=f"bytes={offset}-{offset + length - 1}",
            )
            return response["Body"].read()
        except (BotoCoreError, ClientError) as error:
            raise self._fail(
                f"read bytes {offset}-{offset + length - 1} of {self.uri}{path}", error
            ) from None


def _read_json(package: ModelPackage, path: str) -> dict[str, Any]:
    try:
        data = json.loads(package.read_bytes(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelInfoError(f"{path} is not valid JSON ({error}); fix or re-upload it.") from None
    if not isinstance(data, dict):
        raise ModelInfoError(f"{path} is not a JSON object; fix or re-upload it.")
    return data


def _weight_shards(package: ModelPackage, files: Mapping[str, int]) -> list[str]:
    """The shards the model loads: the index's, else the top-level *.safetensors."""
    if INDEX_FILE in files:
        weight_map = _read_json(package, INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelInfoError(f"{INDEX_FILE} has no weight_map; re-upload it.")
        shards = sorted({str(shard) for shard in weight_map.values()})
        missing = [shard for shard in shards if shard not in files]
        if missing:
            raise ModelInfoError(
                f"{INDEX_FILE} names {', '.join(missing)}, which the package does not have; "
                "upload the missing shards."
            )
        return shards
    shards = sorted(path for path in files if "/" not in path and path.endswith(".safetensors"))
    transformers_shards = [path for path in shards if not path.startswith("consolidated")]
    # Mistral repositories carry the same weights twice: consolidated.safetensors (native format).
    return transformers_shards or shards


def _read_weights(
    package: ModelPackage, files: Mapping[str, int], shards: list[str], bits: int | None
) -> WeightsSummary:
    def read(shard: str) -> dict[str, Any]:
        header, header_bytes = _read_header(
            lambda offset, length: package.read_range(shard, offset, length), shard
        )
        data_bytes = max(
            (entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
            default=0,
        )
        if 8 + header_bytes + data_bytes != files[shard]:
            raise ModelInfoError(
                f"{shard} is {files[shard]} bytes but its header describes "
                f"{8 + header_bytes + data_bytes}; the upload is incomplete or damaged, "
                "re-upload the shard."
            )
        return header

    with ThreadPoolExecutor(max_workers=min(HEADER_READ_THREADS, len(shards))) as pool:
        headers = dict(zip(shards, pool.map(read, shards), strict=True))
    return summarize_weights(headers, quantization_bits=bits)


# What was read of the packages last inspected (config.json, the weights summary), by package
# version: a thousand ModelDeployments of one model made at once read its headers once, and each
# later inspection costs the listing alone (for a 70B model of 30 shards, one request instead of
# 62).
_READ: Lru[str, tuple[dict[str, Any], WeightsSummary | None]] = Lru(64)


def _read_package(
    package: ModelPackage, files: Mapping[str, int]
) -> tuple[dict[str, Any], WeightsSummary | None]:
    """config.json and the weights summary, from the package or from an earlier read of the
    same version."""
    version = package.version
    read = _READ.get(version) if version else None
    if read is None:
        config = _read_json(package, CONFIG_FILE) if CONFIG_FILE in files else {}
        shards = _weight_shards(package, files)
        weights = None
        if shards:
            weights = _read_weights(package, files, shards, quantization_from_config(config).bits)
        read = (config, weights)
        if version:
            _READ.put(version, read)
    return read


def inspect_package(
    package: ModelPackage,
    *,
    overrides: Architecture | None = None,
    parameters: int | None = None,
) -> ModelInfo:
    """Inspect a model package: config.json, the shard index and each shard's header."""
    try:
        files = package.list_files()
        if not files:
            raise ModelInfoError("holds no files; check spec.model.uri.")
        config, weights = _read_package(package, files)
        return model_info_from_config(
            config, weights=weights, overrides=overrides, parameters=parameters, files=list(files)
        )
    except ModelUnreadableError as error:
        raise ModelUnreadableError(
            f"{package.uri}: {error}", error.reason, transient=error.transient
        ) from None
    except ModelInfoError as error:
        raise ModelInfoError(f"{package.uri}: {error}", transient=error.transient) from None
    except OSError as error:  # local and mounted files: permissions, vanished files
        raise ModelUnreadableError(
            f"{package.uri}: cannot read {error.filename or 'the package'} ({error.strerror}); "
            "check the path and its permissions.",
            f"{error.strerror}: {error.filename or 'the package'}",
        ) from None


def inspect_model(
    source: ModelSource,
    *,
    overrides: Architecture | None = None,
    parameters: int | None = None,
    endpoint_url: str | None = None,
    volume_root: Path | None = None,
    client: S3Client | None = None,
) -> ModelInfo:
    """What the model at `source` is, reading only metadata (never the weights).

    s3:// is read with GetObject (ranged for shard headers); file:// from disk; fsx:// and
    efs:// only through `volume_root`, a local path where the claim is mounted (the CLI and
    tests). Without it, spec.model.architecture.knownModel, or spec.model.parameters and the
    other spec.model.architecture fields, must say it all.
    """
    if isinstance(source, S3Source):
        package: ModelPackage = S3Package(source, client or s3_client(endpoint_url))
    elif isinstance(source, LocalSource):
        package = LocalPackage(Path(source.path), source.uri)
    elif volume_root is not None:
        package = LocalPackage(volume_root / source.path, source.uri)
    else:
        return _volume_from_spec(source, overrides, parameters)
    return inspect_package(package, overrides=overrides, parameters=parameters)


def model_info_from_known_model(
    known: KnownModel, *, overrides: Architecture | None, parameters: int | None, why: str
) -> ModelInfo:
    """ModelInfo from a known model's published config.json facts (operator/knownmodels.py);
    spec.model.architecture fields and spec.model.parameters still override them. `why` says,
    in the plan's warnings, why the model's own files were not read."""
    try:
        info = model_info_from_config(
            known.config,
            weights=None,
            overrides=overrides,
            parameters=parameters or known.parameters,
            files=None,
        )
    except ModelInfoError as error:
        raise ModelInfoError(f"known model {known.id}: {error}") from None
    warning = f"{why}; the plan uses the published config.json of {known.id} ({known.config_url})."
    return info.model_copy(update={"warnings": [*info.warnings, warning]})


def _volume_from_spec(
    source: VolumeSource, overrides: Architecture | None, parameters: int | None
) -> ModelInfo:
    why = f"{source.uri} was not read (the operator cannot mount {source.scheme})"
    if overrides is not None and overrides.known_model:
        from .knownmodels import get_known_model

        known = get_known_model(overrides.known_model)
        return model_info_from_known_model(
            known, overrides=overrides, parameters=parameters, why=why
        )
    try:
        info = model_info_from_config(
            {}, weights=None, overrides=overrides, parameters=parameters, files=None
        )
    except ModelInfoError as error:
        raise ModelUnreadableError(
            f"{source.uri}: the operator cannot read {source.scheme} volumes, so a model there "
            "needs spec.model.architecture.knownModel (a model `modelship models` lists), or "
            "spec.model.parameters and spec.model.architecture (numLayers, hiddenSize, "
            "numAttentionHeads, vocabSize, maxPositionEmbeddings, and numKeyValueHeads, headDim "
            f"where they differ from the defaults); or put it on S3 instead. ({error})",
            f"{source.scheme} volumes are not mounted here",
        ) from None
    return info.model_copy(
        update={
            "warnings": [
                *info.warnings,
                f"{why}; the plan rests on spec.model.parameters and spec.model.architecture "
                "alone.",
            ]
        }
    )
