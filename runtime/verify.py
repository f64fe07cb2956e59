"""Check a model directory before the engine starts.

vLLM fails late and obscurely on an incomplete model (a truncated shard surfaces as a
deserialization error minutes into loading, a missing tokenizer as a stack trace from
transformers). These checks take milliseconds, read only file headers, and say which file is
wrong and what to do about it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..operator.packagerules import TOKENIZER_RULE, find_tokenizer

# Weight formats that are unpickled on load: loading one runs arbitrary code from the file.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# A safetensors header larger than this is corrupt (the format itself caps it at 100 MB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class VerifyError(ValueError):
    """The model directory cannot be served; the message names the file and the fix."""


@dataclass(frozen=True)
class VerifyReport:
    """What was checked."""

    model_dir: Path
    architecture: str
    weight_files: list[str]
    weight_bytes: int
    tokenizer_files: list[str]
    pickle_files: list[str] = field(default_factory=list)


def _read_config(model_dir: Path) -> str:
    path = model_dir / "config.json"
    if not path.is_file():
        raise VerifyError(
            f"{path}: missing. The model source must contain the Hugging Face config.json next "
            "to the weights; upload it to the same prefix."
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise VerifyError(
            f"{path}: not valid JSON ({error}); upload an intact config.json."
        ) from None
    if not isinstance(config, dict):
        raise VerifyError(f"{path}: expected a JSON object; upload an intact config.json.")
    architectures = config.get("architectures")
    if (
        not isinstance(architectures, list)
        or not architectures
        or not all(isinstance(name, str) for name in architectures)
    ):
        raise VerifyError(
            f"{path}: has no 'architectures' list (e.g. [\"LlamaForCausalLM\"]); vLLM needs it "
            "to pick the model class. Add it, or re-save the model with save_pretrained()."
        )
    return str(architectures[0])


def check_safetensors_file(path: Path) -> int:
    """Check that a safetensors file is complete; return its data bytes.

    The size must equal 8 + header length + the largest data end offset in the header.
    """
    size_bytes = path.stat().st_size
    if size_bytes < 8:
        raise VerifyError(
            f"{path}: only {size_bytes} bytes, too short for a safetensors header; the download "
            "was cut off. Delete the file and fetch the model again."
        )
    with path.open("rb") as file:
        (header_bytes,) = struct.unpack("<Q", file.read(8))
        if header_bytes > _MAX_HEADER_BYTES or 8 + header_bytes > size_bytes:
            raise VerifyError(
                f"{path}: header length {header_bytes} does not fit in the file's {size_bytes} "
                "bytes; the file is truncated or not safetensors. Fetch it again."
            )
        raw_header = file.read(header_bytes)
    try:
        header = json.loads(raw_header)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise VerifyError(
            f"{path}: the safetensors header is not valid JSON; the file is corrupt. "
            "Fetch it again."
        ) from None
    if not isinstance(header, dict):
        raise VerifyError(f"{path}: the safetensors header is not an object; fetch it again.")
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
        ):
            raise VerifyError(
                f"{path}: tensor {name!r} has no valid data_offsets; the file is corrupt. Fetch it "
                "again."
            )
        data_end = max(data_end, offsets[1])
    expected_bytes = 8 + header_bytes + data_end
    if size_bytes != expected_bytes:
        problem = "truncated" if size_bytes < expected_bytes else "longer than its header says"
        raise VerifyError(
            f"{path}: {size_bytes} bytes but its header implies {expected_bytes}: the file is "
            f"{problem}. Delete it and fetch the model again."
        )
    return data_end


def _weight_files(model_dir: Path) -> list[Path]:
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            shard_names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise VerifyError(
                f"{index_path}: not a valid index (a JSON object with a 'weight_map' of tensor "
                "name to shard file); upload an intact index."
            ) from None
        missing = [name for name in shard_names if not (model_dir / name).is_file()]
        if missing:
            raise VerifyError(
                f"{index_path}: names {len(missing)} shard(s) that are not in {model_dir}: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. Upload every "
                "shard the index lists to the model prefix."
            )
        return [model_dir / name for name in shard_names]
    return sorted(model_dir.glob("*.safetensors"))


def _tokenizer_files(model_dir: Path) -> list[str]:
    # The same rule as the operator's plan (operator/packagerules.py): a package the operator
    # accepted is never refused here.
    names = [path.name for path in model_dir.iterdir() if path.is_file()]
    found = find_tokenizer(names)
    if found is None:
        raise VerifyError(
            f"{model_dir}: no tokenizer ({TOKENIZER_RULE}). Upload the tokenizer files with the "
            "model, e.g. AutoTokenizer.from_pretrained(...).save_pretrained(<dir>)."
        )
    return list(found)


def verify_model_dir(model_dir: Path, *, trust_pickle: bool = False) -> VerifyReport:
    """Check `model_dir` is a complete model vLLM can load; raise VerifyError if not."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise VerifyError(f"{model_dir}: not a directory; check --model-dir and the fetch step.")
    architecture = _read_config(model_dir)
    weight_paths = _weight_files(model_dir)
    pickle_files = sorted(
        path.name
        for path in model_dir.iterdir()
        if path.is_file() and path.name.endswith(PICKLE_SUFFIXES)
    )
    if not weight_paths:
        if pickle_files and not trust_pickle:
            raise VerifyError(
                f"{model_dir}: only pickle weights ({', '.join(pickle_files[:3])}); loading them "
                "runs code from the file. Convert the model to safetensors, or set "
                "spec.model.trustPickle (--trust-pickle) if you trust its origin."
            )
        if not pickle_files:
            raise VerifyError(
                f"{model_dir}: no weights (*.safetensors). Upload the model's safetensors files."
            )
    weight_bytes = sum(check_safetensors_file(path) for path in weight_paths)
    tokenizer = _tokenizer_files(model_dir)
    return VerifyReport(
        model_dir=model_dir,
        architecture=architecture,
        weight_files=[path.name for path in weight_paths],
        weight_bytes=weight_bytes,
        tokenizer_files=tokenizer,
        pickle_files=pickle_files if trust_pickle else [],
    )
