"""The runtime pod's entry point: `modelship-runtime`.

    modelship-runtime --source s3://bucket/models/llama --model-dir /models/llama \\
        [--served-model-name llama] [--port 8000] [--metrics-port 9400] [--device cuda] \\
        -- <the plan's vLLM engine arguments>

Every option can also come from the environment as MODELSHIP_RUNTIME_<OPTION> (upper case,
dashes as underscores), e.g. MODELSHIP_RUNTIME_SOURCE; the engine arguments from
MODELSHIP_RUNTIME_ENGINE_ARGS (a JSON list, or a shell-quoted string). A command-line value wins.

Steps, each a phase on the `modelship_runtime_phase` gauge and in the status file:
fetching (the weights, into --model-dir), verifying (runtime/verify.py), starting (restore the
Neuron compile cache, launch vLLM as a supervised child: runtime/launch.py explains why a
child), ready (vLLM's /health answers; `modelship_runtime_time_to_ready_seconds` is set, the
Neuron cache is published). Then the runtime waits for vLLM and exits with its exit code,
forwarding SIGTERM and SIGINT to it. A failure ends with one plain `error:` line that names the
step and the fix, the status file's phase `failed`, and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from ..operator.source import parse_source
from .fetch import FetchReport, fetch_model
from .launch import KvCacheCapacity, KvCacheGauge, LaunchError, LaunchSpec, VllmProcess
from .metrics import RuntimeMetrics, start_metrics_server
from .neuron_cache import NeuronCache, NeuronCacheError, cache_key_for
from .verify import VerifyError, verify_model_dir

log = logging.getLogger("modelship.runtime")

ENV_PREFIX = "MODELSHIP_RUNTIME_"
DEFAULT_STATUS_FILE = "/tmp/modelship-runtime-status.json"


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived before vLLM was started."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _env_bool(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The runtime's options; defaults come from MODELSHIP_RUNTIME_* in `env`."""
    parser = argparse.ArgumentParser(
        prog="modelship-runtime",
        description="Fetch a model, verify it, and serve it with vLLM.",
        epilog="Engine arguments for vLLM go after '--'.",
    )

    def option(name: str, default: Any = None, **kwargs: Any) -> None:
        dest = name.lstrip("-").replace("-", "_")
        key = ENV_PREFIX + dest.upper()
        if key in env and env[key] != "":
            if kwargs.get("action") == "store_true":
                default = _env_bool(env[key])
            else:
                default = kwargs.get("type", str)(env[key])
        help_text = kwargs.pop("help", "")
        parser.add_argument(name, default=default, help=f"{help_text} [env {key}]", **kwargs)

    option(
        "--source",
        help="Model URL: s3://bucket/prefix, fsx://pvc/path, efs://pvc/path, file:///dir.",
    )
    option("--model-dir", type=Path, help="Local directory the model is fetched into.")
    option(
        "--served-model-name",
        help="Model name clients ask for (default: the last path component of --source).",
    )
    option("--host", default="0.0.0.0", help="Address vLLM listens on.")
    option("--port", type=int, default=8000, help="vLLM's OpenAI API port.")
    option("--metrics-host", default="0.0.0.0", help="Address of the runtime's metrics server.")
    option("--metrics-port", type=int, default=9400, help="The runtime's Prometheus port.")
    option("--device", default="cuda", choices=["cuda", "neuron", "cpu"], help="Accelerator.")
    option("--trust-pickle", action="store_true", help="Allow pickle weights (*.bin, *.pt).")
    option(
        "--copy-to-local",
        action="store_true",
        help="Copy a mounted FSx/EFS model to --model-dir instead of serving it in place.",
    )
    option(
        "--mount-root",
        type=Path,
        default=Path("/mnt/model-source"),
        help="Where FSx/EFS volumes are mounted.",
    )
    option("--s3-endpoint-url", help="S3 endpoint override (S3-compatible stores).")
    option("--max-connections", type=int, default=16, help="Parallel S3 ranged GETs.")
    option("--neuron-cache", help="Neuron compile cache: s3://bucket/prefix or a volume path.")
    option(
        "--neuron-artifacts-dir",
        type=Path,
        default=Path("/var/cache/modelship/neuron"),
        help="Local directory of compiled Neuron artifacts (NEURON_COMPILED_ARTIFACTS).",
    )
    option("--neuron-visible-cores", help="NEURON_RT_VISIBLE_CORES for vLLM, e.g. 0-1.")
    option("--cpu-kv-cache-gib", type=int, default=1, help="KV cache GiB on the CPU device.")
    option(
        "--predicted-kv-cache-tokens",
        type=int,
        help="The plan's KV-cache capacity, exported next to vLLM's real one.",
    )
    option(
        "--ready-timeout-seconds",
        type=float,
        default=3600.0,
        help="How long vLLM may take to answer /health (Neuron compilation included).",
    )
    option(
        "--stop-grace-seconds",
        type=float,
        default=30.0,
        help="After SIGTERM, how long vLLM may take to stop before it is killed.",
    )
    option(
        "--status-file",
        type=Path,
        default=Path(DEFAULT_STATUS_FILE),
        help="JSON file with the current phase and figures.",
    )
    return parser


def parse_args(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> tuple[argparse.Namespace, list[str]]:
    """(options, vLLM engine arguments) from argv and MODELSHIP_RUNTIME_* variables."""
    env = os.environ if env is None else env
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        argv, engine_args = argv[:split], argv[split + 1 :]
    else:
        raw = env.get(ENV_PREFIX + "ENGINE_ARGS", "").strip()
        engine_args = [str(a) for a in json.loads(raw)] if raw.startswith("[") else shlex.split(raw)
    parser = build_parser(env)
    args = parser.parse_args(argv)
    if not args.source:
        parser.error("--source is required (or MODELSHIP_RUNTIME_SOURCE)")
    if args.model_dir is None:
        parser.error("--model-dir is required (or MODELSHIP_RUNTIME_MODEL_DIR)")
    if not args.served_model_name:
        args.served_model_name = args.source.rstrip("/").rsplit("/", 1)[-1] or "model"
    return args, engine_args


@dataclass
class StatusFile:
    """The pod's progress as a small JSON file, rewritten atomically on every change."""

    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    def update(self, **values: Any) -> None:
        self.data.update(values, updated_at=time.time())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(temporary, self.path)


def _fetch(args: argparse.Namespace, metrics: RuntimeMetrics) -> FetchReport:
    return fetch_model(
        parse_source(args.source, field="--source"),
        args.model_dir,
        trust_pickle=args.trust_pickle,
        copy_to_local=args.copy_to_local,
        mount_root=args.mount_root,
        endpoint_url=args.s3_endpoint_url,
        max_connections=args.max_connections,
        metrics=metrics,
    )


def _exit_code(code: int) -> int:
    # A child killed by signal N reports -N; a shell would say 128 + N.
    return 128 - code if code < 0 else code


def run(args: argparse.Namespace, engine_args: list[str], started: float) -> int:
    """The runtime's steps; returns the process exit code."""
    metrics = RuntimeMetrics()
    kv_gauge = KvCacheGauge(metrics.registry)
    status = StatusFile(args.status_file, {"started_at": time.time(), "source": args.source})
    if args.predicted_kv_cache_tokens is not None:
        kv_gauge.set_plan(args.predicted_kv_cache_tokens)
    start_metrics_server(args.metrics_port, metrics.registry, addr=args.metrics_host)
    log.info("metrics on http://%s:%d/metrics", args.metrics_host, args.metrics_port)

    process: VllmProcess | None = None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if process is None:
            raise Stopped(signum)
        if process.stop_requested_at is None:
            log.info("received %s: stopping vLLM", signal.Signals(signum).name)
        process.request_stop(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    step = "fetch"
    try:
        metrics.set_phase("fetching")
        status.update(phase="fetching")
        log.info("fetching %s into %s", args.source, args.model_dir)
        report = _fetch(args, metrics)
        model_dir = Path(report.model_dir)
        fetch_summary = {
            "model_dir": str(model_dir),
            "bytes_fetched": report.bytes_fetched,
            "seconds": round(report.seconds, 3),
            "rate_bytes_per_second": round(report.rate_bytes_per_second),
            "cache_hits": report.cache_hits,
            "retries": report.retries,
            "files_skipped": len(report.skipped),
            "served_in_place": report.served_in_place,
        }
        log.info(
            "fetched %d bytes in %.2f s (%.1f MB/s), %d file(s) already local, %d retries",
            report.bytes_fetched,
            report.seconds,
            report.rate_bytes_per_second / 1e6,
            report.cache_hits,
            report.retries,
        )

        step = "verify"
        metrics.set_phase("verifying")
        status.update(phase="verifying", fetch=fetch_summary)
        verified = verify_model_dir(model_dir, trust_pickle=args.trust_pickle)
        log.info(
            "verified %s: %s, %d weight file(s), %d bytes of tensors",
            model_dir,
            verified.architecture,
            len(verified.weight_files),
            verified.weight_bytes,
        )

        step = "start"
        metrics.set_phase("starting")
        status.update(phase="starting")
        cache: NeuronCache | None = None
        cache_key = None
        if args.device == "neuron" and args.neuron_cache:
            cache = NeuronCache(args.neuron_cache, endpoint_url=args.s3_endpoint_url)
            cache_key = cache_key_for(model_dir, engine_args)
            if cache.restore(cache_key, args.neuron_artifacts_dir):
                log.info("neuron cache hit: %s", cache.location(cache_key))
            else:
                log.info("neuron cache miss: %s (vLLM will compile)", cache.location(cache_key))

        def on_kv_cache(capacity: KvCacheCapacity) -> None:
            kv_gauge.set_engine(capacity.tokens)
            status.update(kv_cache_tokens=capacity.tokens)
            log.info(
                "vLLM KV cache: %d tokens (plan predicted %s)",
                capacity.tokens,
                args.predicted_kv_cache_tokens,
            )

        spec = LaunchSpec(
            model_dir=model_dir,
            served_model_name=args.served_model_name,
            engine_args=engine_args,
            device=args.device,
            host=args.host,
            port=args.port,
            neuron_compiled_artifacts=args.neuron_artifacts_dir,
            neuron_visible_cores=args.neuron_visible_cores,
            cpu_kv_cache_gib=args.cpu_kv_cache_gib,
        )
        process = VllmProcess(spec, on_kv_cache=on_kv_cache)
        log.info("starting vLLM: %s", shlex.join(process.command))
        process.start()
        status.update(vllm_pid=process.pid)
        process.wait_until_healthy(args.ready_timeout_seconds)

        time_to_ready = time.monotonic() - started
        metrics.time_to_ready_seconds.set(time_to_ready)
        metrics.set_phase("ready")
        status.update(phase="ready", time_to_ready_seconds=round(time_to_ready, 3))
        log.info("ready: vLLM answers on port %d, %.1f s after start", args.port, time_to_ready)

        if cache is not None and cache_key is not None:
            try:
                if cache.publish(cache_key, args.neuron_artifacts_dir):
                    log.info("neuron cache: published %s", cache.location(cache_key))
            except (NeuronCacheError, OSError) as error:
                # Serving goes on; the next pod compiles again.
                log.warning("neuron cache: could not publish: %s", error)
    except Stopped as stop:
        log.info("received %s before vLLM started: exiting", signal.Signals(stop.signum).name)
        status.update(phase="stopped")
        return 128 + stop.signum
    except (VerifyError, LaunchError, NeuronCacheError) as error:
        if process is not None and process.stop_requested_at is not None:
            # vLLM ignores SIGTERM while its engine starts: after the grace period, SIGKILL.
            code = _exit_code(process.wait_after_stop(args.stop_grace_seconds))
            status.update(phase="stopped", exit_code=code)
            log.info("vLLM stopped with code %d before it was ready", code)
            return code
        return _fail(status, step, error, process)
    except Exception as error:
        return _fail(status, step, error, process)

    # Serving: wait for vLLM; after a forwarded SIGTERM it gets stop_grace_seconds, then SIGKILL.
    while process.poll() is None:
        if process.stop_requested_at is not None:
            break
        time.sleep(0.2)
    stopping = process.stop_requested_at is not None
    code = _exit_code(
        process.wait_after_stop(args.stop_grace_seconds) if stopping else process.wait()
    )
    status.update(phase="stopped" if stopping else "exited", exit_code=code)
    log.info("vLLM exited with code %d", code)
    return code


def _fail(status: StatusFile, step: str, error: BaseException, process: VllmProcess | None) -> int:
    message = f"{step} failed: {error}"
    if process is not None and process.poll() is None:
        process.stop(grace_seconds=10)
    status.update(phase="failed", error=message)
    log.error("error: %s", message)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Console script `modelship-runtime` (and `modelship runtime`)."""
    started = time.monotonic()
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s modelship-runtime %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    args, engine_args = parse_args(argv)
    return run(args, engine_args, started)


if __name__ == "__main__":
    sys.exit(main())
