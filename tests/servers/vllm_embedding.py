"""A tiny sentence-transformers embedding model (mean pooling) served by the real vLLM CPU build
through the runtime, once per test session.

The layout is what e5, MiniLM and gte ship: a BERT encoder (random weights, built offline with
transformers), a WordPiece tokenizer trained with `tokenizers`, `modules.json` naming a Pooling
module, `1_Pooling/config.json` choosing mean pooling, and `sentence_bert_config.json`. It is
uploaded to SeaweedFS and fetched by the runtime, so what vLLM sees is what file selection took:
without modules.json and 1_Pooling/ vLLM falls back to BERT's CLS pooling.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from modelship.runtime.demo import free_port
from modelship.runtime.main import local_command

BUCKET = "embedding-e2e"
PREFIX = "tiny-mean-bert"
SERVED_MODEL_NAME = "tiny-embed"
HIDDEN_SIZE = 128  # 2 heads of 64: the CPU attention kernels take head sizes of 32 and up
MAX_POSITIONS = 128
READY_TIMEOUT_SECONDS = 300.0

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "pack my box with five dozen liquor jugs",
    "how vexingly quick daft zebras jump",
    "sphinx of black quartz judge my vow",
    "what is the capital of france paris is the capital",
    "embeddings place similar sentences close together",
]


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def build_mean_pooling_model(directory: Path, *, seed: int = 0) -> Path:
    """Write the tiny sentence-transformers BERT into `directory` and return it."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel

    directory.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials)
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer.save(str(directory / "tokenizer.json"))
    _write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "mask_token": "[MASK]",
            "model_max_length": MAX_POSITIONS,
        },
    )

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        max_position_embeddings=MAX_POSITIONS,
        type_vocab_size=2,
        pad_token_id=tokenizer.token_to_id("[PAD]"),
        architectures=["BertModel"],
    )
    model = BertModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(str(directory), safe_serialization=True)

    _write_json(
        directory / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {
                "idx": 1,
                "name": "1",
                "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling",
            },
        ],
    )
    _write_json(
        directory / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": HIDDEN_SIZE,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
    )
    _write_json(
        directory / "sentence_bert_config.json",
        {"max_seq_length": MAX_POSITIONS, "do_lower_case": True},
    )
    _write_json(
        directory / "config_sentence_transformers.json",
        {"__version__": {"sentence_transformers": "3.0.0"}, "similarity_fn_name": "cosine"},
    )
    return directory


@dataclass(frozen=True)
class EmbeddingVllm:
    base_url: str
    served_model_name: str
    source_dir: Path
    model_dir: Path
    log_path: Path


@pytest.fixture(scope="session")
def embedding_vllm(
    s3_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddingVllm]:
    """The runtime (fetch from SeaweedFS, verify, launch) serving the tiny embedding model."""
    # Imported here: a plugin module importing another at load time defeats assert rewriting.
    from tests.servers.vllm_server import running_runtime, upload_model

    workdir = tmp_path_factory.mktemp("embedding-vllm")
    source_dir = build_mean_pooling_model(workdir / "source")
    upload_model(s3_server, source_dir, BUCKET, PREFIX)
    port, metrics_port = free_port(), free_port()
    status_path = workdir / "status.json"
    log_path = workdir / "runtime.log"
    model_dir = workdir / "pod" / "model"
    command = local_command(
        source=f"s3://{BUCKET}/{PREFIX}",
        model_dir=model_dir,
        served_model_name=SERVED_MODEL_NAME,
        port=port,
        metrics_port=metrics_port,
        status_file=status_path,
        engine_args=["--runner", "pooling", "--dtype", "float32", "--max-model-len", "128"],
        s3_endpoint_url=s3_server.endpoint_url,
        predicted_kv_cache_tokens=1024,
        ready_timeout_seconds=READY_TIMEOUT_SECONDS,
    )
    with running_runtime(command, s3_server, status_path, log_path):
        yield EmbeddingVllm(
            base_url=f"http://127.0.0.1:{port}",
            served_model_name=SERVED_MODEL_NAME,
            source_dir=source_dir,
            model_dir=model_dir,
            log_path=log_path,
        )
