"""How long inspecting a model over S3 takes, and how many bytes it reads.

Uploads sharded packages to a local SeaweedFS (`weed mini` on 127.0.0.1, started here the way
tests/servers/seaweed.py does) and times inspect_model over S3 and on local disk. Shards carry
realistic headers (hundreds of tensors each) over sparse zero data, so uploads stay cheap.

    .venv/bin/python -m bench.modelinfo_bench
"""

from __future__ import annotations

import json
import statistics
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

from modelship.operator import modelinfo
from modelship.operator.modelinfo import inspect_model
from modelship.operator.source import parse_source

from tests.servers.seaweed import start_seaweed, stop_seaweed
from tests.unit.configs import DEEPSEEK_V3, LLAMA_3_70B

TENSOR_BYTES = 2048  # [32, 32] bf16: small shards keep the upload cheap; headers are full-size


def write_shard(path: Path, first: int, count: int) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for i in range(count):
        name = f"model.layers.{(first + i) // 16}.mlp.experts.{(first + i) % 16}.up_proj.weight"
        offsets = [i * TENSOR_BYTES, (i + 1) * TENSOR_BYTES]
        header[name] = {"dtype": "BF16", "shape": [32, 32], "data_offsets": offsets}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as file:
        file.write(struct.pack("<Q", len(raw)) + raw)
        file.truncate(8 + len(raw) + count * TENSOR_BYTES)


def build(root: Path, config: dict[str, Any], shards: int, tensors_per_shard: int) -> None:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    (root / "tokenizer.json").write_text("{}")
    weight_map = {}
    for number in range(1, shards + 1):
        name = f"model-{number:05d}-of-{shards:05d}.safetensors"
        write_shard(root / name, (number - 1) * tensors_per_shard, tensors_per_shard)
        weight_map[name.removesuffix(".safetensors")] = name
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "data").mkdir()
        server = start_seaweed(base / "data")
        try:
            client = server.client()
            layouts = [
                ("30 shards x 24 tensors (Llama-3-70B layout)", LLAMA_3_70B, 30, 24),
                ("163 shards x 560 tensors (DeepSeek-V3 layout)", DEEPSEEK_V3, 163, 560),
            ]
            for label, config, shards, per_shard in layouts:
                root = base / f"pkg{shards}"
                build(root, config, shards, per_shard)
                for path in sorted(root.iterdir()):
                    client.upload_file(str(path), server.bucket, f"bench/{root.name}/{path.name}")
                read: list[int] = []

                def count(http_response: Any, _read: list[int] = read, **_: Any) -> None:
                    _read.append(int(http_response.headers.get("content-length", 0)))

                client.meta.events.register("after-call.s3.GetObject", count)
                header_bytes = sum(
                    8 + struct.unpack("<Q", p.open("rb").read(8))[0]
                    for p in root.glob("*.safetensors")
                )
                print(f"{label}: headers {header_bytes / 1e6:.2f} MB in all")
                for probe_bytes in (1 << 20, 256 << 10, 64 << 10):
                    # The probe size is a module constant; the bench compares a few.
                    modelinfo.HEADER_PROBE_BYTES = probe_bytes
                    s3_seconds, local_seconds = [], []
                    for _ in range(5):
                        read.clear()
                        start = time.perf_counter()
                        uri = f"s3://{server.bucket}/bench/{root.name}"
                        inspect_model(parse_source(uri), client=client)
                        s3_seconds.append(time.perf_counter() - start)
                        start = time.perf_counter()
                        inspect_model(parse_source(f"file://{root}"))
                        local_seconds.append(time.perf_counter() - start)
                    print(
                        f"  probe {probe_bytes >> 10} KiB: read over S3 {sum(read) / 1e6:.1f} MB "
                        f"in {len(read)} GETs; S3 median "
                        f"{statistics.median(s3_seconds) * 1000:.0f} ms "
                        f"(min {min(s3_seconds) * 1000:.0f}), local median "
                        f"{statistics.median(local_seconds) * 1000:.0f} ms"
                    )
                client.meta.events.unregister("after-call.s3.GetObject", count)
        finally:
            stop_seaweed(server)


if __name__ == "__main__":
    main()
