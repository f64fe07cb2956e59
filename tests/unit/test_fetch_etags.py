"""FetchReport.file_etags keys the Neuron compile cache by checkpoint: two checkpoints with the
same shapes (same config.json, same shard names and sizes) get different cache keys."""

from __future__ import annotations

import os
from pathlib import Path

from modelship.operator.source import parse_source
from modelship.runtime.fetch import fetch_model
from modelship.runtime.neuron_cache import cache_key_for
from modelship.runtime.tinymodel import build_tiny_model

ENGINE_ARGS = ["--tensor-parallel-size", "2", "--max-model-len", "1024", "--max-num-seqs", "4"]
ENV = {"NEURON_SDK_VERSION": "2.29.0"}


def _checkpoint(directory: Path, seed: int, mtime_ns: int) -> Path:
    model = build_tiny_model(directory, seed=seed)
    for path in model.iterdir():
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return model


def test_volume_files_carry_their_mtime(tmp_path: Path) -> None:
    model = _checkpoint(tmp_path / "a", seed=0, mtime_ns=1_700_000_000_000_000_000)
    report = fetch_model(parse_source(f"file://{model}", field="uri"), tmp_path / "unused")
    assert report.served_in_place
    assert set(report.file_etags) == {selected.key for selected in report.files}
    assert report.file_etags["model.safetensors"] == "mtime_ns:1700000000000000000"


def test_same_shapes_different_checkpoints_get_different_cache_keys(tmp_path: Path) -> None:
    first = _checkpoint(tmp_path / "first", seed=0, mtime_ns=1_700_000_000_000_000_000)
    second = _checkpoint(tmp_path / "second", seed=1, mtime_ns=1_700_000_001_000_000_000)
    reports = [
        fetch_model(parse_source(f"file://{model}", field="uri"), tmp_path / "unused")
        for model in (first, second)
    ]
    # Without ETags the two keys collide: same config, same shard names and sizes.
    assert (first / "config.json").read_bytes() == (second / "config.json").read_bytes()
    assert (
        cache_key_for(first, ENGINE_ARGS, env=ENV).digest
        == cache_key_for(second, ENGINE_ARGS, env=ENV).digest
    )
    keys = [
        cache_key_for(model, ENGINE_ARGS, etags=report.file_etags, env=ENV).digest
        for model, report in zip((first, second), reports, strict=True)
    ]
    assert keys[0] != keys[1]
    # The same checkpoint fetched again keeps its key.
    again = fetch_model(parse_source(f"file://{first}", field="uri"), tmp_path / "unused")
    assert cache_key_for(first, ENGINE_ARGS, etags=again.file_etags, env=ENV).digest == keys[0]


def test_a_local_copy_keeps_the_source_versions(tmp_path: Path) -> None:
    """--copy-to-local: the copy's own mtimes are new, the key follows the source's."""
    mount_root = tmp_path / "mnt"
    _checkpoint(mount_root / "models" / "tiny", seed=0, mtime_ns=1_700_000_000_000_000_000)
    report = fetch_model(
        parse_source("efs://shared-models/models/tiny", field="uri"),
        tmp_path / "local",
        copy_to_local=True,
        mount_root=mount_root,
    )
    assert not report.served_in_place
    assert report.file_etags["model.safetensors"] == "mtime_ns:1700000000000000000"
