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

--compile-only (Neuron; the operator's compile Job): after verifying, exit 0 at once when the
compile cache holds this model's key; else start vLLM (which compiles), publish the compiled
artifacts once it answers /health, stop it and exit 0 (status phase `compiled`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import boto3

from ..operator.source import S3Source, parse_source
from .fetch import DiskSpaceError, FetchReport, StreamReport, fetch_model, prepare_stream
from .launch import (
    KvCacheCapacity,
    KvCacheGauge,
    LaunchError,
    LaunchSpec,
    SupervisedProcess,
    VllmProcess,
    build_command,
)
from .metrics import RuntimeMetrics, start_metrics_server
from .multinode import (
    POLL_INTERVAL_SECONDS,
    RAY_PORT,
    RAY_STARTED_LINE,
    MultiNodeError,
    NodeCount,
    find_ray,
    leader_engine_args,
    node_probe_command,
    probe_nodes,
    ray_address,
    ray_head_command,
    ray_worker_command,
    resolve_leader_address,
    should_retry_join,
    wait_for_nodes,
)
from .neuron_cache import CacheKey, NeuronCache, NeuronCacheError, cache_key_for
from .nodecache import NodeCache, NodeCacheError, prove_access
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
        "--node-cache",
        type=Path,
        help="A directory every pod on the node shares (hostPath on local NVMe): the model is "
        "fetched once per node into a subdirectory named from --source (instead of --model-dir).",
    )
    option(
        "--node-cache-key",
        help="The model's directory name under --node-cache (render names it from the source, "
        "namespace and service account; the pod mounts only that directory).",
    )
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
    option(
        "--weights",
        default="land",
        choices=["land", "stream", "auto"],
        help="land: fetch the weights to disk (--model-dir or --node-cache), then vLLM loads "
        "them; stream: vLLM's runai_streamer reads the safetensors straight from S3 into memory "
        "(s3:// only; config and tokenizer are still fetched and verified); auto: stream an "
        "s3:// model when there is no --node-cache (nothing on the node would reuse a landed "
        "copy), else land.",
    )
    option(
        "--verify",
        default="checksum",
        choices=["checksum", "size"],
        help="How downloads are checked: checksum (the store's CRC64NVME/CRC32C/CRC32 or "
        "SHA-256 when it keeps one, else its MD5 ETag; the default) or size (what s5cmd and "
        "boto3 check).",
    )
    option("--neuron-cache", help="Neuron compile cache: s3://bucket/prefix or a volume path.")
    option(
        "--compile-only",
        action="store_true",
        help="Neuron: fetch and verify the model, compile it (vLLM starts once), publish the "
        "compiled artifacts to --neuron-cache and exit 0; exit 0 at once when the cache already "
        "holds them. The operator's compile Job runs this on an instance with the host memory.",
    )
    option(
        "--neuron-cache-required",
        action="store_true",
        help="Neuron: fail when --neuron-cache has no compiled artifacts for this model instead "
        "of compiling (a node with too little host memory to compile serves only what a compile "
        "Job put in the cache).",
    )
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
        "--role",
        choices=["leader", "worker"],
        help="Multi-node (LeaderWorkerSet) role: the leader runs the Ray head and vLLM, a worker "
        "joins the leader's Ray cluster. Unset: one node.",
    )
    option("--nodes", type=int, default=1, help="Nodes in the group, the leader included.")
    option(
        "--leader-address",
        help="Worker: the leader's host (default: $LWS_LEADER_ADDRESS, which LWS sets).",
    )
    option("--ray-port", type=int, default=RAY_PORT, help="The Ray head's port on the leader.")
    option(
        "--nodes-timeout-seconds",
        type=float,
        help="How long the leader waits for every node to join, and a worker for the head "
        "(default: --ready-timeout-seconds; workers fetch the weights first).",
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
    if args.model_dir is None and args.node_cache is None:
        parser.error("--model-dir or --node-cache is required (or MODELSHIP_RUNTIME_MODEL_DIR)")
    if args.model_dir is not None and args.node_cache is not None:
        parser.error(
            "--model-dir and --node-cache exclude each other: the node cache names the dir"
        )
    if args.role is not None and args.nodes < 2:
        parser.error(f"--role {args.role} needs --nodes 2 or more (the pods in the group)")
    if args.role is None and args.nodes != 1:
        parser.error(f"--nodes {args.nodes} needs --role leader or --role worker")
    needs_cache = [
        flag
        for flag, on in (
            ("--compile-only", args.compile_only),
            ("--neuron-cache-required", args.neuron_cache_required),
        )
        if on
    ]
    for flag in needs_cache:
        if args.device != "neuron" or not args.neuron_cache:
            parser.error(f"{flag} needs --device neuron and --neuron-cache (the compile cache)")
    if args.compile_only and args.role is not None:
        parser.error(
            "--compile-only compiles on one node; drop --role (each node compiles its own)"
        )
    if args.nodes_timeout_seconds is None:
        args.nodes_timeout_seconds = args.ready_timeout_seconds
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


def _fetch(
    args: argparse.Namespace, metrics: RuntimeMetrics, cache: NodeCache | None
) -> FetchReport:
    if cache is None:
        return _fetch_into(args, metrics, args.model_dir)
    with cache.fetching(args.source) as model_dir:
        source = parse_source(args.source, field="--source")
        if isinstance(source, S3Source):
            # What another pod cached is used only if this pod may read it itself.
            client = boto3.session.Session().client("s3", endpoint_url=args.s3_endpoint_url)
            prove_access(client, source.bucket, source.prefix, model_dir, log=log.info)
        try:
            return _fetch_into(args, metrics, model_dir)
        except DiskSpaceError as error:
            # Models no pod on this node uses any more make room, then one more try.
            if not cache.evict_unused(keep=model_dir, needed_bytes=error.needed_bytes):
                raise
            return _fetch_into(args, metrics, model_dir)


def _fetch_into(args: argparse.Namespace, metrics: RuntimeMetrics, model_dir: Path) -> FetchReport:
    return fetch_model(
        parse_source(args.source, field="--source"),
        model_dir,
        trust_pickle=args.trust_pickle,
        copy_to_local=args.copy_to_local,
        mount_root=args.mount_root,
        endpoint_url=args.s3_endpoint_url,
        max_connections=args.max_connections,
        metrics=metrics,
        verify_checksums=args.verify == "checksum",
    )


def weights_mode(args: argparse.Namespace) -> str:
    """`land` or `stream` for this pod: --weights, with `auto` resolved (see its help)."""
    if args.weights != "auto":
        return str(args.weights)
    is_s3 = str(args.source).startswith("s3://")
    return "stream" if is_s3 and args.node_cache is None and args.role is None else "land"


def _prepare_stream(args: argparse.Namespace, metrics: RuntimeMetrics) -> StreamReport:
    return prepare_stream(
        parse_source(args.source, field="--source"),
        args.model_dir,
        endpoint_url=args.s3_endpoint_url,
        max_connections=args.max_connections,
        metrics=metrics,
    )


def stream_command(command: Sequence[str], model_uri: str, tokenizer_dir: Path) -> list[str]:
    """vLLM's command line with the weights streamed from `model_uri` (runai_streamer) and the
    tokenizer read from the fetched, verified local copy."""
    streamed = list(command)
    for flag in ("--load-format", "--tokenizer"):
        if any(arg == flag or arg.startswith(flag + "=") for arg in streamed):
            raise LaunchError(
                f"engine args: {flag} is set by the runtime with --weights stream; remove it "
                "from the engine arguments after '--', or use --weights land."
            )
    streamed[streamed.index("--model") + 1] = model_uri
    return [*streamed, "--load-format", "runai_streamer", "--tokenizer", str(tokenizer_dir)]


def stream_environment(env: Mapping[str, str], endpoint_url: str | None) -> dict[str, str]:
    """What runai_streamer needs beyond the pod's AWS credentials: an S3-compatible endpoint
    is addressed by path, not by virtual host."""
    streamed = dict(env)
    if endpoint_url:
        streamed.setdefault("AWS_ENDPOINT_URL", endpoint_url)
        streamed.setdefault("RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "0")
    return streamed


def _exit_code(code: int) -> int:
    # A child killed by signal N reports -N; a shell would say 128 + N.
    return 128 - code if code < 0 else code


def _start_ray_head(args: argparse.Namespace) -> SupervisedProcess:
    head = SupervisedProcess(
        ray_head_command(find_ray(), args.ray_port), dict(os.environ), name="ray-head"
    )
    log.info("starting the Ray head: %s", shlex.join(head.command))
    head.start()
    return head


def _wait_for_workers(args: argparse.Namespace, head: SupervisedProcess) -> int:
    """Block until --nodes Ray nodes are alive; the head's exit or a signal ends the wait."""
    probe_command = node_probe_command()
    last_alive = -1

    def check() -> None:
        code = head.poll()
        if code is not None:
            raise MultiNodeError(
                f"the Ray head exited with code {code} before the group formed; its last lines:\n"
                + "\n".join(head.tail[-15:])
            )

    def on_progress(count: NodeCount) -> None:
        nonlocal last_alive
        if count.alive != last_alive:
            last_alive = count.alive
            log.info(
                "Ray cluster: %d of %d node(s) alive%s",
                count.alive,
                args.nodes,
                f" ({count.error})" if count.error else "",
            )

    return wait_for_nodes(
        args.nodes,
        lambda: probe_nodes(probe_command),
        timeout_seconds=args.nodes_timeout_seconds,
        check=check,
        on_progress=on_progress,
    )


def run(args: argparse.Namespace, engine_args: list[str], started: float) -> int:
    """The runtime's steps; returns the process exit code."""
    metrics = RuntimeMetrics()
    kv_gauge = KvCacheGauge(metrics.registry)
    status = StatusFile(args.status_file, {"started_at": time.time(), "source": args.source})
    if args.role is not None:
        status.update(role=args.role, nodes=args.nodes)
    if args.predicted_kv_cache_tokens is not None:
        kv_gauge.set_plan(args.predicted_kv_cache_tokens)
    start_metrics_server(args.metrics_port, metrics.registry, addr=args.metrics_host)
    log.info("metrics on http://%s:%d/metrics", args.metrics_host, args.metrics_port)

    # The child whose exit ends the runtime: vLLM, or on a worker its `ray start --block`.
    process: SupervisedProcess | None = None
    head: SupervisedProcess | None = None  # the leader's Ray head, stopped after vLLM
    joined = threading.Event()  # a worker's `ray start` printed RAY_STARTED_LINE

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if process is None:
            raise Stopped(signum)
        if process.stop_requested_at is None:
            log.info("received %s: stopping %s", signal.Signals(signum).name, process.name)
        process.request_stop(signum)

    def on_worker_line(line: str) -> None:
        if RAY_STARTED_LINE in line:
            joined.set()

    def start_worker(address: str) -> SupervisedProcess:
        worker = SupervisedProcess(
            ray_worker_command(find_ray(), address),
            dict(os.environ),
            name="ray-worker",
            on_line=on_worker_line,
        )
        log.info("joining the leader's Ray cluster: %s", shlex.join(worker.command))
        worker.start()
        status.update(ray_pid=worker.pid)
        return worker

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    step = "fetch"
    try:
        try:
            metrics.set_phase("fetching")
            status.update(phase="fetching")
            node_cache = (
                NodeCache(args.node_cache, log=log.info, key=args.node_cache_key)
                if args.node_cache
                else None
            )
            target = node_cache.model_dir(args.source) if node_cache else args.model_dir
            stream: StreamReport | None = None
            if weights_mode(args) == "stream":
                if args.model_dir is None:
                    raise VerifyError(
                        "--weights stream needs --model-dir for the config and tokenizer (a "
                        "node cache is for landed weights); pass --model-dir or --weights land."
                    )
                log.info(
                    "streaming the weights of %s; config and tokenizer into %s",
                    args.source,
                    args.model_dir,
                )
                stream = _prepare_stream(args, metrics)
                etags = {**stream.local.file_etags, **stream.weight_etags}
                report = replace(stream.local, file_etags=etags)
            else:
                log.info("fetching %s into %s", args.source, target)
                report = _fetch(args, metrics, node_cache)
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
            if stream is None:
                verified = verify_model_dir(model_dir, trust_pickle=args.trust_pickle)
                log.info(
                    "verified %s: %s, %d weight file(s), %d bytes of tensors",
                    model_dir,
                    verified.architecture,
                    len(verified.weight_files),
                    verified.weight_bytes,
                )
            else:
                # prepare_stream checked the package and every shard's header over S3.
                log.info(
                    "verified %s for streaming: %d safetensors shard(s), %d bytes of tensors",
                    stream.model_uri,
                    len(stream.weights),
                    stream.tensor_bytes,
                )

            metrics.set_phase("starting")
            status.update(phase="starting")
            if args.role == "worker":
                step = "join the Ray cluster"
                address = ray_address(
                    resolve_leader_address(args.leader_address, os.environ), args.ray_port
                )
                status.update(leader=address)
                process = start_worker(address)
            else:
                if args.role == "leader":
                    step = "form the Ray cluster"
                    engine_args = leader_engine_args(engine_args)
                    head = _start_ray_head(args)
                    status.update(ray_head_pid=head.pid)
                    alive = _wait_for_workers(args, head)
                    log.info("Ray cluster: all %d nodes alive", alive)
                    status.update(ray_nodes_alive=alive)
                step = "start"
                cache: NeuronCache | None
                cache_key: CacheKey | None
                if args.compile_only:
                    cache, cache_key = _neuron_cache_key(args, engine_args, report, model_dir)
                    if cache.exists(cache_key):
                        log.info(
                            "neuron cache already holds %s: nothing to compile",
                            cache.location(cache_key),
                        )
                        status.update(phase="compiled", neuron_cache=cache.location(cache_key))
                        return 0
                    step = "compile"
                    log.info("neuron cache miss: %s; compiling", cache.location(cache_key))
                else:
                    cache, cache_key = _restore_neuron_cache(args, engine_args, report, model_dir)
                vllm = _start_vllm(args, engine_args, model_dir, kv_gauge, status, stream)
                process = vllm
                vllm.wait_until_healthy(args.ready_timeout_seconds)
                if args.compile_only and cache is not None and cache_key is not None:
                    # vLLM answers /health once the compiled model is loaded: the artifacts are
                    # complete. A publish that fails fails the Job (it is the Job's whole work).
                    step = "publish the compile cache"
                    published = cache.publish(cache_key, args.neuron_artifacts_dir)
                    if not published and not cache.exists(cache_key):
                        raise NeuronCacheError(
                            f"vLLM wrote no compiled artifacts to {args.neuron_artifacts_dir}; "
                            "check that the image's vLLM runs on Neuron and honours "
                            "NEURON_COMPILED_ARTIFACTS"
                        )
                    log.info("compiled and published %s; stopping vLLM", cache.location(cache_key))
                    code = _exit_code(vllm.stop(grace_seconds=args.stop_grace_seconds))
                    status.update(phase="compiled", neuron_cache=cache.location(cache_key))
                    log.info("vLLM stopped with code %d after the compile", code)
                    return 0
                _mark_ready(args, metrics, status, started, vllm)
                if cache is not None and cache_key is not None:
                    _publish_neuron_cache(args, cache, cache_key)
        except Stopped as stop:
            log.info("received %s before vLLM started: exiting", signal.Signals(stop.signum).name)
            status.update(phase="stopped")
            return 128 + stop.signum
        except (
            VerifyError,
            LaunchError,
            NeuronCacheError,
            NodeCacheError,
            MultiNodeError,
        ) as error:
            if process is not None and process.stop_requested_at is not None:
                # vLLM ignores SIGTERM while its engine starts: after the grace period, SIGKILL.
                code = _exit_code(process.wait_after_stop(args.stop_grace_seconds))
                status.update(phase="stopped", exit_code=code)
                log.info("%s stopped with code %d before it was ready", process.name, code)
                return code
            return _fail(status, step, error, process)
        except Exception as error:
            return _fail(status, step, error, process)

        # Serving: wait for the child; after a forwarded SIGTERM it gets stop_grace_seconds.
        first_attempt_at = time.monotonic()
        while True:
            while process.poll() is None and process.stop_requested_at is None:
                if head is not None and head.poll() is not None:
                    head_exit = MultiNodeError(
                        f"the Ray head exited with code {head.poll()}; its last lines:\n"
                        + "\n".join(head.tail[-15:])
                    )
                    return _fail(status, "serve", head_exit, process)
                if joined.is_set() and status.data.get("phase") != "ready":
                    _mark_ready(args, metrics, status, started, process)
                time.sleep(0.2)
            if process.stop_requested_at is not None:
                break
            code = process.wait()
            if not (
                args.role == "worker"
                and not joined.is_set()
                and should_retry_join(
                    code, first_attempt_at, time.monotonic(), args.nodes_timeout_seconds
                )
            ):
                break
            # The head is not up yet (the leader is still fetching): try again, as vLLM's
            # multi-node-serving.sh does.
            log.info(
                "Ray worker could not join (code %d); retrying in %.0f s",
                code,
                POLL_INTERVAL_SECONDS,
            )
            deadline = time.monotonic() + POLL_INTERVAL_SECONDS
            while time.monotonic() < deadline and process.stop_requested_at is None:
                time.sleep(0.2)
            if process.stop_requested_at is not None:
                break
            process = start_worker(status.data["leader"])
        stopping = process.stop_requested_at is not None
        code = _exit_code(
            process.wait_after_stop(args.stop_grace_seconds) if stopping else process.wait()
        )
        status.update(phase="stopped" if stopping else "exited", exit_code=code)
        log.info("%s exited with code %d", process.name, code)
        return code
    finally:
        if head is not None and head.poll() is None:
            head.stop(grace_seconds=10)


def _neuron_cache_key(
    args: argparse.Namespace, engine_args: list[str], report: FetchReport, model_dir: Path
) -> tuple[NeuronCache, CacheKey]:
    """The compile cache and this model's key in it."""
    cache = NeuronCache(args.neuron_cache, endpoint_url=args.s3_endpoint_url)
    # Each weight file's ETag (or mtime, on a volume): two checkpoints with the same shapes
    # never share compiled artifacts.
    return cache, cache_key_for(model_dir, engine_args, etags=report.file_etags)


def _restore_neuron_cache(
    args: argparse.Namespace, engine_args: list[str], report: FetchReport, model_dir: Path
) -> tuple[NeuronCache | None, CacheKey | None]:
    """On Neuron with a cache: its key, and the compiled artifacts restored when present."""
    if args.device != "neuron" or not args.neuron_cache:
        return None, None
    cache, cache_key = _neuron_cache_key(args, engine_args, report, model_dir)
    if cache.restore(cache_key, args.neuron_artifacts_dir):
        log.info("neuron cache hit: %s", cache.location(cache_key))
    elif args.neuron_cache_required:
        raise NeuronCacheError(
            f"no compiled artifacts at {cache.location(cache_key)}, and this node has too little "
            "host memory to compile the model (--neuron-cache-required). The operator's compile "
            "Job publishes them: if the model, engine arguments or runtime image changed since it "
            "ran, delete the annotation modelship.dev/neuron-compiled from the ModelDeployment "
            "to compile again"
        )
    else:
        log.info("neuron cache miss: %s (vLLM will compile)", cache.location(cache_key))
    return cache, cache_key


def _publish_neuron_cache(args: argparse.Namespace, cache: NeuronCache, key: CacheKey) -> None:
    try:
        if cache.publish(key, args.neuron_artifacts_dir):
            log.info("neuron cache: published %s", cache.location(key))
    except (NeuronCacheError, OSError) as error:
        # Serving goes on; the next pod compiles again.
        log.warning("neuron cache: could not publish: %s", error)


def _start_vllm(
    args: argparse.Namespace,
    engine_args: list[str],
    model_dir: Path,
    kv_gauge: KvCacheGauge,
    status: StatusFile,
    stream: StreamReport | None = None,
) -> VllmProcess:
    """Start vLLM as a supervised child; its KV-cache line sets the engine gauge. With
    `stream`, vLLM streams the weights from S3 and reads config and tokenizer from `model_dir`."""

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
    if stream is None:
        process = VllmProcess(spec, on_kv_cache=on_kv_cache)
    else:
        process = VllmProcess(
            spec,
            on_kv_cache=on_kv_cache,
            command=stream_command(build_command(spec), stream.model_uri, model_dir),
            env=stream_environment(os.environ, args.s3_endpoint_url),
        )
    log.info("starting vLLM: %s", shlex.join(process.command))
    process.start()
    status.update(vllm_pid=process.pid)
    return process


def _mark_ready(
    args: argparse.Namespace,
    metrics: RuntimeMetrics,
    status: StatusFile,
    started: float,
    process: SupervisedProcess,
) -> None:
    time_to_ready = time.monotonic() - started
    metrics.time_to_ready_seconds.set(time_to_ready)
    metrics.set_phase("ready")
    status.update(phase="ready", time_to_ready_seconds=round(time_to_ready, 3))
    if isinstance(process, VllmProcess):
        log.info("ready: vLLM answers on port %d, %.1f s after start", args.port, time_to_ready)
    else:
        log.info("ready: joined the leader's Ray cluster %.1f s after start", time_to_ready)


def _fail(
    status: StatusFile, step: str, error: BaseException, process: SupervisedProcess | None
) -> int:
    message = f"{step} failed: {error}"
    if process is not None and process.poll() is None:
        process.stop(grace_seconds=10)
    status.update(phase="failed", error=message)
    log.error("error: %s", message)
    return 1


def local_command(
    *,
    source: str,
    model_dir: Path,
    served_model_name: str,
    port: int,
    metrics_port: int,
    status_file: Path,
    engine_args: Sequence[str],
    s3_endpoint_url: str | None = None,
    predicted_kv_cache_tokens: int | None = None,
    ready_timeout_seconds: float | None = None,
    weights: str | None = None,
) -> list[str]:
    """The runtime's command line on one machine (CPU, loopback): the demo, tests and benches."""
    command = [
        sys.executable, "-m", "modelship.runtime.main",
        "--source", source,
        "--model-dir", str(model_dir),
        "--served-model-name", served_model_name,
        "--device", "cpu",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--metrics-host", "127.0.0.1",
        "--metrics-port", str(metrics_port),
        "--status-file", str(status_file),
    ]  # fmt: skip
    if s3_endpoint_url is not None:
        command += ["--s3-endpoint-url", s3_endpoint_url]
    if predicted_kv_cache_tokens is not None:
        command += ["--predicted-kv-cache-tokens", str(predicted_kv_cache_tokens)]
    if ready_timeout_seconds is not None:
        command += ["--ready-timeout-seconds", str(ready_timeout_seconds)]
    if weights is not None:
        command += ["--weights", weights]
    return [*command, "--", *engine_args]


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
