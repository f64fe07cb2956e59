"""A mean-pooling sentence-transformers model, fetched from SeaweedFS by the runtime and served by
the real vLLM CPU build (`embedding_vllm`, tests/servers/vllm_embedding.py), embeds the way
sentence-transformers would: the mean of the encoder's token vectors, not the CLS vector."""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch
from tokenizers import Tokenizer
from transformers import BertModel

from tests.servers.vllm_embedding import EmbeddingVllm

SENTENCES = ["the quick brown fox jumps over the lazy dog", "what is the capital of france"]


def _embed(server: EmbeddingVllm, texts: list[str]) -> list[list[float]]:
    request = urllib.request.Request(
        f"{server.base_url}/v1/embeddings",
        data=json.dumps({"model": server.served_model_name, "input": texts}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read())
    return [item["embedding"] for item in sorted(body["data"], key=lambda item: item["index"])]


def _reference(server: EmbeddingVllm, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean-pooled, CLS) vectors computed with torch from the safetensors weights, normalized."""
    tokenizer = Tokenizer.from_file(str(server.source_dir / "tokenizer.json"))
    ids = torch.tensor([tokenizer.encode(text).ids])
    model = BertModel.from_pretrained(str(server.source_dir), add_pooling_layer=False).eval()
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
    mean, cls = hidden.mean(dim=0), hidden[0]
    return (
        torch.nn.functional.normalize(mean, dim=0),
        torch.nn.functional.normalize(cls, dim=0),
    )


def test_the_sentence_transformers_files_were_fetched(embedding_vllm: EmbeddingVllm) -> None:
    for name in ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json"):
        assert (embedding_vllm.model_dir / name).is_file(), name


@pytest.mark.parametrize("index", range(len(SENTENCES)))
def test_embedding_is_mean_pooled(embedding_vllm: EmbeddingVllm, index: int) -> None:
    served = torch.tensor(_embed(embedding_vllm, SENTENCES)[index])
    served = torch.nn.functional.normalize(served, dim=0)
    mean, cls = _reference(embedding_vllm, SENTENCES[index])
    # vLLM computes in float32 like the reference; a different pooling is far off.
    assert torch.max(torch.abs(served - mean)).item() < 1e-3
    assert torch.max(torch.abs(served - cls)).item() > 1e-2
