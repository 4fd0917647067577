"""Synthetic Kanana-shaped models: complete HF directories with random weights and a small trained
byte-level BPE tokenizer carrying Kanana's (Llama-3's) special tokens.

Tiny models are the test fixtures; full presets (real Kanana shapes, random weights) feed the speed
benchmarks. Weights are produced one tensor at a time, so a 31 GB preset never sits in RAM.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from kanana_quant import kanana, names
from kanana_quant.checkpoint import save_checkpoint
from kanana_quant.config import ModelConfig
from kanana_quant.errors import KananaQuantError
from kanana_quant.gguf.vocab import pre_tokenizer
from kanana_quant.safetensors_io import TensorSpec

TINY_BPE_VOCAB = 1024
TINY_VOCAB = TINY_BPE_VOCAB + kanana.NUM_SPECIAL_TOKENS

_TINY_COMMON = {
    "vocab_size": TINY_VOCAB,
    "hidden_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,  # explicit and != hidden / heads, as in Kanana-Nano
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 512,
    "bos_token_id": TINY_BPE_VOCAB + 0,
    "eos_token_id": [TINY_BPE_VOCAB + 1, TINY_BPE_VOCAB + 9],
    "hidden_act": "silu",
    "attention_bias": False,
    "torch_dtype": "float32",
}
TINY: dict[str, dict] = {
    "dense": {**_TINY_COMMON, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "intermediate_size": 192, "mlp_bias": False, "tie_word_embeddings": True},
    "moe": {**_TINY_COMMON, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "intermediate_size": 64, "num_local_experts": 8, "num_experts_per_tok": 2,
            "tie_word_embeddings": False},
    "qwen-moe": {**_TINY_COMMON, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                 "intermediate_size": 128, "moe_intermediate_size": 64, "num_experts": 8,
                 "num_experts_per_tok": 2, "norm_topk_prob": True, "tie_word_embeddings": False},
    # Kanana2Vec-shaped: the dense backbone under "model.", no lm_head, bidirectional, mean-pooled.
    "embedding": {**_TINY_COMMON, "architectures": [kanana.EMBEDDING_ARCHITECTURE], "model_type": "kanana2vec",
                  "intermediate_size": 192, "mlp_bias": False, "tie_word_embeddings": True,
                  "eos_token_id": TINY_BPE_VOCAB + 1, "pad_token_id": TINY_BPE_VOCAB + 1},
}


def corpus_text() -> str:
    return resources.files("kanana_quant").joinpath("data/bilingual_train.txt").read_text(encoding="utf-8")


def train_tokenizer(bpe_vocab_size: int = TINY_BPE_VOCAB) -> Tokenizer:
    """A byte-level BPE with Llama-3's pre-tokenizer, trained on our bilingual corpus; the 256 special
    tokens follow the BPE vocabulary in Llama-3's order, so with bpe_vocab_size=128000 they get Kanana's ids
    (<|begin_of_text|> = 128000). Ids past the trained vocabulary are unreachable placeholders."""
    trained = min(bpe_vocab_size, TINY_BPE_VOCAB)
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizer(kanana.PRE_TOKENIZER)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=trained, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    tok.train_from_iterator(corpus_text().split("\n\n"), trainer=trainer)
    if tok.get_vocab_size() != trained:
        raise RuntimeError(f"corpus too small: BPE reached {tok.get_vocab_size()} of {trained} tokens")
    if bpe_vocab_size > trained:
        # tokenizers renumbers added tokens after the model vocabulary, so pad the vocabulary itself.
        data = json.loads(tok.to_str())
        data["model"]["vocab"].update({f"<|kq_unused_{i}|>": i for i in range(trained, bpe_vocab_size)})
        tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens(kanana.special_tokens())
    bos = (kanana.BOS_TOKEN, bpe_vocab_size)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B", special_tokens=[bos]),
    ])
    return tok


def tokenizer_config(max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": kanana.BOS_TOKEN,
        "eos_token": kanana.EOT_TOKEN,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": kanana.CHAT_TEMPLATE,
    }


def init_scale(cfg: ModelConfig, name: str) -> tuple[float, float]:
    """(mean, std) of a tensor's random init: activations stay O(1) and logits spread over a few units."""
    role = name.rsplit(".", 1)[-1]
    shape = names.tensor_shape(cfg, name)
    if role in ("norm", "attn_norm", "ffn_norm", "q_norm", "k_norm"):
        return 1.0, 0.1
    if role.endswith("_bias"):
        return 0.0, 0.1
    if role in ("embed", "lm_head"):
        return 0.0, 2.0 / math.sqrt(cfg.hidden_size)
    return 0.0, 1.0 / math.sqrt(shape[1])


class _NormalPool:
    """Random normals for any number of tensors at memory speed: rotate and tile one pool of 2^22 draws.
    (Speed benchmarks need real shapes, not independent values; tests' tiny tensors never wrap.)"""

    def __init__(self, seed: int, size: int = 1 << 22):
        self.rng = np.random.default_rng(seed)
        self.pool = self.rng.standard_normal(size, dtype=np.float32)

    def draw(self, shape: tuple[int, ...], mean: float, std: float) -> np.ndarray:
        start = int(self.rng.integers(len(self.pool)))
        flat = np.resize(np.concatenate([self.pool[start:], self.pool[:start]]), math.prod(shape))
        return (flat * np.float32(std) + np.float32(mean)).reshape(shape)


def synth_model(out_dir: str | Path, hf_config: dict, seed: int = 0, dtype: str = "F32",
                overwrite: bool = False, on_tensor: Callable[[TensorSpec], None] | None = None) -> Path:
    """Write a complete HF model directory with random weights; returns its path."""
    if dtype not in ("F32", "F16", "BF16"):
        raise KananaQuantError(f"--dtype must be F32, F16 or BF16, got {dtype}")
    hf_config = dict(hf_config)
    hf_config["torch_dtype"] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype]
    cfg = ModelConfig.from_hf(hf_config, "synth config")
    tok = train_tokenizer(cfg.vocab_size - kanana.NUM_SPECIAL_TOKENS)
    hf_names = names.hf_name_map(cfg)
    to_canonical = {hf: name for name, hf in hf_names.items()}
    specs = [TensorSpec(hf_names[n], dtype, names.tensor_shape(cfg, n)) for n in names.canonical_names(cfg)]
    pool = _NormalPool(seed)

    def produce(spec: TensorSpec) -> np.ndarray:
        return pool.draw(spec.shape, *init_scale(cfg, to_canonical[spec.name]))

    files = {
        "config.json": json.dumps(hf_config, indent=2, ensure_ascii=False),
        "tokenizer.json": tok.to_str(pretty=False),
        "tokenizer_config.json": json.dumps(tokenizer_config(cfg.max_position_embeddings), indent=2,
                                            ensure_ascii=False),
        "generation_config.json": json.dumps({"bos_token_id": cfg.bos_token_id,
                                              "eos_token_id": list(cfg.eos_token_ids)}, indent=2),
    }
    return save_checkpoint(out_dir, specs, produce, files, overwrite=overwrite, on_tensor=on_tensor)


def preset_config(name: str) -> dict:
    """The HF config.json of a full-size preset or a tiny test model ('tiny-dense', 'tiny-moe', ...)."""
    if name.startswith("tiny-") and name[5:] in TINY:
        return dict(TINY[name[5:]])
    if name in kanana.PRESETS:
        return dict(kanana.PRESETS[name])
    choices = [f"tiny-{t}" for t in TINY] + list(kanana.PRESETS)
    raise KananaQuantError(f"unknown model preset {name!r}; choose one of: {', '.join(choices)}")
