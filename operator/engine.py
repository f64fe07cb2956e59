"""vLLM engine arguments as typed data, rendered to a command line in one place.

The sizing engine fills an `EngineArgs`; the runtime adds what only the pod knows (the model
directory, the port) and renders one `vllm serve` command line. A new flag is one field here
and one line in `to_argv`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Device = Literal["cuda", "neuron", "cpu"]


class EngineArgs(BaseModel):
    """The vLLM arguments a plan decides (per replica)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: Device = "cuda"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    quantization: str | None = None  # only for online quantization (fp8 from a 16-bit checkpoint)
    kv_cache_dtype: str = "auto"
    runner: Literal["generate", "pooling"] = "generate"
    enforce_eager: bool = False
    # Only from spec.model.trustRemoteCode; user engine arguments may not set it.
    trust_remote_code: bool = False
    # Generation defaults served when a request leaves them out (spec.serving.sampling).
    generation_defaults: dict[str, float | int] = Field(default_factory=dict)
    extra_args: tuple[str, ...] = ()

    def to_argv(
        self,
        *,
        model: str | None = None,
        served_model_name: str | None = None,
        host: str | None = None,
        port: int | None = None,
    ) -> list[str]:
        """Render the arguments of `vllm serve` (without the program name).

        Order matters: vLLM's argparse keeps the last value of a repeated option, so the extra
        (user) arguments come first, the plan's next and the pod's last; nothing a user writes
        can override the memory the plan reserved, even if it got past the checks.
        """
        argv: list[str] = [*self.extra_args]

        def flag(name: str, value: Any) -> None:
            if value is not None:
                argv.extend([name, str(value)])

        flag("--tensor-parallel-size", self.tensor_parallel_size)
        if self.pipeline_parallel_size > 1:
            flag("--pipeline-parallel-size", self.pipeline_parallel_size)
        flag("--max-model-len", self.max_model_len)
        flag("--max-num-seqs", self.max_num_seqs)
        flag("--max-num-batched-tokens", self.max_num_batched_tokens)
        flag("--gpu-memory-utilization", self.gpu_memory_utilization)
        if self.dtype != "auto":
            flag("--dtype", self.dtype)
        flag("--quantization", self.quantization)
        if self.kv_cache_dtype != "auto":
            flag("--kv-cache-dtype", self.kv_cache_dtype)
        if self.runner != "generate":
            flag("--runner", self.runner)
        if self.enforce_eager:
            argv.append("--enforce-eager")
        if self.trust_remote_code:
            argv.append("--trust-remote-code")
        if self.generation_defaults:
            # Applied on top of the checkpoint's generation_config.json: the spec's values win.
            flag(
                "--override-generation-config",
                json.dumps(self.generation_defaults, sort_keys=True, separators=(",", ":")),
            )
        flag("--model", model)
        flag("--served-model-name", served_model_name)
        flag("--host", host)
        flag("--port", port)
        return argv
