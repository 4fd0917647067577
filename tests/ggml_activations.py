"""How llama.cpp's CPU backend rounds activations before a matrix product, emulated in numpy.

ggml multiplies a quantized weight by activations quantized to the weight type's `vec_dot_type`: Q8_0 for
the legacy types (Q4_0, Q4_1, Q5_0, Q8_0), Q8_K for the K-quants, F16 for F16 weights. Our numpy runtime
keeps activations in float32, so on a tiny random model the two differ by ~0.1-0.25 in the logits. With
the same rounding applied here, the remaining difference is float32 summation order (measured ≤ 1e-5),
which lets the llama.cpp tests use a tight tolerance that still fails on any packing or metadata error.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from kanana_quant.runtimes.numpy_engine import CheckpointWeights, FloatLinear, NumpyEngine


def _blocks(x: np.ndarray, size: int) -> np.ndarray:
    return x.astype(np.float32).reshape(*x.shape[:-1], x.shape[-1] // size, size)


def q8_0(x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_0 as ggml-cpu's x86 SIMD code does it: codes = round-half-even(x · 127/amax), scale
    amax/127 stored as fp16 (the portable reference divides by the scale and rounds half away instead; the
    two differ in rare ties)."""
    b = _blocks(x, 32)
    amax = np.abs(b).max(-1, keepdims=True)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    codes = np.rint(b * inv)
    return (codes * (amax / np.float32(127)).astype(np.float16).astype(np.float32)).reshape(x.shape)


def q8_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_K: scale −127/(signed extreme), round half to even, clamp at 127, float32 scale."""
    b = _blocks(x, 256)
    extreme = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)
    iscale = np.divide(np.float32(-127), extreme, out=np.zeros_like(extreme), where=extreme != 0)
    codes = np.minimum(np.float32(127), np.rint(iscale * b))
    d = np.divide(np.float32(1), iscale, out=np.zeros_like(iscale), where=iscale != 0)
    return (codes * d).reshape(x.shape)


def f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even on the top 16 bits, as ggml's FP32_TO_BF16."""
    bits = x.astype(np.float32).view(np.uint32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & np.uint32(0xFFFF0000)
    return bits.view(np.float32)


VEC_DOT = {T.F32: lambda x: x, T.F16: f16, T.BF16: bf16, T.Q8_0: q8_0, T.Q4_0: q8_0, T.Q4_1: q8_0, T.Q5_0: q8_0,
           T.Q5_1: q8_0, T.IQ4_NL: q8_0, T.Q2_K: q8_k, T.Q3_K: q8_k, T.Q4_K: q8_k, T.Q5_K: q8_k, T.Q6_K: q8_k,
           T.IQ4_XS: q8_k}


class LlamaCppRounding(CheckpointWeights):
    """GGUF weights for NumpyEngine whose linears round their input as llama.cpp does for that tensor's type."""

    def linear(self, name: str, bias: str | None = None):
        assert bias is None
        ggml_type = T[self.checkpoint.tensor_type(name)]
        rounding, weight = VEC_DOT[ggml_type], FloatLinear(self.get(name))
        return lambda x: weight(rounding(x))


def numpy_engine_like_llamacpp(gguf_checkpoint, **kwargs) -> NumpyEngine:
    source = LlamaCppRounding(gguf_checkpoint)
    engine = NumpyEngine(gguf_checkpoint, source=source, **kwargs)
    if gguf_checkpoint.config.tie_word_embeddings:  # llama.cpp multiplies by token_embd, rounding for its type
        engine.lm_head = source.linear("embed")
    return engine
