"""A tiny Llama-architecture model, built offline, for tests, the demo and the benchmark.

Random bf16 weights (hidden 128, 2 layers, 4 heads, 2 KV heads, intermediate 256, vocabulary
1024, 2048 positions) written with the `safetensors` library, a byte-level BPE tokenizer trained
with `tokenizers` on the paragraphs below, a chat template and a generation config. The result
is about 1.2 MB, deterministic for a seed, and loads in the real vLLM. It says nothing sensible:
it exists so that every part of the serving path runs for real in seconds, not hours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HIDDEN_SIZE = 128
NUM_LAYERS = 2
NUM_ATTENTION_HEADS = 4
NUM_KEY_VALUE_HEADS = 2
HEAD_DIM = HIDDEN_SIZE // NUM_ATTENTION_HEADS
INTERMEDIATE_SIZE = 256
VOCAB_SIZE = 1024
MAX_POSITION_EMBEDDINGS = 2048

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"

# A minimal Llama-3-like chat template: one header per message, then the assistant's turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_CORPUS = """\
Modelship sizes the hardware a language model needs from its parameter count, its architecture
and its quantization, then asks the cluster for a node pool of that hardware and serves the model
with vLLM behind an OpenAI-compatible endpoint.

A runtime pod pulls the weights from object storage with many parallel ranged requests, checks
that every shard is complete, and starts the engine. The engine reserves memory for the weights,
for the activations of one batch, and gives the rest to the key-value cache, which holds the
attention keys and values of every token of every sequence being served.

The paged attention kernel stores the cache in blocks of sixteen tokens, so a sequence wastes
less than one block. A longer context or more concurrent sequences need more blocks; when the
cache is full, requests wait in the queue until a running sequence finishes.

On Inferentia and Trainium the model is compiled ahead of time for fixed shapes: the batch size,
the sequence length and the tensor-parallel degree. The compiled artifacts are cached so that the
next pod with the same shapes starts in minutes instead of compiling again.

The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How
vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. 0123456789, and then
some punctuation: commas, colons; question marks? exclamation marks! (parentheses) [brackets].
Hello, how are you today? I am fine, thank you. What is the capital of France? Paris is.
"""


def _train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    # Byte-level: any text encodes, so requests never fail on unknown characters.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=[BOS_TOKEN, EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    paragraphs = [p for p in _CORPUS.split("\n\n") if p.strip()]
    # Repeat so that merges of rare pairs still reach min_frequency deterministically.
    tokenizer.train_from_iterator(paragraphs * 4, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tokenizer


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even), as uint16."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> np.ndarray:
        return _bf16_bits(rng.normal(0.0, 0.02, size=shape).astype(np.float32))

    def ones(size: int) -> np.ndarray:
        return _bf16_bits(np.ones(size, dtype=np.float32))

    kv_width = NUM_KEY_VALUE_HEADS * HEAD_DIM
    tensors: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal(VOCAB_SIZE, HIDDEN_SIZE)}
    for layer in range(NUM_LAYERS):
        prefix = f"model.layers.{layer}."
        tensors[prefix + "self_attn.q_proj.weight"] = normal(HIDDEN_SIZE, HIDDEN_SIZE)
        tensors[prefix + "self_attn.k_proj.weight"] = normal(kv_width, HIDDEN_SIZE)
        tensors[prefix + "self_attn.v_proj.weight"] = normal(kv_width, HIDDEN_SIZE)
        tensors[prefix + "self_attn.o_proj.weight"] = normal(HIDDEN_SIZE, HIDDEN_SIZE)
        tensors[prefix + "mlp.gate_proj.weight"] = normal(INTERMEDIATE_SIZE, HIDDEN_SIZE)
        tensors[prefix + "mlp.up_proj.weight"] = normal(INTERMEDIATE_SIZE, HIDDEN_SIZE)
        tensors[prefix + "mlp.down_proj.weight"] = normal(HIDDEN_SIZE, INTERMEDIATE_SIZE)
        tensors[prefix + "input_layernorm.weight"] = ones(HIDDEN_SIZE)
        tensors[prefix + "post_attention_layernorm.weight"] = ones(HIDDEN_SIZE)
    tensors["model.norm.weight"] = ones(HIDDEN_SIZE)
    tensors["lm_head.weight"] = normal(VOCAB_SIZE, HIDDEN_SIZE)
    return tensors


def _write_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    # numpy has no bfloat16: hand safetensors the raw bf16 bit patterns with an explicit dtype.
    specs = {
        name: safetensors.TensorSpec(
            dtype="bfloat16",
            shape=list(array.shape),
            data_ptr=array.ctypes.data,
            data_len=array.nbytes,
        )
        for name, array in tensors.items()
    }
    safetensors.serialize_file(specs, str(path), metadata={"format": "pt"})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build_tiny_model(directory: Path, *, seed: int = 0, num_shards: int = 1) -> Path:
    """Write the tiny model into `directory` (created if missing) and return it.

    The same seed gives byte-identical files. With `num_shards` > 1 the weights are split into
    `model-0000i-of-0000n.safetensors` files with a `model.safetensors.index.json`, the layout of
    real multi-shard checkpoints.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    pad_id = tokenizer.token_to_id(PAD_TOKEN)

    _write_json(
        directory / "config.json",
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": HIDDEN_SIZE,
            "intermediate_size": INTERMEDIATE_SIZE,
            "num_hidden_layers": NUM_LAYERS,
            "num_attention_heads": NUM_ATTENTION_HEADS,
            "num_key_value_heads": NUM_KEY_VALUE_HEADS,
            "head_dim": HEAD_DIM,
            "hidden_act": "silu",
            "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
            "vocab_size": VOCAB_SIZE,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "pad_token_id": pad_id,
        },
    )
    _write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "model_max_length": MAX_POSITION_EMBEDDINGS,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        directory / "special_tokens_map.json",
        {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN},
    )
    _write_json(
        directory / "generation_config.json",
        {
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "pad_token_id": pad_id,
            "do_sample": False,
        },
    )
    tensors = _weights(seed)
    if num_shards == 1:
        shards = {"model.safetensors": list(tensors)}
    else:
        names = list(tensors)
        shards = {
            f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors": names[i::num_shards]
            for i in range(num_shards)
        }
        weight_map = {name: shard for shard, members in shards.items() for name in members}
        total_bytes = sum(array.nbytes for array in tensors.values())
        _write_json(
            directory / "model.safetensors.index.json",
            {"metadata": {"total_size": total_bytes}, "weight_map": weight_map},
        )
    for shard, members in shards.items():
        path = directory / shard
        _write_safetensors({name: tensors[name] for name in members}, path)
        path.chmod(0o644)  # the library writes 0600; the model is meant to be shared
    return directory
