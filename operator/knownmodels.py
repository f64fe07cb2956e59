"""Published config.json facts of popular open models, for planning without reading the files.

The facts are a data file, `data/known_models.yaml` (each entry names its source), loaded and
validated once. A user names one with `spec.model.architecture.knownModel` or
`modelship plan --known-model`; the CLI also finds one from a model URI that ends in a known
Hugging Face repository id (`s3://bucket/meta-llama/Llama-3.1-8B-Instruct`) when exactly one
matches. `modelship models` lists them.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

# Beside this module in the checkout, the editable install and the wheel (see catalog.py).
BUILTIN_KNOWN_MODELS = Path(__file__).resolve().parent / "data" / "known_models.yaml"
# config.json fields every entry must carry: what sizing cannot do without.
_REQUIRED_CONFIG = ("architectures", "model_type", "torch_dtype")
_REQUIRED_TEXT_CONFIG = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "max_position_embeddings",
)


class KnownModelError(ValueError):
    """An unknown model id, or a data file that does not validate; says what to do."""


class KnownModel(BaseModel):
    """One model's published facts."""

    model_config = ConfigDict(alias_generator=to_camel, extra="forbid", frozen=True)

    id: str = Field(..., pattern=r"^[\w.-]+/[\w.-]+$", description="Hugging Face repository id.")
    config_url: str = Field(..., pattern=r"^https://huggingface\.co/.+/config\.json$")
    parameters: int = Field(..., gt=0, description="Parameter count.")
    parameters_source: str = Field(..., min_length=1, description="Where the count comes from.")
    aliases: tuple[str, ...] = Field((), description="Other repository ids with the same facts.")
    notes: str | None = None
    config: dict[str, Any] = Field(..., description="config.json fields, as published.")

    @field_validator("config")
    @classmethod
    def _has_what_sizing_needs(cls, config: dict[str, Any]) -> dict[str, Any]:
        text_config = config.get("text_config")
        text: dict[str, Any] = text_config if isinstance(text_config, dict) else {}
        missing = [key for key in _REQUIRED_CONFIG if key not in config] + [
            key for key in _REQUIRED_TEXT_CONFIG if key not in config and key not in text
        ]
        if missing:
            raise ValueError(f"config lacks {', '.join(missing)}")
        return config

    @property
    def names(self) -> tuple[str, ...]:
        """The id and its aliases."""
        return (self.id, *self.aliases)


class KnownModels(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: tuple[KnownModel, ...]

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: tuple[KnownModel, ...]) -> tuple[KnownModel, ...]:
        seen: dict[str, str] = {}
        for model in models:
            for name in model.names:
                key = name.lower()
                if key in seen:
                    raise ValueError(f"{name} is listed twice ({seen[key]} and {model.id})")
                seen[key] = model.id
        return models


@functools.cache
def known_models() -> KnownModels:
    """The built-in data file, parsed and validated once."""
    try:
        data = yaml.safe_load(BUILTIN_KNOWN_MODELS.read_text())
        return KnownModels.model_validate(data)
    except (OSError, yaml.YAMLError) as error:
        raise KnownModelError(f"{BUILTIN_KNOWN_MODELS}: cannot be read ({error}).") from None
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise KnownModelError(f"{BUILTIN_KNOWN_MODELS}: {where}: {first['msg']}") from None


def _by_name() -> dict[str, KnownModel]:
    return {name.lower(): model for model in known_models().models for name in model.names}


def get_known_model(name: str) -> KnownModel:
    """The model with this id (or alias; case does not matter), or KnownModelError saying which
    ids come close and where the list is."""
    model = _by_name().get(name.strip().lower())
    if model is not None:
        return model
    ids = [model.id for model in known_models().models]
    close = difflib.get_close_matches(name, ids, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise KnownModelError(
        f"{name!r} is not a known model; {hint}`modelship models` lists them (or describe the "
        "model with spec.model.architecture fields and spec.model.parameters)."
    )


def match_known_model(uri: str) -> KnownModel | None:
    """The one known model whose id (or alias) the URI's path ends with, else None.

    `s3://my-models/meta-llama/Llama-3.1-8B-Instruct` matches meta-llama/Llama-3.1-8B-Instruct;
    a path ending only in the repository name (`fsx://models/Llama-3.1-8B-Instruct`) matches when
    exactly one known model has that name."""
    parts = [part.lower() for part in PurePosixPath(uri.partition("://")[2]).parts if part != "/"]
    if not parts:
        return None
    by_name = _by_name()
    if len(parts) >= 2 and f"{parts[-2]}/{parts[-1]}" in by_name:
        return by_name[f"{parts[-2]}/{parts[-1]}"]
    candidates = {
        model.id for name, model in by_name.items() if name.rpartition("/")[2] == parts[-1]
    }
    return get_known_model(candidates.pop()) if len(candidates) == 1 else None
