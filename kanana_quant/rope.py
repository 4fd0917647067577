"""Rotary position embedding frequencies: default, linear, Llama-3 and YaRN scaling.

One function shared by the numpy runtime, the torch calibration layers and the exporters' cos/sin caches.
"""

from __future__ import annotations

import math

import numpy as np

from kanana_quant.config import ModelConfig, RopeScaling


def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Return (inv_freq[head_dim // 2] as float64, attention scaling applied to cos and sin)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq, 1.0
    if s.rope_type == "linear":
        return inv_freq / s.factor, 1.0
    if s.rope_type == "llama3":
        return _llama3(inv_freq, s), 1.0
    return _yarn(inv_freq, s, cfg), _yarn_attention_factor(s)


def _llama3(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
    return inv_freq / llama3_divisors(2 * math.pi / inv_freq, s.factor, s.low_freq_factor, s.high_freq_factor,
                                      s.original_max_position_embeddings)


def llama3_divisors(wavelen: np.ndarray, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original: int) -> np.ndarray:
    """Llama-3 RoPE scaling as what each frequency is divided by (GGUF stores exactly this as rope_freqs):
    long wavelengths by `factor`, short ones not at all, and the band between blended smoothly."""
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high_freq_factor, 1.0,
                    np.where(wavelen > original / low_freq_factor, factor, blended))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_attention_factor(s: RopeScaling) -> float:
    if s.attention_factor is not None:
        return float(s.attention_factor)
    if s.mscale and s.mscale_all_dim:
        return _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
    return _yarn_mscale(s.factor)


def _yarn(inv_freq: np.ndarray, s: RopeScaling, cfg: ModelConfig) -> np.ndarray:
    # YaRN (arXiv 2309.00071): dimensions that rotate fewer than beta_slow times over the original context
    # are interpolated (divided by factor), those rotating more than beta_fast times are kept, and a linear
    # ramp blends the dimensions between.
    dim, base = cfg.head_dim, cfg.rope_theta
    original = s.original_max_position_embeddings or cfg.max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    return inv_freq / s.factor * (1 - extrapolation) + inv_freq * extrapolation


def rope_cos_sin(cfg: ModelConfig, positions: np.ndarray, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables [len(positions), head_dim // 2], attention scaling folded in."""
    inv_freq, scale = rope_frequencies(cfg)
    angles = np.outer(np.asarray(positions, dtype=np.float64), inv_freq)
    return (np.cos(angles) * scale).astype(dtype), (np.sin(angles) * scale).astype(dtype)


def llamacpp_yarn(cfg: ModelConfig) -> dict | None:
    """YaRN as llama.cpp's context parameters (llama_context_params names).

    llama.cpp's `llama` architecture takes beta_fast/beta_slow from the context, not from the GGUF keys
    (defaults 32 and 1, HF's defaults too), so a model with other betas (Kanana-1.5-8B: 64 and 2) needs
    them passed when the context is made. llama.cpp multiplies `attn_factor` by 1 + 0.1·ln(factor) itself.
    """
    s = cfg.rope_scaling
    if s is None or s.rope_type != "yarn":
        return None
    return {"yarn_beta_fast": float(s.beta_fast), "yarn_beta_slow": float(s.beta_slow),
            "yarn_attn_factor": _yarn_attention_factor(s) / _yarn_mscale(s.factor),
            "yarn_orig_ctx": int(s.original_max_position_embeddings or cfg.max_position_embeddings)}


def attention_factor_from_llamacpp(attn_factor: float, factor: float) -> float:
    """HF's YaRN attention_factor from llama.cpp's attn_factor multiplier (the inverse of llamacpp_yarn)."""
    return attn_factor * _yarn_mscale(factor)
