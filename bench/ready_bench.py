"""Time to ready: the runtime against bare vLLM, on the tiny model from a local directory.

For each run, from process start: seconds until /health answers 200 (ready) and until the
first token of a 1-token completion comes back (first token). `runtime` is
`python -m modelship.runtime.main --source file://DIR ... --device cpu -- <engine args>`
(fetch, verify, launch and supervise vLLM); `bare` is
`python -m vllm.entrypoints.openai.api_server --model DIR` with the same engine arguments and
environment. Runs alternate (bare, runtime, bare, ...) so a busy neighbour hurts both alike.

    .venv/bin/python bench/ready_bench.py --runs 3 [--json out.json]

Takes about 70 s per start on a 2-core machine (vLLM's own start-up dominates).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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

from modelship.runtime.demo import free_port
from modelship.runtime.main import local_command
from modelship.runtime.tinymodel import build_tiny_model

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


def one_run(kind: str, model_dir: Path, workdir: Path, timeout_seconds: float) -> dict[str, Any]:
    port = free_port()
    if kind == "bare":
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
            env={**os.environ, **CPU_ENV},
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
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ready-bench-") as scratch:
        workdir = Path(scratch)
        model_dir = build_tiny_model(workdir / "model")
        for run in range(args.runs):
            for kind in kinds:
                result = one_run(kind, model_dir, workdir, args.timeout_seconds)
                result["run"] = run + 1
                results.append(result)
                print(json.dumps(result), flush=True)
    summary: dict[str, Any] = {}
    for kind in kinds:
        ready = [r["ready_seconds"] for r in results if r["kind"] == kind]
        first = [r["first_token_seconds"] for r in results if r["kind"] == kind]
        summary[kind] = {
            "ready_median_seconds": statistics.median(ready),
            "first_token_median_seconds": statistics.median(first),
            "first_token_runs_seconds": [round(v, 2) for v in first],
        }
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
