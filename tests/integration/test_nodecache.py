"""One download per node (runtime/nodecache.py): pods sharing the node's model directory, against
the real SeaweedFS server, with real processes and real flocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from modelship.runtime.fetch import DiskSpaceError, FetchReport
from modelship.runtime.main import _fetch, _fetch_into, parse_args
from modelship.runtime.metrics import RuntimeMetrics
from modelship.runtime.nodecache import NodeCache, model_key

from tests.integration.test_fetch_s3 import CONFIG, MIB, new_prefix, tiny_tmpfs, upload
from tests.servers.seaweed import S3Server

pytestmark = pytest.mark.integration

__all__ = ["tiny_tmpfs"]  # the fixture, shared with the fetch tests


def runtime_args(server: S3Server, prefix: str, root: Path) -> list[str]:
    return [
        "--source",
        f"s3://models/{prefix}",
        "--node-cache",
        str(root),
        "--s3-endpoint-url",
        server.endpoint_url,
    ]


def fetch_as_a_pod(server: S3Server, prefix: str, root: Path, cache: NodeCache) -> FetchReport:
    args, _ = parse_args(runtime_args(server, prefix, root), env={})
    return _fetch(args, RuntimeMetrics(), cache)


def test_model_key_is_readable_unique_and_safe() -> None:
    key = model_key("s3://models/meta-llama/Llama-3.1-8B/")
    assert key.startswith("models-meta-llama-Llama-3.1-8B-")
    assert key == model_key("s3://models/meta-llama/Llama-3.1-8B/")
    assert key != model_key("s3://models/meta-llama/Llama-3.1-8B-Instruct/")
    for uri in ("s3://b/../../etc", "fsx://claim/..", "s3://b/" + "x" * 300):
        name = model_key(uri)
        assert "/" not in name and not name.startswith(".") and len(name) <= 73


def test_second_pod_waits_for_the_first_and_downloads_nothing(
    s3_env: S3Server, tmp_path: Path
) -> None:
    prefix = new_prefix()
    shards = {f"model-{i:05d}-of-00004.safetensors": os.urandom(2 * MIB) for i in range(4)}
    upload(s3_env.client(), prefix, {"config.json": CONFIG, **shards})
    model_bytes = len(CONFIG) + sum(len(body) for body in shards.values())
    root = tmp_path / "node-cache"
    first = NodeCache(root, log=lambda line: None)
    script = (
        "import json, sys\n"
        "from modelship.runtime.main import _fetch, _fetch_into, parse_args\n"
        "from modelship.runtime.metrics import RuntimeMetrics\n"
        "from modelship.runtime.nodecache import NodeCache\n"
        "args, _ = parse_args(sys.argv[1:], env={})\n"
        "cache = NodeCache(args.node_cache, log=lambda line: print(line, flush=True))\n"
        "report = _fetch(args, RuntimeMetrics(), cache)\n"
        "print(json.dumps({'dir': str(report.model_dir), 'fetched': report.bytes_fetched,"
        " 'hits': report.cache_hits}))\n"
    )
    args, _ = parse_args(runtime_args(s3_env, prefix, root), env={})
    with first.fetching(args.source) as model_dir:
        # Pod two starts while pod one holds the fetch lock: it must wait, not download.
        second = subprocess.Popen(
            [sys.executable, "-c", script, *runtime_args(s3_env, prefix, root)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **s3_env.env},
        )
        assert second.stdout is not None
        waiting = second.stdout.readline()
        assert "another pod on this node is fetching" in waiting
        time.sleep(0.5)
        assert second.poll() is None, "pod two did not wait for pod one's fetch"
        report = _fetch_into_held_dir(s3_env, prefix, model_dir)
        assert report.bytes_fetched == model_bytes
    output, _ = second.communicate(timeout=60)
    assert second.returncode == 0, output
    result = json.loads(output.strip().splitlines()[-1])
    assert result == {"dir": str(model_dir), "fetched": 0, "hits": 5}
    assert sorted(p.name for p in model_dir.iterdir() if not p.name.startswith(".")) == sorted(
        ["config.json", *shards]
    )
    first.release()


def _fetch_into_held_dir(server: S3Server, prefix: str, model_dir: Path) -> FetchReport:
    """What pod one does while it holds the fetch lock."""
    args, _ = parse_args(runtime_args(server, prefix, model_dir.parent), env={})
    return _fetch_into(args, RuntimeMetrics(), model_dir)


def test_unused_models_make_room_and_models_in_use_are_kept(
    s3_env: S3Server, tiny_tmpfs: Path
) -> None:
    """20 MiB of node disk, two 12 MiB models: the second fits only once the first is unused."""
    client = s3_env.client()
    old, new = new_prefix(), new_prefix()
    upload(client, old, {"config.json": CONFIG, "model.safetensors": os.urandom(12 * MIB)})
    upload(client, new, {"config.json": CONFIG, "model.safetensors": os.urandom(12 * MIB)})
    serving = NodeCache(tiny_tmpfs, log=lambda line: None)
    old_report = fetch_as_a_pod(s3_env, old, tiny_tmpfs, serving)

    # The old model is still served by a pod on the node (its `use` lock is held): kept.
    newcomer = NodeCache(tiny_tmpfs, log=lambda line: None)
    with pytest.raises(DiskSpaceError, match="not enough free space"):
        fetch_as_a_pod(s3_env, new, tiny_tmpfs, newcomer)
    assert (old_report.model_dir / "model.safetensors").stat().st_size == 12 * MIB

    # That pod goes away: the old model is removed to make room, and the new one is fetched.
    serving.release()
    new_report = fetch_as_a_pod(s3_env, new, tiny_tmpfs, newcomer)
    assert new_report.bytes_fetched == 12 * MIB + len(CONFIG)
    assert not old_report.model_dir.exists()
    assert new_report.model_dir.parent == tiny_tmpfs
    newcomer.release()
