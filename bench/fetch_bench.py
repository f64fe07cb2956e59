"""Fetch throughput from a local SeaweedFS: modelship's fetch against the usual alternatives.

Datasets (generated, valid safetensors made of repeated random 64 MiB blocks, uploaded once):
    1 x 4 GiB  and  16 x 256 MiB

Methods, side by side in one run, N runs each, median MB/s (1 MB = 1e6 bytes):
    boto3 download_file with defaults; boto3 with TransferConfig(16 threads, 64 MiB parts);
    s5cmd cp; runai-model-streamer (Python API, CPU tensors, concurrency 4); modelship
    fetch_model; and the disk's write ceiling (dd with fdatasync).

    .venv/bin/python bench/fetch_bench.py [--runs 3] [--tune]

Needs about 2 x 8.3 GB of free disk for a moment (store + one download); cleans up after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3.s3.transfer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modelship.operator.source import parse_source  # noqa: E402
from modelship.runtime.fetch import fetch_model  # noqa: E402

from tests.servers.seaweed import S3Server, start_seaweed, stop_seaweed  # noqa: E402

MIB = 1024 * 1024
BLOCK_BYTES = 64 * MIB
CONFIG = json.dumps({"architectures": ["LlamaForCausalLM"]}).encode()
DATASETS = {"1 x 4 GiB": ("big/", 1, 4096 * MIB), "16 x 256 MiB": ("many/", 16, 256 * MIB)}


def safetensors_header(total_bytes: int) -> bytes:
    """A header for U8 tensors of one block each, filling a file of exactly `total_bytes`."""
    guess = 0
    for _ in range(3):  # the header's own size shifts the data size; converge on it
        data_bytes = total_bytes - 8 - guess
        tensors: dict[str, Any] = {}
        offset = 0
        index = 0
        while offset < data_bytes:
            size = min(BLOCK_BYTES, data_bytes - offset)
            tensors[f"layer.{index}.weight"] = {
                "dtype": "U8",
                "shape": [size],
                "data_offsets": [offset, offset + size],
            }
            offset += size
            index += 1
        raw = json.dumps(tensors).encode()
        raw += b" " * (-len(raw) % 8)
        guess = len(raw)
    return len(raw).to_bytes(8, "little") + raw


def upload_object(client: Any, key: str, total_bytes: int, block: bytes) -> None:
    """Multipart upload in uniform 64 MiB parts: header + repeated random block."""
    header = safetensors_header(total_bytes)
    upload_id = client.create_multipart_upload(Bucket="models", Key=key)["UploadId"]
    parts = []
    for number, start in enumerate(range(0, total_bytes, BLOCK_BYTES), start=1):
        size = min(BLOCK_BYTES, total_bytes - start)
        body = (header + block[: size - len(header)]) if start == 0 else block[:size]
        response = client.upload_part(
            Bucket="models", Key=key, UploadId=upload_id, PartNumber=number, Body=body
        )
        parts.append({"PartNumber": number, "ETag": response["ETag"]})
    client.complete_multipart_upload(
        Bucket="models", Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
    )


def upload_datasets(client: Any) -> None:
    block = os.urandom(MIB) * 64
    for prefix, count, size in DATASETS.values():
        client.put_object(Bucket="models", Key=prefix + "config.json", Body=CONFIG)
        for index in range(count):
            upload_object(client, f"{prefix}model-{index:05d}.safetensors", size, block)


def weight_keys(client: Any, prefix: str) -> list[str]:
    listing = client.list_objects_v2(Bucket="models", Prefix=prefix)["Contents"]
    return [item["Key"] for item in listing if item["Key"].endswith(".safetensors")]


def timed(function: Callable[[], Any]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


class Bench:
    def __init__(self, server: S3Server, work: Path) -> None:
        self.server = server
        self.work = work
        self.client = server.client()
        self.env = {**os.environ, **server.env}
        os.environ.update(server.env)

    def dest(self) -> Path:
        target = self.work / "dest"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        return target

    def boto3_default(self, prefix: str) -> None:
        target = self.dest()
        for key in weight_keys(self.client, prefix):
            self.client.download_file("models", key, str(target / Path(key).name))

    def boto3_tuned(self, prefix: str) -> None:
        target = self.dest()
        config = boto3.s3.transfer.TransferConfig(
            max_concurrency=16, multipart_chunksize=64 * MIB, multipart_threshold=64 * MIB
        )
        for key in weight_keys(self.client, prefix):
            self.client.download_file("models", key, str(target / Path(key).name), Config=config)

    def s5cmd(self, prefix: str) -> None:
        target = self.dest()
        subprocess.run(
            [
                str(Path(sys.prefix) / "bin" / "s5cmd"),
                "--endpoint-url",
                self.server.endpoint_url,
                "cp",
                f"s3://models/{prefix}*",
                f"{target}/",
            ],
            check=True,
            env=self.env,
            stdout=subprocess.DEVNULL,
        )

    def runai(self, prefix: str) -> None:
        script = (
            "import sys\n"
            "from runai_model_streamer import SafetensorsStreamer\n"
            "paths = sys.argv[1:]\n"
            "total = 0\n"
            "with SafetensorsStreamer() as streamer:\n"
            "    streamer.stream_files(paths)\n"
            "    for name, tensor in streamer.get_tensors():\n"
            "        total += tensor.numel() * tensor.element_size()\n"
            "print(total)\n"
        )
        paths = [f"s3://models/{key}" for key in weight_keys(self.client, prefix)]
        env = {
            **self.env,
            "AWS_ENDPOINT_URL": self.server.endpoint_url,
            "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
            "RUNAI_STREAMER_CONCURRENCY": "4",
        }
        result = subprocess.run(
            [sys.executable, "-c", script, *paths], env=env, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(
                result.stderr.strip().splitlines()[-1] if result.stderr else "failed"
            )

    def modelship(
        self, prefix: str, connections: int = 16, part_mib: int = 16, verify: bool = True
    ) -> None:
        fetch_model(
            parse_source(f"s3://models/{prefix}"),
            self.dest(),
            endpoint_url=self.server.endpoint_url,
            max_connections=connections,
            part_size_bytes=part_mib * MIB,
            progress_interval_seconds=3600,
            log=lambda line: None,
            verify_checksums=verify,
        )

    def modelship_size_only(self, prefix: str) -> None:
        self.modelship(prefix, verify=False)

    def dd(self, _prefix: str) -> None:
        target = self.dest()
        subprocess.run(
            [
                "dd",
                "if=/dev/zero",
                f"of={target / 'dd.bin'}",
                "bs=16M",
                "count=256",
                "conv=fdatasync",
            ],
            check=True,
            capture_output=True,
        )


def measure(
    method: Callable[[str], None], prefix: str, total_bytes: int, runs: int
) -> tuple[str, list[float]]:
    rates: list[float] = []
    for _ in range(runs):
        try:
            seconds = timed(lambda: method(prefix))
        except Exception as error:
            return f"error: {type(error).__name__}: {str(error)[:160]}", rates
        rates.append(total_bytes / seconds / 1e6)
    return f"{statistics.median(rates):.0f}", rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tune", action="store_true", help="also sweep connections x part size")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    need = 2 * sum(count * size for _, count, size in DATASETS.values()) + 1024 * MIB
    free = shutil.disk_usage(args.work).free
    if free < need:
        raise SystemExit(f"{args.work}: needs {need / 1e9:.1f} GB free, has {free / 1e9:.1f} GB")
    work = Path(tempfile.mkdtemp(prefix="fetch-bench-", dir=args.work))
    (work / "data").mkdir()
    server = start_seaweed(work / "data")
    try:
        bench = Bench(server, work)
        started = time.perf_counter()
        upload_datasets(bench.client)
        print(f"uploaded in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        methods: list[tuple[str, Callable[[str], None]]] = [
            ("boto3 download_file, defaults", bench.boto3_default),
            ("boto3 TransferConfig 16 threads, 64 MiB parts", bench.boto3_tuned),
            ("s5cmd cp", bench.s5cmd),
            ("runai-model-streamer, concurrency 4, CPU tensors", bench.runai),
            ("modelship fetch_model, 16 conn x 16 MiB, MD5 verified", bench.modelship),
            ("modelship fetch_model, 16 conn x 16 MiB, size only", bench.modelship_size_only),
            ("disk write ceiling: dd 4 GiB conv=fdatasync", bench.dd),
        ]
        rows: list[tuple[str, list[str]]] = []
        for name, method in methods:
            cells = []
            for label, (prefix, count, size) in DATASETS.items():
                total = count * size if method is not bench.dd else 4096 * MIB
                cell, rates = measure(method, prefix, total, args.runs)
                print(f"{name} | {label}: {cell} {[round(r) for r in rates]}", file=sys.stderr)
                cells.append(cell)
            rows.append((name, cells))
        print("| method | " + " | ".join(DATASETS) + " |")
        print("|---|" + "---|" * len(DATASETS))
        for name, cells in rows:
            print(f"| {name} | " + " | ".join(cells) + " |")
        if args.tune:
            print("\n| modelship connections x part MiB | " + " | ".join(DATASETS) + " |")
            print("|---|" + "---|" * len(DATASETS))
            for connections, part_mib in ((8, 16), (32, 16), (16, 8), (16, 32), (16, 64)):
                cells = []
                for prefix, count, size in DATASETS.values():
                    cell, _ = measure(
                        lambda p, c=connections, m=part_mib: bench.modelship(p, c, m),
                        prefix,
                        count * size,
                        max(1, args.runs - 1),
                    )
                    cells.append(cell)
                print(f"| {connections} x {part_mib} | " + " | ".join(cells) + " |", flush=True)
    finally:
        stop_seaweed(server)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
