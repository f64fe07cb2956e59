"""One tokenizer rule for the operator's plan and the runtime's verify.

Each layout is written to disk and judged by both sides: modelinfo (inspect_model on the
directory, as the operator reads a package) and verify_model_dir (as the runtime checks it
before vLLM starts). They must agree, and selection must fetch every file the rule needs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from modelship.operator.modelinfo import inspect_model
from modelship.operator.packagerules import find_tokenizer
from modelship.operator.source import LocalSource
from modelship.runtime.selection import select_files
from modelship.runtime.tinymodel import build_tiny_model
from modelship.runtime.verify import VerifyError, verify_model_dir

TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

LAYOUTS: dict[str, dict[str, str] | None] = {
    "fast tokenizer": {"tokenizer.json": "{}"},
    "sentencepiece (Llama)": {"tokenizer.model": "x"},
    "sentencepiece with its config": {"tokenizer.model": "x", "tokenizer_config.json": "{}"},
    "sentencepiece (T5)": {"spiece.model": "x"},
    "sentencepiece (XLM-R)": {"sentencepiece.bpe.model": "x"},
    "byte-level BPE (GPT-2, Qwen)": {"vocab.json": "{}", "merges.txt": "#"},
    "WordPiece (BERT)": {"vocab.txt": "[PAD]"},
    "Mistral tekken": {"tekken.json": "{}"},
    "tiktoken": {"tiktoken.model": "x"},
    "tiktoken pattern": {"cl100k_base.tiktoken": "x"},
    "no tokenizer": None,
    "vocab.json alone": {"vocab.json": "{}"},
    "merges.txt alone": {"merges.txt": "#"},
    "tokenizer_config.json alone": {"tokenizer_config.json": "{}"},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_operator_and_runtime_agree(layout: str, tiny: Path, tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(tiny, tmp_path / "model"))
    for name in TOKENIZER_NAMES:
        (model_dir / name).unlink(missing_ok=True)
    for name, text in (LAYOUTS[layout] or {}).items():
        (model_dir / name).write_text(text)

    info = inspect_model(LocalSource(str(model_dir)))
    try:
        verify_model_dir(model_dir)
        runtime_accepts = True
    except VerifyError as error:
        assert "no tokenizer" in str(error)
        runtime_accepts = False
    assert info.has_tokenizer is runtime_accepts, layout
    expected = layout not in {
        "no tokenizer",
        "vocab.json alone",
        "merges.txt alone",
        "tokenizer_config.json alone",
    }
    assert runtime_accepts is expected

    # Whatever the rule accepts is fetched: selection takes every tokenizer file of the layout.
    listing = [(path.name, path.stat().st_size) for path in model_dir.iterdir()]
    taken = {selected.key for selected in select_files(listing).files}
    assert set(LAYOUTS[layout] or {}) <= taken


def test_find_tokenizer_names_the_files_and_their_companions() -> None:
    assert find_tokenizer(["vocab.json", "merges.txt", "tokenizer_config.json"]) == (
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
    )
    assert find_tokenizer(["sub/tokenizer.json"]) is None  # only the package root counts
