"""vLLM's command line as data: read a list of engine arguments the way vLLM reads it.

A user's `spec.serving.engineArgs` must not set what the plan sets, in any spelling vLLM
accepts. vLLM's `FlexibleArgumentParser` turns `--max_model_len` into `--max-model-len`, takes
`--flag=value`, expands `-O3` and dotted JSON keys (`--compilation-config.level 3`), and argparse
then resolves unique prefixes (`--max-model` is `--max-model-len`), short options (`-tp`, `-q`,
`-qfp8`) and aliases (`--device-memory-utilization` is `--gpu-memory-utilization`). Checking
literal names misses all of these, so the arguments are parsed here by a stdlib argparse parser
built from vLLM's own option table (`data/vllm_options.json`, generated from the installed vLLM
by `python -m modelship.operator.vllm_options`; a unit test fails when it drifts). The operator
image has no vLLM, which is why the table is data and not an import.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

ENGINE_ARGS_FIELD = "spec.serving.engineArgs"
TABLE_NAME = "vllm_options.json"
# Beside this module (checkout, editable install and wheel); not importlib.resources, which
# Python 3.11 cannot use on a namespace package (see catalog.py).
TABLE_PATH = Path(__file__).resolve().parent / "data" / TABLE_NAME

# Destinations (vLLM's argparse `dest`) the plan or the runtime decides, with the spec field a
# user sets instead. A user argument that lands on one of these is refused, however it is spelled.
PLANNED: dict[str, str] = {
    "model": "set spec.model.uri instead (the runtime passes the fetched directory)",
    "model_tag": "set spec.model.uri instead (vLLM reads a bare value as the model to serve)",
    "served_model_name": "set spec.model.name instead",
    "host": "remove it: the runtime serves on the pod's port 8000",
    "port": "remove it: the runtime serves on the pod's port 8000",
    "tensor_parallel_size": "set spec.accelerator.tensorParallelSize instead",
    "pipeline_parallel_size": "remove it: the planner splits a model across nodes "
    "(constrain it with spec.accelerator)",
    "nnodes": "remove it: the planner splits a model across nodes (constrain it with "
    "spec.accelerator)",
    "node_rank": "remove it: the runtime assigns node ranks",
    "data_parallel_size": "set spec.replicas instead (each replica is its own pod)",
    "data_parallel_size_local": "set spec.replicas instead (each replica is its own pod)",
    "decode_context_parallel_size": "remove it: the plan sizes the KV cache without context "
    "parallelism (set spec.serving.maxModelLen and spec.serving.concurrency)",
    "prefill_context_parallel_size": "remove it: the plan sizes the KV cache without context "
    "parallelism (set spec.serving.maxModelLen and spec.serving.concurrency)",
    "max_model_len": "set spec.serving.maxModelLen instead",
    "max_num_seqs": "set spec.serving.concurrency instead",
    "max_num_batched_tokens": "set spec.serving.concurrency and spec.serving.maxModelLen instead",
    "gpu_memory_utilization": "set spec.serving.gpuMemoryUtilization instead",
    "kv_cache_memory_bytes": "set spec.serving.gpuMemoryUtilization instead",
    "num_gpu_blocks_override": "set spec.serving.gpuMemoryUtilization instead",
    "dtype": "set spec.model.quantization instead",
    "quantization": "set spec.model.quantization instead",
    "kv_cache_dtype": "set spec.serving.kvCacheDtype instead",
    "override_generation_config": "set spec.serving.sampling instead",
    "runner": "set spec.model.task instead",
    "convert": "set spec.model.task instead",
    "hf_overrides": "set spec.model.architecture instead",
    "hf_config_path": "set spec.model.architecture instead",
    "trust_remote_code": "set spec.model.trustRemoteCode instead (off by default)",
    "config": "write each option as its own entry instead (a config file could set any planned "
    "option)",
    "help": "remove it: --help makes vLLM print its options and exit",
}

# vLLM reports usage statistics to stats.vllm.ai unless one of these is set
# (vllm/usage/usage_lib.py, is_usage_stats_enabled): render and the runtime set all three.
NO_TELEMETRY_ENV = {"VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1"}

# Only the runtime sets these (render passes everything else through from the plan).
POD_DESTS = frozenset({"model", "model_tag", "served_model_name", "host", "port"})


class EngineArgsError(ValueError):
    """Engine arguments vLLM would not accept, or that set what the plan decides."""


@dataclass(frozen=True)
class ParsedOption:
    """One option as vLLM would read it: its destination, how it was written, and its value."""

    dest: str
    spelling: str
    value: Any


@dataclass(frozen=True)
class OptionTable:
    """vLLM's options: every option string, its destination and how many values it takes."""

    vllm_version: str
    options: tuple[tuple[tuple[str, ...], str, str | int | None], ...]
    positionals: tuple[tuple[str, str | int | None], ...]


@functools.cache
def load_table() -> OptionTable:
    """The option table shipped with modelship (generated from vLLM's parser)."""
    raw = json.loads(TABLE_PATH.read_text())
    return OptionTable(
        vllm_version=raw["vllmVersion"],
        options=tuple(
            (tuple(option["flags"]), option["dest"], option["nargs"]) for option in raw["options"]
        ),
        positionals=tuple(
            (positional["dest"], positional["nargs"]) for positional in raw["positionals"]
        ),
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise EngineArgsError(message)


@functools.cache
def _parser() -> _Parser:
    """A stdlib parser with vLLM's option strings, arities and prefix rules (no types: a value
    is kept as written; vLLM checks it when it starts)."""
    table = load_table()
    parser = _Parser(add_help=False, allow_abbrev=True, prog="vllm")
    for flags, dest, nargs in table.options:
        if nargs == 0:
            # BooleanOptionalAction pairs --x with --no-x: keep which one was given.
            negative = [
                flag for flag in flags if flag.startswith("--no-") and "--" + flag[5:] in flags
            ]
            positive = [flag for flag in flags if flag not in negative]
            parser.add_argument(
                *positive, dest=dest, action="store_const", const=True, default=argparse.SUPPRESS
            )
            if negative:
                parser.add_argument(
                    *negative,
                    dest=dest,
                    action="store_const",
                    const=False,
                    default=argparse.SUPPRESS,
                )
        elif nargs == "append":
            parser.add_argument(*flags, dest=dest, action="append", default=argparse.SUPPRESS)
        else:
            parser.add_argument(*flags, dest=dest, nargs=nargs, default=argparse.SUPPRESS)
    for dest, nargs in table.positionals:
        parser.add_argument(dest, nargs=nargs, default=argparse.SUPPRESS)
    return parser


# FlexibleArgumentParser's rewrite of "--a_b" to "--a-b": everything between "--" and the first ".".
_KEY = re.compile(r"(?<=--)[^.]*")


def _flexible_rewrite(args: Sequence[str]) -> list[str]:
    """vLLM's own pre-processing (vllm/utils/argparse_utils.py, FlexibleArgumentParser.
    parse_args): underscores to dashes in names, -O<n> to --optimization-level, and dotted JSON
    keys (--a.b v) folded into their option (--a <json>)."""
    processed: list[str] = []
    for index, arg in enumerate(args):
        if arg.startswith("--"):
            key, sep, value = arg.partition("=")
            key = _KEY.sub(lambda match: match.group(0).replace("_", "-"), key, count=1)
            processed.append(f"{key}{sep}{value}")
        elif arg.startswith("-O") and arg != "-O":
            processed += ["--optimization-level", arg[3:] if arg[2:3] == "=" else arg[2:]]
        elif arg == "-O" and index + 1 < len(args) and args[index + 1] in {"0", "1", "2", "3"}:
            processed.append("--optimization-level")
        else:
            processed.append(arg)
    folded: list[str] = []
    skip_next = False
    for index, arg in enumerate(processed):
        if skip_next:
            skip_next = False
            continue
        if arg.startswith("-") and "." in arg.partition("=")[0]:
            name, sep, value = arg.partition("=")
            if not sep:
                if index + 1 >= len(processed):
                    raise EngineArgsError(f"{arg} expects a value")
                value = processed[index + 1]
                skip_next = True
            # The folded value is JSON in vLLM; only the option it lands on matters here.
            folded += [name.split(".", 1)[0].removesuffix("+"), json.dumps(value)]
        else:
            folded.append(arg)
    return folded


def parse_engine_args(args: Sequence[str]) -> list[ParsedOption]:
    """Every option `args` sets, as vLLM would read it; EngineArgsError if vLLM would refuse
    the list (an unknown option, a missing value, an ambiguous abbreviation)."""
    for arg in args:
        if not isinstance(arg, str):
            raise EngineArgsError(f"{arg!r} is not a string; write each argument as a string")
        if arg == "--config" or arg.startswith("--config="):
            # vLLM splices a config file in before parsing: treat it as the option it is.
            return [ParsedOption("config", arg, None)]
    rewritten = _flexible_rewrite(args)
    parser = _parser()
    namespace = argparse.Namespace()
    # parse_args applies every option in order; it also resolves prefixes exactly as vLLM's
    # argparse does (allow_abbrev), so "--max-model" lands on max_model_len.
    parser.parse_args(rewritten, namespace)
    spellings = _spellings(rewritten, parser)
    return [
        ParsedOption(dest, spellings.get(dest, dest), value)
        for dest, value in vars(namespace).items()
    ]


def _spellings(args: Sequence[str], parser: _Parser) -> dict[str, str]:
    """How each destination was written, for the error message."""
    spellings: dict[str, str] = {}
    for arg in args:
        if not arg.startswith("-"):
            continue
        name = arg.split("=", 1)[0]
        resolved = parser._parse_optional(arg)  # argparse's own prefix and short-option rules
        if not resolved:
            continue
        # Python 3.12.7+ returns a list of candidates; 3.11 returns one (action, ...) tuple.
        first = resolved[0] if isinstance(resolved, list) else resolved
        action = first[0]
        if action is not None:
            spellings.setdefault(action.dest, name)
    positional_dests = {dest for dest, _ in load_table().positionals}
    for dest in positional_dests:
        spellings.setdefault(dest, "a bare value")
    return spellings


def check_user_engine_args(args: Sequence[str], field: str = ENGINE_ARGS_FIELD) -> None:
    """Refuse user engine arguments that vLLM would not accept or that set a planned option."""
    try:
        parsed = parse_engine_args(args)
    except EngineArgsError as error:
        raise EngineArgsError(
            f"{field}: vLLM {load_table().vllm_version} would not accept {list(args)!r}: "
            f"{error}. Write each option in full, e.g. ['--enable-prefix-caching'] or "
            "['--max-lora-rank', '16']."
        ) from None
    for option in parsed:
        if option.dest in PLANNED:
            raise EngineArgsError(
                f"{field}: {option.spelling} (vLLM's {option.dest}) is decided by modelship, not "
                f"by engine arguments; {PLANNED[option.dest]}."
            )


def pod_options(args: Sequence[str]) -> list[ParsedOption]:
    """The options in `args` that only the runtime may set (--model, --port, ...)."""
    return [option for option in parse_engine_args(args) if option.dest in POD_DESTS]


def pod_flag_spellings(args: Sequence[str]) -> list[str]:
    """Without a full parse: every argument that names, or abbreviates, one of the pod's own
    options (after vLLM's underscore rewrite), e.g. --served_model_name or --mod."""
    pod_flags = [
        flag
        for flags, dest, _ in load_table().options
        if dest in POD_DESTS
        for flag in flags
        if flag.startswith("--")
    ]
    found = []
    for arg in _flexible_rewrite(args):
        name = arg.split("=", 1)[0]
        if (
            name.startswith("--")
            and len(name) > 2
            and any(flag.startswith(name) for flag in pod_flags)
        ):
            found.append(name)
    return found


def values(args: Sequence[str]) -> dict[str, Any]:
    """Destination -> value for every option `args` sets (the last one wins, as in vLLM)."""
    return {option.dest: option.value for option in parse_engine_args(args)}


def user_enforce_eager(args: Sequence[str]) -> bool:
    """Whether a (checked) user argument list turns CUDA graphs off, in any spelling."""
    return values(args).get("enforce_eager") is True


def generate_table() -> dict[str, Any]:
    """Read the installed vLLM's `vllm serve` parser into the table's JSON form."""
    import vllm  # only where vLLM is installed (development, the runtime image)
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    options: list[dict[str, Any]] = []
    positionals: list[dict[str, Any]] = []
    for action in parser._actions:
        if isinstance(action, argparse._AppendAction):
            nargs: str | int | None = "append"
        elif action.nargs == 0:
            nargs = 0
        else:
            nargs = action.nargs  # None (one value), "?", "+", "*"
        if action.option_strings:
            options.append(
                {"flags": list(action.option_strings), "dest": action.dest, "nargs": nargs}
            )
        else:
            positionals.append({"dest": action.dest, "nargs": nargs})
    options.sort(key=lambda option: option["flags"][0])
    return {"vllmVersion": vllm.__version__, "options": options, "positionals": positionals}


def dump_table(table: dict[str, Any]) -> str:
    """The table as JSON with one option per line (a vLLM upgrade reads as a small diff)."""
    lines = [
        "{",
        f'"vllmVersion": {json.dumps(table["vllmVersion"])},',
        '"positionals": [',
        ",\n".join(json.dumps(entry, sort_keys=True) for entry in table["positionals"]),
        "],",
        '"options": [',
        ",\n".join(json.dumps(entry, sort_keys=True) for entry in table["options"]),
        "]",
        "}",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(dump_table(generate_table()))
