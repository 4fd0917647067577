"""Facts about the Kanana model family, kept in one place.

Presets are written as Hugging Face ``config.json`` dicts so that they go through the same parser as a
real checkpoint (``ModelConfig.from_hf``) and ``synth`` can write them verbatim. Sources: shared/reference/
kanana-models.md; values marked "inferred" there are inferred here too.
"""

from __future__ import annotations

# Llama-3 tokenizer: 128,000 byte-level BPE tokens followed by 256 special tokens.
BPE_VOCAB_SIZE = 128000
PRE_TOKENIZER = "llama-bpe"  # Llama-3's pre-tokenizer split, by llama.cpp's name (gguf.vocab holds the regexes)
NUM_SPECIAL_TOKENS = 256
VOCAB_SIZE = BPE_VOCAB_SIZE + NUM_SPECIAL_TOKENS

# The named special tokens, by offset from the first special id (Llama-3.1 layout); the rest of the
# 256 are <|reserved_special_token_N|>.
NAMED_SPECIAL_TOKENS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    4: "<|finetune_right_pad_id|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
    10: "<|python_tag|>",
}
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
EOT_TOKEN = "<|eot_id|>"
EOM_TOKEN = "<|eom_id|>"


def special_tokens() -> list[str]:
    """All 256 special token strings in id order (offset 0 = <|begin_of_text|>)."""
    out, reserved = [], 0
    for i in range(NUM_SPECIAL_TOKENS):
        if i in NAMED_SPECIAL_TOKENS:
            out.append(NAMED_SPECIAL_TOKENS[i])
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return out


BOS_TOKEN_ID = BPE_VOCAB_SIZE + 0  # 128000
EOS_TOKEN_ID = BPE_VOCAB_SIZE + 1  # 128001
EOT_TOKEN_ID = BPE_VOCAB_SIZE + 9  # 128009

DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant developed by Kakao."

# Llama-3 header chat format, as Kanana's instruct models use it. Rendered in a sandbox (tokenizer.py).
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Kanana-1.5-8B's YaRN block from the kakao/kanana README (old `type` key, not `rope_type`).
YARN_128K = {
    "type": "yarn",
    "factor": 4.4,
    "original_max_position_embeddings": 32768,
    "beta_fast": 64,
    "beta_slow": 2,
}

_LLAMA_COMMON = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": VOCAB_SIZE,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": [EOS_TOKEN_ID, EOT_TOKEN_ID],
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": "bfloat16",
}

PRESETS: dict[str, dict] = {
    "kanana-nano-2.1b": {
        **_LLAMA_COMMON,
        "hidden_size": 1792,
        "num_hidden_layers": 32,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,  # explicit: 1792 / 24 is not whole
        "intermediate_size": 8064,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    },
    # Same family as nano (its own hidden size is not public; reference notes say "same family").
    "kanana-1.5-2.1b": {
        **_LLAMA_COMMON,
        "hidden_size": 1792,
        "num_hidden_layers": 32,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 8064,
        "rope_theta": 500000.0,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
    },
    "kanana-1.5-8b": {
        **_LLAMA_COMMON,
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 14336,  # inferred from shard sizes
        "rope_theta": 8000000.0,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,  # inferred
    },
    # Kanana-1.5-8B with the README's YaRN block for 128K context.
    "kanana-1.5-8b-yarn": {
        **_LLAMA_COMMON,
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 14336,
        "rope_theta": 8000000.0,
        "max_position_embeddings": 131072,
        "rope_scaling": dict(YARN_128K),
        "tie_word_embeddings": False,
    },
    # MoE upcycled from the 3B dense model. Class and hidden size are inferred (Mixtral-like).
    "kanana-1.5-15.7b-a3b": {
        **_LLAMA_COMMON,
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": 2048,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 1152,
        "num_local_experts": 64,
        "num_experts_per_tok": 8,
        "rope_theta": 500000.0,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
    },
}


# --- Embedding model: kanana-nano-2.1b-embedding (shared/reference/kanana-models.md, "Embedding model") ---
# Kanana2VecModel is a Llama backbone (tensors under "model.", no lm_head) whose attention is bidirectional on
# every layer (the mask hides only padding); the embedding is the mean of the final-norm hidden states over
# the tokens, with the instruction prefix of a query (BOS included: it is tokenized with the prefix) left out.
# Upstream loads it with trust_remote_code; we never run that code, the forward is ours.
EMBEDDING_ARCHITECTURE = "Kanana2VecModel"
EMBEDDING_POOLING = "mean"
# A query is "{prefix} {text}" with this prefix; a document is its text alone (both stripped).
EMBEDDING_QUERY_PREFIX = "Instruct: {instruction}\nQuery:"
EMBEDDING_MAX_LENGTH = 512  # tokens, BOS included; longer texts are truncated
# Padding is EOS (right-padded batches; RoPE positions count from 0 in every row).

PRESETS["kanana-nano-2.1b-embedding"] = {
    **PRESETS["kanana-nano-2.1b"],
    "architectures": [EMBEDDING_ARCHITECTURE],
    "model_type": "kanana2vec",
    "eos_token_id": EOS_TOKEN_ID,
    "pad_token_id": EOS_TOKEN_ID,
}
