"""Time to ready: the runtime against bare vLLM (tiny model, local directory), and weights
landed on disk against weights streamed into the engine (a model of a few GB, from S3).

For each run, from process start: seconds until /health answers 200 (ready) and until the
first token of a 1-token completion comes back (first token). `runtime` is
`python -m modelship.runtime.main --source file://DIR ... --device cpu -- <engine args>`
(fetch, verify, launch and supervise vLLM); `bare` is
`python -m vllm.entrypoints.openai.api_server --model DIR` with the same engine arguments and
environment. Runs alternate (bare, runtime, bare, ...) so a busy neighbour hurts both alike.

    .venv/bin/python bench/ready_bench.py --runs 3 [--json out.json]

Takes about 70 s per start on a 2-core machine (vLLM's own start-up dominates).

Stream vs land (`--kinds landed,streamed --model-gib 2`): a Llama-architecture model of random
bf16 weights of about --model-gib GiB (the tiny model's tokenizer, built offline), uploaded
to SeaweedFS on loopback. *landed*: the runtime with `--weights land` (fetch into an empty
--model-dir, flushed and checksum-verified, then vLLM loads from disk); *streamed*: the runtime
with `--weights stream` (config and tokenizer fetched, shard headers checked, vLLM loads with
`--load-format runai_streamer` from s3://). Every run starts from an empty model directory
(a cold node); the runs alternate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # appended: the repo's operator/ must not shadow the stdlib's

from modelship.runtime.demo import free_port  # noqa: E402
from modelship.runtime.main import local_command  # noqa: E402
from modelship.runtime.tinymodel import build_tiny_model  # noqa: E402

from tests.servers.seaweed import S3Server, start_seaweed, stop_seaweed  # noqa: E402

ENGINE_ARGS = ["--dtype", "bfloat16", "--max-model-len", "1024"]
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "auto"}
SERVED = "tiny"


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _first_token(port: int) -> None:
    body = json.dumps({"model": SERVED, "prompt": "Hello", "max_tokens": 1}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.load(response)
    if answer["usage"]["completion_tokens"] < 1:
        raise RuntimeError(f"no token came back: {answer}")


def build_model_of_gib(directory: Path, gib: float, *, num_shards: int = 2) -> Path:
    """A Llama-architecture model of about `gib` GiB of random bf16 weights, sharded, with the
    tiny model's tokenizer: hidden 2048, GQA 16/4 heads, intermediate 5632, vocabulary 32000,
    as many layers as the size asks for."""
    import numpy as np
    import safetensors

    build_tiny_model(directory)
    (directory / "model.safetensors").unlink()
    hidden, intermediate, vocab, heads, kv_heads = 2048, 5632, 32000, 16, 4
    head_dim = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * kv_heads * head_dim * hidden + 3 * intermediate * hidden
    layers = max(1, round((gib * 2**30 / 2 - 2 * vocab * hidden) / per_layer))
    config = json.loads((directory / "config.json").read_text())
    config.update(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
    )
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    rng = np.random.default_rng(0)
    # Random bf16 bit patterns of N(0, 0.02): one block, tiled (building 1e9 values is slow).
    block = (rng.normal(0, 0.02, 1 << 22).astype(np.float32).view(np.uint32) >> 16).astype(
        np.uint16
    )

    def tensor(*shape: int) -> Any:
        return np.resize(block, shape)

    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        shapes[prefix + "self_attn.q_proj.weight"] = (hidden, hidden)
        shapes[prefix + "self_attn.k_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[prefix + "self_attn.v_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[prefix + "self_attn.o_proj.weight"] = (hidden, hidden)
        shapes[prefix + "mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[prefix + "mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[prefix + "mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[prefix + "input_layernorm.weight"] = (hidden,)
        shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    names = list(shapes)
    weight_map = {}
    for index in range(num_shards):
        shard = f"model-{index + 1:05d}-of-{num_shards:05d}.safetensors"
        members = names[index::num_shards]
        arrays = {name: tensor(*shapes[name]) for name in members}
        specs = {
            name: safetensors.TensorSpec(
                dtype="bfloat16",
                shape=list(array.shape),
                data_ptr=array.ctypes.data,
                data_len=array.nbytes,
            )
            for name, array in arrays.items()
        }
        safetensors.serialize_file(specs, str(directory / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(members, shard))
    total = sum(2 * int(np.prod(shape)) for shape in shapes.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return directory


def upload_model(server: S3Server, directory: Path, prefix: str) -> None:
    client = server.client()
    for path in sorted(directory.iterdir()):
        # boto3's managed upload, as users upload: multipart for the shards.
        client.upload_file(str(path), server.bucket, prefix + path.name)


def one_run(
    kind: str,
    model_dir: Path,
    workdir: Path,
    timeout_seconds: float,
    server: S3Server | None = None,
    prefix: str = "",
) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ, **CPU_ENV}
    if kind in ("landed", "streamed"):
        assert server is not None
        target = workdir / f"pod-{port}"
        command = local_command(
            source=f"s3://{server.bucket}/{prefix}",
            model_dir=target,
            served_model_name=SERVED,
            port=port,
            metrics_port=free_port(),
            status_file=workdir / f"status-{port}.json",
            engine_args=ENGINE_ARGS,
            s3_endpoint_url=server.endpoint_url,
            weights="land" if kind == "landed" else "stream",
        )
        env.update(server.env, AWS_REGION=server.region, RUNAI_STREAMER_CONCURRENCY="4")
    elif kind == "bare":
        command = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            "--served-model-name",
            SERVED,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *ENGINE_ARGS,
        ]
    else:
        command = local_command(
            source=f"file://{model_dir}",
            model_dir=workdir / f"pod-{port}",
            served_model_name=SERVED,
            port=port,
            metrics_port=free_port(),
            status_file=workdir / f"status-{port}.json",
            engine_args=ENGINE_ARGS,
        )
    log_path = workdir / f"{kind}-{port}.log"
    started = time.monotonic()
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        while not _healthy(port):
            if process.poll() is not None:
                raise RuntimeError(f"{kind} exited with {process.returncode}; see {log_path}")
            if time.monotonic() - started > timeout_seconds:
                raise RuntimeError(f"{kind} not ready in {timeout_seconds} s; see {log_path}")
            time.sleep(0.1)
        ready_seconds = time.monotonic() - started
        _first_token(port)
        first_token_seconds = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # Nothing of this run may outlive it (engine-core workers included).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    return {
        "kind": kind,
        "ready_seconds": ready_seconds,
        "first_token_seconds": first_token_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kinds", default="bare,runtime")
    parser.add_argument("--timeout-seconds", type=float, default=600)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--model-gib", type=float, default=2.0, help="model size for landed/streamed"
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ready-bench-", dir=args.work) as scratch:
        workdir = Path(scratch)
        model_dir = build_tiny_model(workdir / "model")
        server: S3Server | None = None
        prefix = "big-model/"
        try:
            if {"landed", "streamed"} & set(kinds):
                big = build_model_of_gib(workdir / "big-model", args.model_gib)
                server = start_seaweed(workdir / "seaweed")
                upload_model(server, big, prefix)
                size = sum(p.stat().st_size for p in big.glob("*.safetensors"))
                print(json.dumps({"model_bytes": size}), flush=True)
                shutil.rmtree(big)
            for run in range(args.runs):
                for kind in kinds:
                    result = one_run(kind, model_dir, workdir, args.timeout_seconds, server, prefix)
                    result["run"] = run + 1
                    results.append(result)
                    print(json.dumps(result), flush=True)
                    for pod in workdir.glob("pod-*"):
                        shutil.rmtree(pod, ignore_errors=True)  # every run starts cold
        finally:
            if server is not None:
                stop_seaweed(server)
    summary: dict[str, Any] = {}
    for kind in kinds:
        ready = [r["ready_seconds"] for r in results if r["kind"] == kind]
        first = [r["first_token_seconds"] for r in results if r["kind"] == kind]
        summary[kind] = {
            "ready_median_seconds": statistics.median(ready),
            "first_token_median_seconds": statistics.median(first),
            "first_token_runs_seconds": [round(v, 2) for v in first],
        }
    if "landed" in summary and "streamed" in summary:
        landed = summary["landed"]["first_token_median_seconds"]
        summary["streamed_vs_landed"] = summary["streamed"]["first_token_median_seconds"] / landed
    if "bare" in summary and "runtime" in summary:
        bare = summary["bare"]["first_token_median_seconds"]
        overhead = summary["runtime"]["first_token_median_seconds"] - bare
        summary["runtime_overhead_seconds"] = overhead
        summary["runtime_overhead_percent"] = 100 * overhead / bare
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
