"""One download per node (runtime/nodecache.py): pods sharing the node's model directory, against
the real SeaweedFS server, with real processes and real flocks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from modelship.runtime import demo
from modelship.runtime.fetch import DiskSpaceError, FetchError, FetchReport
from modelship.runtime.main import _fetch, _fetch_into, parse_args
from modelship.runtime.metrics import RuntimeMetrics
from modelship.runtime.nodecache import (
    NodeCache,
    NodeCacheAccessError,
    NodeCacheError,
    model_key,
    prepare,
    prove_access,
)

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
    # recent_seconds=0: the old model was fetched a moment ago, which would otherwise protect it.
    newcomer = NodeCache(tiny_tmpfs, log=lambda line: None, recent_seconds=0)
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


# --- access is proven with the pod's own credentials --------------------------------------------

IDENTITIES = {
    # The admin the server's own readiness check uses (the test credentials).
    "admin": ("testkey", "testsecret", ["Admin", "Read", "Write", "List", "Tagging"]),
    # A runtime role allowed to read the model bucket.
    "reader": ("readerkey", "readersecret", ["Read:models", "List:models"]),
    # A role that may list the bucket but not read its objects: listing alone would not stop it.
    "lister": ("listerkey", "listersecret", ["List:models"]),
    # Another tenant's role, for another bucket.
    "outsider": ("outsiderkey", "outsidersecret", ["Read:other", "List:other"]),
}


@pytest.fixture(scope="module")
def seaweed_with_identities(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS of its own, started with an s3 config of four identities."""
    data_dir = tmp_path_factory.mktemp("seaweed-identities")
    config = data_dir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": name,
                        "credentials": [{"accessKey": key, "secretKey": secret}],
                        "actions": actions,
                    }
                    for name, (key, secret, actions) in IDENTITIES.items()
                ]
            }
        )
    )
    seaweed = demo.start_seaweed(
        data_dir / "data",
        bucket="models",
        access_key="testkey",
        secret_key="testsecret",
        s3_config=config,
    )
    try:
        yield S3Server(endpoint_url=seaweed.endpoint_url, seaweed=seaweed)
    finally:
        seaweed.stop()


def _as(monkeypatch: pytest.MonkeyPatch, identity: str) -> None:
    key, secret, _ = IDENTITIES[identity]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_a_pod_that_may_not_read_the_source_does_not_get_the_cached_weights(
    seaweed_with_identities: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = seaweed_with_identities
    prefix = new_prefix()
    weights = os.urandom(2 * MIB)
    upload(server.client(), prefix, {"config.json": CONFIG, "model.safetensors": weights})
    root = tmp_path / "node-cache"
    argv = [*runtime_args(server, prefix, root), "--node-cache-key", "shared-dir"]

    # The reader's pod fetches into the node cache.
    _as(monkeypatch, "reader")
    args, _ = parse_args(argv, env={})
    reader = NodeCache(root, log=lambda line: None, key="shared-dir")
    report = _fetch(args, RuntimeMetrics(), reader)
    assert report.bytes_fetched == len(CONFIG) + len(weights)
    reader.release()

    # Pods whose roles cannot read the objects are refused, though the files are on the node.
    for identity in ("lister", "outsider"):
        _as(monkeypatch, identity)
        with pytest.raises((NodeCacheAccessError, FetchError)) as refused:
            _fetch(args, RuntimeMetrics(), NodeCache(root, log=lambda line: None, key="shared-dir"))
        assert "may not read" in str(refused.value) or "AccessDenied" in str(refused.value)
    _as(monkeypatch, "lister")
    with pytest.raises(NodeCacheAccessError, match="may not read"):
        _fetch(args, RuntimeMetrics(), NodeCache(root, log=lambda line: None, key="shared-dir"))

    # The reader itself proves its access and reuses the cache: nothing downloaded again.
    _as(monkeypatch, "reader")
    again = NodeCache(root, log=lambda line: None, key="shared-dir")
    assert _fetch(args, RuntimeMetrics(), again).bytes_fetched == 0
    again.release()


def test_prove_access_heads_every_cached_object(
    seaweed_with_identities: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = seaweed_with_identities
    prefix = new_prefix()
    upload(server.client(), prefix, {"config.json": CONFIG, "model.safetensors": b"x" * 1000})
    _as(monkeypatch, "reader")
    args, _ = parse_args(runtime_args(server, prefix, tmp_path), env={})
    cache = NodeCache(tmp_path, log=lambda line: None)
    report = _fetch(args, RuntimeMetrics(), cache)
    cache.release()
    reader_client = boto3.session.Session().client("s3", endpoint_url=server.endpoint_url)
    assert prove_access(reader_client, "models", prefix, report.model_dir) == 2
    _as(monkeypatch, "lister")
    lister_client = boto3.session.Session().client("s3", endpoint_url=server.endpoint_url)
    with pytest.raises(NodeCacheAccessError, match=r"s3:GetObject"):
        prove_access(lister_client, "models", prefix, report.model_dir)


def test_prepare_creates_the_directory_and_evicts_only_unused_old_models(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    old = root / "old-model"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"x" * 1000)
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    busy = root / "busy-model"
    busy.mkdir()
    os.utime(busy, (time.time() - 3600, time.time() - 3600))
    holder = NodeCache(root, log=lambda line: None, key="busy-model")
    with holder.fetching("s3://models/busy/"):
        pass  # holds busy-model's `use` lock, as a serving pod does
    # Ask for more than the disk has: everything unused and old goes, the rest stays.
    free = shutil.disk_usage(root).free
    model_dir = prepare(root, "new-model", free + 10**15, log=lambda line: None)
    assert model_dir == root / "new-model" and model_dir.is_dir()
    assert not old.exists()
    assert busy.exists()
    holder.release()
    with pytest.raises(NodeCacheError, match="plain directory name"):
        prepare(root, "../escape", 0)
