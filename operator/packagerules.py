"""Rules about a model package's files, shared by the operator (modelinfo, at plan time) and the
runtime (selection and verify, in the pod), so the two never disagree about what a servable
package is. Pure and dependency-free: the operator image has no torch, vLLM or transformers.

Tokenizer: transformers' AutoTokenizer (which vLLM uses) loads a fast tokenizer from
`tokenizer.json`, or builds one from the slow tokenizer's files: a SentencePiece model
(`tokenizer.model`, `spiece.model`, `sentencepiece.bpe.model`: Llama, T5, XLM-R), a byte-level
BPE vocabulary with its merges (`vocab.json` + `merges.txt`: GPT-2, RoBERTa, Qwen), a WordPiece
vocabulary (`vocab.txt`: BERT), or a tiktoken file (`tiktoken.model`, `*.tiktoken`); vLLM's
Mistral tokenizer mode reads `tekken.json`. `tokenizer_config.json` is optional (without it
AutoTokenizer picks the class from config.json's model_type).

Sentence-transformers: vLLM reads `modules.json` to choose the pooling (mean, CLS, last token)
and whether to normalize, the pooling module's `<N>_Pooling/config.json`, the
`sentence_*_config.json` tokenization settings, and Dense projection layers (`<N>_Dense/`):
vllm/transformers_utils/config.py (get_pooling_config, get_sentence_transformer_tokenizer_config,
try_get_dense_modules). Without them a mean-pooling model silently serves CLS-pooled vectors.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

# Each alternative is a set of files that together make a tokenizer, in the order tried.
TOKENIZER_ALTERNATIVES: tuple[tuple[str, ...], ...] = (
    ("tokenizer.json",),
    ("tekken.json",),
    ("tokenizer.model",),
    ("spiece.model",),
    ("sentencepiece.bpe.model",),
    ("tiktoken.model",),
    ("vocab.json", "merges.txt"),
    ("vocab.txt",),
)
TOKENIZER_PATTERNS = ("*.tiktoken",)
# Read with any tokenizer when present; never enough on their own.
TOKENIZER_COMPANIONS = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
TOKENIZER_FILE_NAMES = frozenset(
    {name for alternative in TOKENIZER_ALTERNATIVES for name in alternative}
    | set(TOKENIZER_COMPANIONS)
)

TOKENIZER_RULE = (
    "tokenizer.json, tekken.json, a SentencePiece model (tokenizer.model, spiece.model or "
    "sentencepiece.bpe.model), a tiktoken file (tiktoken.model or *.tiktoken), vocab.json with "
    "merges.txt, or vocab.txt"
)


def find_tokenizer(names: Iterable[str]) -> tuple[str, ...] | None:
    """The files (top-level names) that make up the package's tokenizer, companions included;
    None when the package has none vLLM can load."""
    present = {name for name in names if "/" not in name}
    found: tuple[str, ...] | None = None
    for alternative in TOKENIZER_ALTERNATIVES:
        if set(alternative) <= present:
            found = alternative
            break
    if found is None:
        tiktoken = sorted(
            name
            for name in present
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in TOKENIZER_PATTERNS)
        )
        if not tiktoken:
            return None
        found = (tiktoken[0],)
    return found + tuple(name for name in TOKENIZER_COMPANIONS if name in present)


# Sentence-transformers files at the package root.
SENTENCE_TRANSFORMERS_ROOT_FILES = frozenset(
    {
        "modules.json",
        "config_sentence_transformers.json",
        "sentence_bert_config.json",
        "sentence_roberta_config.json",
        "sentence_distilbert_config.json",
        "sentence_camembert_config.json",
        "sentence_albert_config.json",
        "sentence_xlm-roberta_config.json",
        "sentence_xlnet_config.json",
    }
)
# Module folders as sentence-transformers names them: 1_Pooling, 2_Dense, 2_Normalize, ...
SENTENCE_TRANSFORMERS_MODULE_DIR = re.compile(r"^\d+_[A-Za-z][A-Za-z0-9]*$")
# What vLLM reads inside a module folder (Dense weights are loaded only as safetensors here).
SENTENCE_TRANSFORMERS_MODULE_FILES = ("config.json", "*.safetensors")


def is_sentence_transformers_module_file(key: str) -> bool:
    """Whether `key` (relative to the package root) is a module file vLLM reads, e.g.
    1_Pooling/config.json or 2_Dense/model.safetensors."""
    parts = key.split("/")
    return (
        len(parts) == 2
        and SENTENCE_TRANSFORMERS_MODULE_DIR.match(parts[0]) is not None
        and any(
            fnmatch.fnmatchcase(parts[1], pattern) for pattern in SENTENCE_TRANSFORMERS_MODULE_FILES
        )
    )
