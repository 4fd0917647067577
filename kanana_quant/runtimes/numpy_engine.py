"""The numpy runtime: a Llama / Mixtral / Qwen3-MoE decoder forward with a KV cache, in float32.

Reads like the papers: RMSNorm → GQA attention with RoPE → residual → RMSNorm → SwiGLU MLP (or routed
SwiGLU experts) → residual. Linear layers are objects with `__call__(x)`, so float and packed quantized
weights run through the same forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from kanana_quant import names
from kanana_quant.config import ModelConfig
from kanana_quant.qcheckpoint import QTensor
from kanana_quant.rope import rope_frequencies
from kanana_quant.runtimes.generate import kv_capacity
from kanana_quant.weights import Weights


class Linear(Protocol):
    out_features: int

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


class FloatLinear:
    """y = x Wᵀ (+ b) with W stored [out, in] as in the checkpoint."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None = None):
        self.weight = np.ascontiguousarray(weight, dtype=np.float32)
        self.bias = None if bias is None else np.asarray(bias, dtype=np.float32)
        self.out_features = self.weight.shape[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class QLinear:
    """y = x Wᵀ for a linear of a quantized checkpoint: each block of output rows is unpacked from the
    memory-mapped file and dequantized when used, so neither a float nor an unpacked copy of the weights is
    ever held (holding unpacked codes, one byte each, made a 15.7B MoE's resident set 2.2× its file)."""

    ROWS = 1024  # a multiple of 32: GPTQ's 3-bit words pack 32 values

    def __init__(self, block: Callable[[slice], QTensor], out_features: int, bias: np.ndarray | None = None):
        self.block, self.out_features = block, out_features
        self.bias = None if bias is None else np.asarray(bias, dtype=np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = np.empty((x.shape[0], self.out_features), dtype=np.float32)
        for start in range(0, self.out_features, self.ROWS):
            rows = slice(start, min(start + self.ROWS, self.out_features))
            y[:, rows] = x @ self.block(rows).dequantize().T
        return y if self.bias is None else y + self.bias


class WeightSource(Protocol):
    config: ModelConfig

    def get(self, name: str, dtype=np.float32) -> np.ndarray: ...

    def linear(self, name: str, bias: str | None = None) -> Linear: ...


class CheckpointWeights:
    """Adapts a checkpoint (float or quantized) to the WeightSource protocol."""

    def __init__(self, checkpoint: Weights):
        self.checkpoint, self.config = checkpoint, checkpoint.config

    def get(self, name: str, dtype=np.float32) -> np.ndarray:
        return self.checkpoint.get(name, dtype)

    def linear(self, name: str, bias: str | None = None) -> Linear:
        b = None if bias is None else self.get(bias)
        if self.checkpoint.is_quantized(name):
            out_features = names.tensor_shape(self.config, name)[0]
            return QLinear(lambda rows: self.checkpoint.qtensor(name, rows), out_features, b)
        return FloatLinear(self.get(name), b)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    variance = np.mean(np.square(x), axis=-1, keepdims=True)
    return x / np.sqrt(variance + eps) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [T, heads, head_dim]; cos/sin [T, head_dim/2]. Rotates the two halves (HF's rotate_half layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


class DenseMLP:
    def __init__(self, gate: Linear, up: Linear, down: Linear):
        self.gate, self.up, self.down = gate, up, down

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.down(silu(self.gate(x)) * self.up(x))


def route(router_logits: np.ndarray, top_k: int, renormalise: bool) -> tuple[np.ndarray, np.ndarray]:
    """softmax → top-k → (optionally) renormalise: returns (expert ids [T, k], weights [T, k])."""
    probs = softmax(router_logits.astype(np.float32), axis=-1)
    top = np.argpartition(-probs, top_k - 1, axis=-1)[:, :top_k]
    weights = np.take_along_axis(probs, top, axis=-1)
    if renormalise:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return top, weights


class MoEMLP:
    """Routed SwiGLU experts: every token goes to its top-k experts, outputs mixed by router weight."""

    def __init__(self, router: Linear, experts: list[DenseMLP], top_k: int, renormalise: bool):
        self.router, self.experts, self.top_k, self.renormalise = router, experts, top_k, renormalise

    def __call__(self, x: np.ndarray) -> np.ndarray:
        top, weights = route(self.router(x), self.top_k, self.renormalise)
        out = np.zeros_like(x)
        for e in np.unique(top):
            rows, slot = np.nonzero(top == e)
            out[rows] += weights[rows, slot, None] * self.experts[e](x[rows])
        return out


@dataclass
class Layer:
    attn_norm: np.ndarray
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    ffn_norm: np.ndarray
    mlp: DenseMLP | MoEMLP
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None


def load_layer(source: WeightSource, i: int) -> Layer:
    cfg = source.config
    p = f"layers.{i}."
    bias = (lambda r: p + r + "_bias") if cfg.attention_bias else (lambda r: None)
    if cfg.moe:
        experts = [DenseMLP(*(source.linear(f"{p}experts.{e}.{r}") for r in ("gate", "up", "down")))
                   for e in range(cfg.moe.num_experts)]
        mlp = MoEMLP(source.linear(p + "router"), experts, cfg.moe.top_k, cfg.moe.norm_topk_prob)
    else:
        mlp = DenseMLP(*(source.linear(p + r) for r in ("gate", "up", "down")))
    return Layer(
        attn_norm=source.get(p + "attn_norm"),
        q=source.linear(p + "q", bias("q")), k=source.linear(p + "k", bias("k")),
        v=source.linear(p + "v", bias("v")), o=source.linear(p + "o"),
        ffn_norm=source.get(p + "ffn_norm"), mlp=mlp,
        q_norm=source.get(p + "q_norm") if cfg.qk_norm else None,
        k_norm=source.get(p + "k_norm") if cfg.qk_norm else None,
    )


class NumpyEngine:
    """prefill(ids) → logits of the last token; decode(id) → next logits; reset() clears the KV cache."""

    name = "numpy"

    def __init__(self, weights: Weights, max_seq_len: int | None = None,
                 on_layer: Callable[[int], None] | None = None, source: WeightSource | None = None,
                 kv_type: str = "f32"):
        """`source` builds the layers from `weights` (CheckpointWeights by default: packed codes stay packed);
        tests pass their own to compute the same model another way."""
        source = source or CheckpointWeights(weights)
        self.config = cfg = source.config
        self.max_seq_len = min(max_seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.embed = source.get("embed")
        self.layers = []
        for i in range(cfg.num_layers):
            self.layers.append(load_layer(source, i))
            if on_layer:
                on_layer(i)
        self.norm = source.get("norm")
        self.lm_head = (None if cfg.embedding else
                        FloatLinear(self.embed) if cfg.tie_word_embeddings else source.linear("lm_head"))
        self.inv_freq, self.rope_scale = rope_frequencies(cfg)
        self._cache_len = 0
        self.kv_dtype = {"f32": np.float32, "f16": np.float16}[kv_type]  # attention itself stays float32
        self.k_cache: np.ndarray | None = None
        self.v_cache: np.ndarray | None = None
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def _ensure_cache(self, length: int) -> None:
        new_len = kv_capacity(length, self._cache_len, self.max_seq_len)
        if new_len == self._cache_len:
            return
        cfg = self.config
        shape = (cfg.num_layers, cfg.num_kv_heads, new_len, cfg.head_dim)
        k, v = np.zeros(shape, self.kv_dtype), np.zeros(shape, self.kv_dtype)
        if self.k_cache is not None:
            k[:, :, :self._cache_len] = self.k_cache
            v[:, :, :self._cache_len] = self.v_cache
        self.k_cache, self.v_cache, self._cache_len = k, v, new_len

    def forward(self, ids, all_logits: bool = False) -> np.ndarray:
        """Run new tokens at positions pos.. through the model, appending to the KV cache."""
        x = self._hidden(ids, all_logits)
        logits = self.lm_head(x)
        return logits if all_logits else logits[0]

    # Tokens per stacked encoder forward: enough to unpack each quantized weight once for many rows, few
    # enough that the [tokens, intermediate] temporaries stay small (2048 × 8960 float32 is 73 MB).
    ENCODE_TOKENS = 2048

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray, pool_mask: np.ndarray) -> np.ndarray:
        """Mean of the last hidden states over pool_mask, per row of a right-padded batch [B, T] → [B, hidden].
        Rows run without their padding, their tokens stacked up to ENCODE_TOKENS at a time: every linear runs
        once per stack (a quantized weight is unpacked once for many rows, not once per row) and attention runs
        per row, each row at positions 0..n-1 seeing only its own tokens (no KV cache)."""
        lengths = [int(m.sum()) for m in attention_mask]
        if any(not m[:n].all() for m, n in zip(attention_mask, lengths)):
            raise ValueError("attention_mask rows must be right-padded (tokens first, then zeros)")
        rows = [np.asarray(r[:n], np.int64) for r, n in zip(input_ids, lengths)]
        pools = [np.asarray(p[:n], np.float32) for p, n in zip(pool_mask, lengths)]
        out, first, tokens = [], 0, 0
        for b, n in enumerate(lengths + [0]):
            if b == len(lengths) or (tokens and tokens + n > self.ENCODE_TOKENS):
                out.append(self._pooled(rows[first:b], pools[first:b]))
                first, tokens = b, 0
            tokens += n
        return np.concatenate(out)

    def _pooled(self, rows: list[np.ndarray], pools: list[np.ndarray]) -> np.ndarray:
        cfg = self.config
        bounds = np.cumsum([0, *map(len, rows)])
        spans = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        cos, sin = self._rope_rows(np.concatenate([np.arange(len(r)) for r in rows]))
        x = self.embed[np.concatenate(rows)]
        for layer in self.layers:
            q, k, v = self._qkv(layer, rms_norm(x, layer.attn_norm, cfg.rms_norm_eps), cos, sin)
            ctx = np.concatenate([self._attend(q[r], k[r].transpose(1, 0, 2), v[r].transpose(1, 0, 2))
                                  for r in spans])
            x = x + layer.o(ctx)
            x = x + layer.mlp(rms_norm(x, layer.ffn_norm, cfg.rms_norm_eps))
        x = rms_norm(x, self.norm, cfg.rms_norm_eps)
        return np.stack([p @ x[r] / p.sum() for p, r in zip(pools, spans)])

    def _rope_rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        angles = np.outer(positions.astype(np.float64), self.inv_freq)
        return ((np.cos(angles) * self.rope_scale).astype(np.float32),
                (np.sin(angles) * self.rope_scale).astype(np.float32))

    def _hidden(self, ids, all_positions: bool) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        start, t = self.pos, len(ids)
        self._ensure_cache(start + t)
        cos, sin = self._rope_rows(np.arange(start, start + t))
        x = self.embed[ids]
        for i, layer in enumerate(self.layers):
            x = x + self._attention(i, layer, rms_norm(x, layer.attn_norm, self.config.rms_norm_eps), cos, sin)
            x = x + layer.mlp(rms_norm(x, layer.ffn_norm, self.config.rms_norm_eps))
        self.pos = start + t
        return rms_norm(x if all_positions else x[-1:], self.norm, self.config.rms_norm_eps)

    def _qkv(self, layer: Layer, x: np.ndarray, cos: np.ndarray, sin: np.ndarray):
        """q [T, heads, d], k and v [T, kv heads, d], q and k normed (Qwen3) and rotated."""
        cfg = self.config
        t, d = x.shape[0], cfg.head_dim
        q = layer.q(x).reshape(t, cfg.num_heads, d)
        k = layer.k(x).reshape(t, cfg.num_kv_heads, d)
        v = layer.v(x).reshape(t, cfg.num_kv_heads, d)
        if layer.q_norm is not None:
            q = rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _attend(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, causal: bool = False) -> np.ndarray:
        """q [T, heads, d] over keys/values [kv, S, d] (the last T of S are q's own positions) → [T, q_size]."""
        cfg = self.config
        t, d, kv, end = q.shape[0], cfg.head_dim, cfg.num_kv_heads, keys.shape[1]
        # Grouped-query attention: the heads sharing one KV head form a group [kv, group, T, d].
        q = q.transpose(1, 0, 2).reshape(kv, cfg.num_heads // kv, t, d)
        scores = (q @ keys[:, None].transpose(0, 1, 3, 2)) / np.float32(np.sqrt(d))
        if causal and t > 1:
            future = np.arange(end)[None, :] > np.arange(end - t, end)[:, None]
            scores = np.where(future, np.float32(-np.inf), scores)
        out = softmax(scores) @ values[:, None]  # [kv, group, T, d]
        return out.reshape(cfg.num_heads, t, d).transpose(1, 0, 2).reshape(t, cfg.q_size)

    def _attention(self, i: int, layer: Layer, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        q, k, v = self._qkv(layer, x, cos, sin)
        start, end = self.pos, self.pos + x.shape[0]
        self.k_cache[i, :, start:end] = k.transpose(1, 0, 2)
        self.v_cache[i, :, start:end] = v.transpose(1, 0, 2)
        keys = self.k_cache[i, :, :end].astype(np.float32, copy=False)  # [kv, S, d]
        values = self.v_cache[i, :, :end].astype(np.float32, copy=False)
        # an encoder's tokens see every token of their sequence
        return layer.o(self._attend(q, keys, values, causal=self.config.causal))

    def prefill(self, ids) -> np.ndarray:
        self.reset()
        return self.forward(ids)

    def decode(self, token_id: int) -> np.ndarray:
        return self.forward([token_id])
