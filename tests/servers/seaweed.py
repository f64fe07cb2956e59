"""SeaweedFS (`weed mini`) as the S3-compatible store, started once per test session on
127.0.0.1, plus a fault-injecting HTTP proxy in front of it.

Fixtures:
    s3_server   the running server: endpoint_url, access_key, secret_key, region, bucket, client()
    s3_env      sets AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION for one test
                (test credentials only; never real ones)
    s3_proxy    a proxy in front of the server; `inject("status", 3, status=503)`,
                `inject("reset", 2)` or `inject("corrupt", 1)` make the next matching requests
                fail. Faults are cleared before and after each test.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import boto3
import pytest
from botocore.config import Config
from modelship.runtime import demo

ACCESS_KEY = "testkey"
SECRET_KEY = "testsecret"
REGION = "us-east-1"
BUCKET = "models"
HOST = "127.0.0.1"


@dataclass
class S3Server:
    """A running SeaweedFS S3 endpoint on loopback."""

    endpoint_url: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    bucket: str = BUCKET
    process: subprocess.Popen[bytes] | None = None
    data_dir: Path | None = None
    seaweed: demo.SeaweedServer | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment for a client of this server (test credentials only)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, endpoint_url: str | None = None) -> Any:
        """A boto3 S3 client for this server (or for a proxy in front of it)."""
        return boto3.session.Session(
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        ).client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            config=Config(
                response_checksum_validation="when_required",
                request_checksum_calculation="when_required",
                max_pool_connections=16,
            ),
        )


def start_seaweed(data_dir: Path, timeout_seconds: float = 60.0) -> S3Server:
    """Start `weed mini` on free loopback ports (runtime/demo.py's starter, the one the demo
    uses) with the test credentials, and wait until the bucket takes writes."""
    seaweed = demo.start_seaweed(
        data_dir,
        bucket=BUCKET,
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        ready_timeout_seconds=timeout_seconds,
    )
    return S3Server(
        endpoint_url=seaweed.endpoint_url,
        process=seaweed.process,
        data_dir=data_dir,
        seaweed=seaweed,
    )


def stop_seaweed(server: S3Server) -> None:
    """Stop the server process started by start_seaweed."""
    if server.seaweed is not None:
        server.seaweed.stop()


# --- fault-injecting proxy ----------------------------------------------------------------------

FaultKind = Literal["status", "reset", "corrupt"]


@dataclass
class Fault:
    """Answer the next `count` requests whose request line contains `match` badly."""

    kind: FaultKind
    count: int
    match: str = ""
    status: int = 503
    after_body_bytes: int = 65536  # for "reset": body bytes relayed before the reset


_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Slow Down", 504: "Timeout"}
_CODES = {500: "InternalError", 502: "BadGateway", 503: "SlowDown", 504: "GatewayTimeout"}


@dataclass
class FaultProxy:
    """A threaded HTTP/1.1 proxy on 127.0.0.1 that forwards to `upstream` one request per
    connection and misbehaves on command."""

    upstream_port: int
    port: int = 0
    faults: list[Fault] = field(default_factory=list)
    served_faults: dict[str, int] = field(default_factory=dict)
    requests_seen: int = 0
    request_lines: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _listener: socket.socket | None = None
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def inject(
        self,
        kind: FaultKind,
        count: int,
        *,
        match: str = "",
        status: int = 503,
        after_body_bytes: int = 65536,
    ) -> None:
        """Make the next `count` requests containing `match` in their request line fail."""
        with self.lock:
            self.faults.append(Fault(kind, count, match, status, after_body_bytes))

    def clear(self) -> None:
        """Forget every pending fault and the tallies."""
        with self.lock:
            self.faults.clear()
            self.served_faults.clear()
            self.requests_seen = 0
            self.request_lines.clear()

    def start(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="fault-proxy", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()
        if self._listener is not None:
            self._listener.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _take_fault(self, request_line: str) -> Fault | None:
        with self.lock:
            self.requests_seen += 1
            self.request_lines.append(request_line)
            for fault in self.faults:
                if fault.count > 0 and fault.match in request_line:
                    fault.count -= 1
                    self.served_faults[fault.kind] = self.served_faults.get(fault.kind, 0) + 1
                    return fault
        return None

    @staticmethod
    def _read_head(sock: socket.socket, buffered: bytes) -> tuple[bytes, bytes]:
        while b"\r\n\r\n" not in buffered:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before the end of the head")
            buffered += chunk
        head, _, rest = buffered.partition(b"\r\n\r\n")
        return head, rest

    @staticmethod
    def _with_connection_close(head: bytes) -> bytes:
        lines = [
            line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")
        ]
        return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            head, rest = self._read_head(client, b"")
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            while len(rest) < length:
                chunk = client.recv(65536)
                if not chunk:
                    return
                rest += chunk
            fault = self._take_fault(request_line)
            if fault is not None and fault.kind == "status":
                body = (
                    f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{_CODES[fault.status]}'
                    f"</Code><Message>injected by the test proxy</Message></Error>"
                ).encode()
                client.sendall(
                    f"HTTP/1.1 {fault.status} {_REASONS[fault.status]}\r\n"
                    f"Content-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n".encode()
                    + body
                )
                return
            upstream = socket.create_connection((HOST, self.upstream_port))
            upstream.sendall(self._with_connection_close(head) + rest)
            response_head, body_start = self._read_head(upstream, b"")
            client.sendall(self._with_connection_close(response_head))
            relayed = 0
            corrupted = False
            chunk = body_start
            while True:
                if chunk:
                    if fault is not None and fault.kind == "corrupt" and not corrupted:
                        # Flip one bit of the body: what a bad NIC or middlebox would do.
                        chunk = bytes([chunk[0] ^ 0x01]) + chunk[1:]
                        corrupted = True
                    if fault is not None and fault.kind == "reset":
                        allowed = fault.after_body_bytes - relayed
                        if len(chunk) >= allowed:
                            client.sendall(chunk[: max(0, allowed)])
                            # SO_LINGER 0: close with a TCP RST, a "connection reset by peer".
                            client.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                            )
                            return
                    client.sendall(chunk)
                    relayed += len(chunk)
                chunk = upstream.recv(1 << 20)
                if not chunk:
                    return
        except OSError:
            return
        finally:
            if upstream is not None:
                upstream.close()
            with contextlib.suppress(OSError):
                client.close()


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS on 127.0.0.1, once per session; bucket `models`, credentials testkey/testsecret."""
    base = tmp_path_factory.mktemp("seaweed")
    data_dir = base / "data"
    data_dir.mkdir()
    server = start_seaweed(data_dir)
    try:
        yield server
    finally:
        stop_seaweed(server)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point the standard AWS credential chain at the test server's credentials."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    return s3_server


@pytest.fixture(scope="session")
def _s3_proxy_session(s3_server: S3Server) -> Iterator[FaultProxy]:
    upstream_port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    proxy = FaultProxy(upstream_port=upstream_port)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def s3_proxy(_s3_proxy_session: FaultProxy) -> Iterator[FaultProxy]:
    """The fault-injecting proxy in front of `s3_server`, with no faults pending."""
    _s3_proxy_session.clear()
    try:
        yield _s3_proxy_session
    finally:
        _s3_proxy_session.clear()
