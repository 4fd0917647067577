"""One decoder layer in torch, split into the stages calibration needs.

Used only by quantization: GPTQ's true-sequential order quantizes q/k/v, then o, then gate/up, then down,
each on the inputs produced by the already-quantized sub-layers, so the layer is exposed stage by stage.
Weights live in a plain dict keyed by canonical role and may be swapped for quantized ones in between.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kanana_quant.config import ModelConfig
from kanana_quant.rope import rope_frequencies


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_tables(cfg: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq, scale = rope_frequencies(cfg)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), torch.from_numpy(inv_freq))
    return (torch.cos(angles) * scale).float(), (torch.sin(angles) * scale).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, d]; rotates the two halves (HF's rotate_half layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def route(router_logits: torch.Tensor, top_k: int, renormalise: bool):
    """softmax → top-k → renormalise: (probabilities [N, E], expert ids [N, k], weights [N, k])."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalise:
        weights = weights / weights.sum(-1, keepdim=True)
    return probs, experts, weights


class TorchLayer:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], seq_len: int):
        self.cfg, self.w = cfg, weights
        self.cos, self.sin = rope_tables(cfg, seq_len)

    def linear(self, x: torch.Tensor, role: str) -> torch.Tensor:
        return F.linear(x, self.w[role], self.w.get(role + "_bias"))

    # -- attention ------------------------------------------------------------------------------------
    def attention_input(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.w["attn_norm"], self.cfg.rms_norm_eps)

    def attention_context(self, xn: torch.Tensor) -> torch.Tensor:
        """GQA attention up to (not including) o_proj: [B, T, heads·head_dim]; causal for decoders,
        bidirectional for encoders (calibration windows have no padding, so no mask is needed)."""
        cfg = self.cfg
        b, t, _ = xn.shape
        q = self.linear(xn, "q").view(b, t, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = self.linear(xn, "k").view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.linear(xn, "v").view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm:
            q = rms_norm(q, self.w["q_norm"], cfg.rms_norm_eps)
            k = rms_norm(k, self.w["k_norm"], cfg.rms_norm_eps)
        cos, sin = self.cos[:t], self.sin[:t]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal, enable_gqa=True)
        return ctx.transpose(1, 2).reshape(b, t, cfg.q_size)

    def after_attention(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return x + self.linear(ctx, "o")

    # -- MLP ------------------------------------------------------------------------------------------
    def mlp_input(self, h: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, self.w["ffn_norm"], self.cfg.rms_norm_eps)

    def swiglu_hidden(self, xn: torch.Tensor, prefix: str = "") -> torch.Tensor:
        """The input of down_proj: silu(gate(x)) · up(x)."""
        return F.silu(self.linear(xn, prefix + "gate")) * self.linear(xn, prefix + "up")

    def routing(self, xn: torch.Tensor):
        moe = self.cfg.moe
        return route(self.linear(xn, "router"), moe.top_k, moe.norm_topk_prob)

    def mlp(self, xn: torch.Tensor) -> torch.Tensor:
        if not self.cfg.moe:
            return self.linear(self.swiglu_hidden(xn), "down")
        shape = xn.shape
        flat = xn.reshape(-1, shape[-1])
        _, experts, weights = self.routing(flat)
        out = torch.zeros_like(flat)
        for e in experts.unique().tolist():
            rows, slot = torch.nonzero(experts == e, as_tuple=True)
            p = f"experts.{e}."
            y = self.linear(self.swiglu_hidden(flat[rows], p), p + "down")
            out.index_add_(0, rows, y * weights[rows, slot, None].to(y.dtype))
        return out.view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.after_attention(x, self.attention_context(self.attention_input(x)))
        return h + self.mlp(self.mlp_input(h))
