"""Our canonical tensor names as llama GGUF tensors (from gguf-py's MODEL_TENSOR tables), and the Q/K row
order llama.cpp's converter stores."""

from __future__ import annotations

import gguf
import numpy as np
from gguf import MODEL_TENSOR as MT

from kanana_quant.errors import KananaQuantError

ARCH = gguf.MODEL_ARCH.LLAMA
ARCH_NAME = gguf.MODEL_ARCH_NAMES[ARCH]  # "llama": the metadata key prefix and general.architecture

GLOBAL_TENSORS = {"embed": MT.TOKEN_EMBD, "norm": MT.OUTPUT_NORM, "lm_head": MT.OUTPUT}
LAYER_TENSORS = {
    "attn_norm": MT.ATTN_NORM, "q": MT.ATTN_Q, "k": MT.ATTN_K, "v": MT.ATTN_V, "o": MT.ATTN_OUT,
    "q_bias": MT.ATTN_Q, "k_bias": MT.ATTN_K, "v_bias": MT.ATTN_V,
    "ffn_norm": MT.FFN_NORM, "gate": MT.FFN_GATE, "up": MT.FFN_UP, "down": MT.FFN_DOWN,
    "router": MT.FFN_GATE_INP,
}
EXPERT_TENSORS = {"gate": MT.FFN_GATE_EXP, "up": MT.FFN_UP_EXP, "down": MT.FFN_DOWN_EXP}  # stacked experts


def tensor_name(kind: MT, bid: int | None = None, suffix: str = "weight") -> str:
    """The GGUF name of a llama tensor kind, e.g. ATTN_Q in block 3 -> blk.3.attn_q.weight."""
    if kind not in gguf.MODEL_TENSORS[ARCH]:
        raise KananaQuantError(f"the llama GGUF architecture has no {kind.name} tensor")
    return f"{gguf.TENSOR_NAMES[kind].format(bid=bid)}.{suffix}"


ROPE_FREQS = tensor_name(MT.ROPE_FREQS)  # Llama-3 RoPE scaling, stored as per-frequency divisors


def legacy_expert_name(layer: int, proj: str, expert: int) -> str:
    """One expert's own tensor, as GGUFs before stacked experts (2024) stored them: blk.L.ffn_gate.E.weight."""
    return f"{gguf.TENSOR_NAMES[LAYER_TENSORS[proj]].format(bid=layer)}.{expert}.weight"


def _qk_order(rows: int, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute as a row order: row i of the GGUF tensor is row order[i] of
    the Hugging Face one. Per head llama.cpp rotates adjacent pairs (rows 0, d/2, 1, d/2+1, ...); Hugging Face
    rotates the first half against the second."""
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Q or K rows (weights, biases, or packed rows of either) in llama.cpp's order."""
    return w[_qk_order(len(w), n_head)]


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of permute_qk: llama.cpp's row order back to Hugging Face's."""
    return w[np.argsort(_qk_order(len(w), n_head))]
