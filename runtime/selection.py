"""Decide which files of a model source the engine needs.

Pure: the input is a listing of (key relative to the model root, size in bytes), the output a
`Selection` of files to fetch and files skipped, each skipped one with a reason. The fetch
(S3, FSx, EFS, local) applies the same rules, so what a pod downloads never depends on where the
model lives.

Taken: safetensors weights and their index, config.json, generation_config.json, quantization
configs, tokenizer and chat-template files, processor configs, sentence-transformers module
files (modules.json, sentence_*_config.json, 1_Pooling/config.json, Dense layers: vLLM reads them
to choose the pooling), and custom model code (*.py, run only with trust_remote_code). Pickle weights (*.bin, *.pt, *.pth, *.ckpt) only with
`trust_pickle=True` and only when no safetensors exist. Everything else is skipped and reported.

Keys that could escape the target directory ('..', absolute, backslashes, empty names) are
refused with `UnsafeKeyError`: a listing that contains one is not trusted at all.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from ..operator.packagerules import (
    SENTENCE_TRANSFORMERS_ROOT_FILES,
    TOKENIZER_FILE_NAMES,
    TOKENIZER_PATTERNS,
    is_sentence_transformers_module_file,
)

FileKind = Literal[
    "weights", "weights_index", "config", "tokenizer", "processor", "code", "sentence_transformers"
]

# Short, stable reason codes (they label the files-skipped metric); `detail` says it for people.
SkipReason = Literal[
    "directory_marker",
    "hidden",
    "training_state",
    "pickle",
    "duplicate_weights",
    "other_format",
    "adapter",
    "subdirectory",
    "unrelated",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

_CONFIG_NAMES = frozenset(
    {
        "config.json",
        "generation_config.json",
        # Quantization configs read by vLLM's GPTQ/AWQ/ModelOpt loaders.
        "quantize_config.json",
        "quant_config.json",
        "hf_quant_config.json",
    }
)
# Every file the shared tokenizer rule accepts (operator/packagerules.py), so what verify looks
# for is always fetched.
_TOKENIZER_NAMES = TOKENIZER_FILE_NAMES
_TOKENIZER_PATTERNS = ("chat_template.*", *TOKENIZER_PATTERNS)
_PROCESSOR_NAMES = frozenset(
    {
        "preprocessor_config.json",
        "processor_config.json",
        "video_preprocessor_config.json",
        "feature_extractor_config.json",
    }
)
_TRAINING_STATE_PATTERNS = (
    "optimizer*.pt",
    "optimizer*.bin",
    "optimizer*.pth",
    "scheduler*.pt",
    "scheduler*.pth",
    "rng_state*.pth",
    "trainer_state.json",
    "training_args.bin",
    "scaler.pt",
)
_OTHER_FORMAT_PATTERNS = ("*.gguf", "*.onnx", "*.onnx_data", "*.h5", "*.msgpack", "*.tflite")
_PICKLE_WEIGHT_PATTERNS = ("pytorch_model*.bin",)
_PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
_SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"


class SelectionError(ValueError):
    """The listing holds nothing the engine can load; the message says what was found."""


class UnsafeKeyError(SelectionError):
    """A key would be written outside the target directory."""


@dataclass(frozen=True)
class SelectedFile:
    """A file the engine needs, by its key relative to the model root."""

    key: str
    size_bytes: int
    kind: FileKind


@dataclass(frozen=True)
class SkippedFile:
    """A file left out, with a reason code and a sentence for people."""

    key: str
    size_bytes: int
    reason: SkipReason
    detail: str


@dataclass(frozen=True)
class Selection:
    """What to fetch and what was left out."""

    files: tuple[SelectedFile, ...]
    skipped: tuple[SkippedFile, ...]

    @property
    def total_bytes(self) -> int:
        """Bytes of the selected files."""
        return sum(selected.size_bytes for selected in self.files)

    @property
    def skipped_bytes(self) -> int:
        """Bytes of the skipped files."""
        return sum(skipped.size_bytes for skipped in self.skipped)


def check_relative_key(key: str) -> str:
    """Return `key` if it is a safe relative POSIX path; raise UnsafeKeyError naming it if not."""
    problem = None
    if not key:
        problem = "is empty"
    elif "\x00" in key:
        problem = "contains a NUL byte"
    elif "\\" in key:
        problem = "contains a backslash"
    elif key.startswith("/"):
        problem = "is absolute"
    else:
        parts = key.split("/")
        if ".." in parts:
            problem = "contains a '..' component"
        elif "" in parts or "." in parts:
            problem = "has an empty or '.' path component"
    if problem is not None:
        raise UnsafeKeyError(
            f"model file key {key!r} {problem}: it could be written outside the model directory, "
            "so the source is refused. Re-upload the model with plain relative names "
            "(e.g. model-00001-of-00002.safetensors)."
        )
    return key


def safe_destination(dest: Path, key: str) -> Path:
    """The path `key` is written to under `dest`, after checking it stays inside `dest`.

    Refuses unsafe keys and any symlink between `dest` and the file (a symlink planted in the
    target directory would redirect the write elsewhere).
    """
    check_relative_key(key)
    root = dest.resolve()
    target = root.joinpath(*key.split("/"))
    current = root
    for part in key.split("/"):
        current = current / part
        if current.is_symlink():
            raise UnsafeKeyError(
                f"{current}: is a symlink inside the model directory {root}; modelship never "
                "writes through symlinks. Remove it, or use an empty directory."
            )
    if not target.resolve().is_relative_to(root):
        raise UnsafeKeyError(f"model file key {key!r} resolves outside {root}; refused.")
    return target


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _classify(key: str) -> FileKind | tuple[SkipReason, str] | None:
    """A kind for taken files, a (reason, detail) for skipped ones, None for weight candidates
    decided after the whole listing is seen."""
    parts = key.split("/")
    name = parts[-1]
    if any(part.startswith(".") for part in parts):
        return ("hidden", "hidden or version-control file (.git*, dotfiles)")
    top = parts[0]
    if is_sentence_transformers_module_file(key):
        # 1_Pooling/config.json and friends: vLLM reads them to choose the pooling.
        return "sentence_transformers"
    if len(parts) > 1:
        if top.startswith("global_step") or top.startswith("checkpoint-"):
            return ("training_state", f"training checkpoint directory {top}/ (optimizer state)")
        if top == "original":
            return (
                "duplicate_weights",
                "original/ holds the consolidated checkpoint, a duplicate of the weights",
            )
        return ("subdirectory", f"in subdirectory {top}/; the engine reads the model root only")
    if _matches(name, _TRAINING_STATE_PATTERNS):
        return ("training_state", "optimizer, scheduler or RNG state from training")
    if name in _CONFIG_NAMES:
        return "config"
    if name in SENTENCE_TRANSFORMERS_ROOT_FILES:
        return "sentence_transformers"
    if name in _TOKENIZER_NAMES or _matches(name, _TOKENIZER_PATTERNS):
        return "tokenizer"
    if name in _PROCESSOR_NAMES:
        return "processor"
    if name.startswith("adapter_"):
        return ("adapter", "LoRA adapter file; serve it on top of its base model")
    if name == _SAFETENSORS_INDEX_NAME or name.endswith(".safetensors"):
        return None
    if name == _PICKLE_INDEX_NAME or name.endswith(PICKLE_SUFFIXES):
        return None
    if _matches(name, _OTHER_FORMAT_PATTERNS):
        return ("other_format", "weights in a format the engine does not load here")
    if name.endswith(".py"):
        return "code"
    return ("unrelated", "not used by the engine (docs, images, licences, other files)")


def select_files(listing: Iterable[tuple[str, int]], *, trust_pickle: bool = False) -> Selection:
    """Select the files the engine needs from `listing` of (relative key, size in bytes).

    Raises UnsafeKeyError for a key that could escape the target directory, and SelectionError
    when there are no loadable weights or no config.json.
    """
    taken: list[SelectedFile] = []
    skipped: list[SkippedFile] = []
    safetensors: list[tuple[str, int]] = []
    pickles: list[tuple[str, int]] = []
    safetensors_index: tuple[str, int] | None = None
    pickle_index: tuple[str, int] | None = None
    for key, size_bytes in sorted(listing):
        if key.endswith("/"):
            # S3 "folder" placeholders carry no data; the name is still checked.
            check_relative_key(key.rstrip("/") or key)
            skipped.append(
                SkippedFile(key, size_bytes, "directory_marker", "directory placeholder object")
            )
            continue
        check_relative_key(key)
        verdict = _classify(key)
        if isinstance(verdict, tuple):
            skipped.append(SkippedFile(key, size_bytes, verdict[0], verdict[1]))
        elif verdict is not None:
            taken.append(SelectedFile(key, size_bytes, verdict))
        elif key == _SAFETENSORS_INDEX_NAME:
            safetensors_index = (key, size_bytes)
        elif key.endswith(".safetensors"):
            safetensors.append((key, size_bytes))
        elif key == _PICKLE_INDEX_NAME:
            pickle_index = (key, size_bytes)
        else:
            pickles.append((key, size_bytes))

    pickle_candidates = pickles + ([pickle_index] if pickle_index else [])
    if safetensors:
        sharded = [key for key, _ in safetensors if not key.startswith("consolidated")]
        for key, size_bytes in safetensors:
            if sharded and key.startswith("consolidated"):
                # Mistral repositories ship the same weights twice; loading both doubles memory.
                skipped.append(
                    SkippedFile(
                        key,
                        size_bytes,
                        "duplicate_weights",
                        "consolidated checkpoint duplicating the sharded safetensors",
                    )
                )
            else:
                taken.append(SelectedFile(key, size_bytes, "weights"))
        if safetensors_index:
            taken.append(SelectedFile(*safetensors_index, "weights_index"))
        for key, size_bytes in pickle_candidates:
            skipped.append(
                SkippedFile(
                    key, size_bytes, "pickle", "pickle weights; the safetensors are used instead"
                )
            )
    elif trust_pickle and any(_matches(key, _PICKLE_WEIGHT_PATTERNS) for key, _ in pickles):
        for key, size_bytes in pickles:
            if _matches(key, _PICKLE_WEIGHT_PATTERNS):
                taken.append(SelectedFile(key, size_bytes, "weights"))
            else:
                skipped.append(
                    SkippedFile(
                        key, size_bytes, "pickle", "pickle file that is not a pytorch_model*.bin"
                    )
                )
        if pickle_index:
            taken.append(SelectedFile(*pickle_index, "weights_index"))
    else:
        for key, size_bytes in pickle_candidates:
            skipped.append(
                SkippedFile(
                    key,
                    size_bytes,
                    "pickle",
                    "pickle weights run code when loaded; set trust_pickle to use them",
                )
            )
        if safetensors_index:
            skipped.append(
                SkippedFile(*safetensors_index, "unrelated", "safetensors index without any shard")
            )

    if not any(selected.kind == "weights" for selected in taken):
        pickle_names = [key for key, _ in pickles]
        found = ", ".join(key for key, _ in sorted(listing)[:8]) or "nothing"
        if pickle_names and not trust_pickle:
            raise SelectionError(
                f"no safetensors weights, only pickle weights ({', '.join(pickle_names[:3])}); "
                "loading pickle runs code from the file. Convert the model to safetensors, or set "
                "spec.model.trustPickle if you trust its origin."
            )
        raise SelectionError(
            "no loadable weights (*.safetensors, or pytorch_model*.bin with trust_pickle) at the "
            f"model root; found: {found}. Check the model URI points at the directory that holds "
            "config.json and the weights."
        )
    if not any(selected.key == "config.json" for selected in taken):
        raise SelectionError(
            "no config.json at the model root; vLLM needs it to build the model. Upload the "
            "Hugging Face config.json next to the weights."
        )
    taken.sort(key=lambda selected: selected.key)
    return Selection(files=tuple(taken), skipped=tuple(skipped))


def relative_key(key: str, prefix: str) -> str:
    """`key` relative to `prefix` (an S3 prefix that is "" or ends with "/")."""
    if not key.startswith(prefix):
        raise UnsafeKeyError(f"object key {key!r} is not under the prefix {prefix!r}.")
    return key[len(prefix) :]


def posix_key(path: Path, root: Path) -> str:
    """The key of a file on a volume: its path relative to `root`, with '/' separators."""
    return PurePosixPath(path.relative_to(root).as_posix()).as_posix()
