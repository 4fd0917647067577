"""ONNX export: a loaded model (HF float or our quantized checkpoint) as one onnxruntime decoder graph with a
KV cache, plus config, tokenizer files, onnxruntime-genai's `genai_config.json` and our `kanana_quant.json`
(see onnx_sidecar.py for the graph contract, which is onnxruntime-genai's).

Embedding models (encoders) get the same layers with two differences, by a flag rather than a second builder:
attention is bidirectional, written with standard ops (GroupQueryAttention is causal only) — RoPE, the
grouped Q·Kᵀ, an additive mask that hides only padded keys, softmax, ·V — and in place of the KV cache and
lm_head the graph ends in masked mean pooling: inputs `input_ids`, `attention_mask`, `pool_mask` [batch, seq],
output `embeddings` [batch, hidden]. onnxruntime-genai has no encoder models, so such an export has no
`genai_config.json`.

Per layer: SkipSimplifiedLayerNormalization (the residual add fused with RMSNorm) → one fused QKV linear →
GroupQueryAttention (rotary from our own cos/sin caches, YaRN's attention factor folded in, past and present
KV sharing one buffer) → o → SkipSimplifiedLayerNormalization → fused gate|up linear → SiLU·up → down; MoE
layers run `QMoE` (or `MoE` for float weights) on the router logits. Linears are `MatMulNBits` carrying the
checkpoint's codes exactly (onnx_pack.py) or float MatMul; embeddings are a Gather. The batch dimension is
symbolic: GroupQueryAttention's per-row `seqlens_k` (attention-mask sum − 1) and `total_sequence_length`
(mask width) are computed once from `attention_mask`, and every reshape copies the batch and sequence
dimensions from the tensor it reshapes.

Weights are read, packed and appended to `model.onnx.data` one layer at a time (always external data, so
graphs over 2 GB need nothing special); the directory appears only when complete.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from kanana_quant import __version__
from kanana_quant.atomic import atomic_dir, ensure_free_space
from kanana_quant.checkpoint import HFCheckpoint
from kanana_quant.config import ModelConfig
from kanana_quant.errors import KananaQuantError
from kanana_quant.exporters import onnx_pack
from kanana_quant.exporters import onnx_sidecar as sc
from kanana_quant.quant.packing import PER_CHANNEL
from kanana_quant.rope import rope_cos_sin
from kanana_quant.tokenizer import side_files
from kanana_quant.weights import Weights

log = logging.getLogger(__name__)

MS = "com.microsoft"
OPSET = 21
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
LM_HEAD_CHOICES = ("auto", "float", "q8", "q4")
_ALIGN_LARGE = 4096  # page-aligned offsets for big tensors, so onnxruntime can map them
# onnxruntime repacks each MatMulNBits weight at load and frees the original afterwards, so for a moment one
# weight is held twice. The lm_head is the largest (128K rows); as row slices that moment costs a slice.
LM_HEAD_SLICES = 8
_INLINE_BYTES = 1024


@dataclass(frozen=True)
class ExportReport:
    path: Path
    nbytes: int
    linears: dict  # kind -> count: "MatMulNBits", "MatMul", ...
    moe_op: str | None
    lm_head: str


# ---------------------------------------------------------------------------------------------------------
# Graph building with streamed external data


class _Graph:
    def __init__(self, data_path: Path):
        self.nodes: list = []
        self.initializers: list[TensorProto] = []
        self._data = open(data_path, "wb")
        self._offset = 0
        self._counter = 0
        self.kinds: dict[str, int] = {}

    def close(self) -> None:
        self._data.close()

    def name(self, stem: str) -> str:
        self._counter += 1
        return f"{stem}_{self._counter}"

    def const(self, name: str, array: np.ndarray) -> str:
        """An initializer; arrays over 1 KiB are appended to the external data file."""
        array = np.ascontiguousarray(array)
        if array.nbytes <= _INLINE_BYTES:
            self.initializers.append(onnx.numpy_helper.from_array(array, name))
            return name
        align = _ALIGN_LARGE if array.nbytes >= (1 << 20) else 64
        pad = (-self._offset) % align
        if pad:
            self._data.write(b"\0" * pad)
            self._offset += pad
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", sc.DATA_FILE), ("offset", str(self._offset)),
                           ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self._data.write(memoryview(array.reshape(-1).view(np.uint8)))
        self._offset += array.nbytes
        self.initializers.append(tensor)
        return name

    def shape_const(self, values) -> str:
        return self.const(self.name("shape"), np.asarray(values, dtype=np.int64))

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str | None = None,
             outputs: list[str] | None = None, **attrs) -> list[str]:
        node_name = name or self.name(op)
        outputs = outputs or [f"{node_name}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=node_name, domain=domain or None, **attrs))
        return outputs

    def one(self, *args, **kwargs) -> str:
        return self.node(*args, **kwargs)[0]


# ---------------------------------------------------------------------------------------------------------
# Weights


def _qtensor_or_none(weights: Weights, name: str):
    return weights.qtensor(name) if weights.is_quantized(name) else None


@dataclass
class _Options:
    accuracy_level: int
    lm_head: str
    notes: list = field(default_factory=list)


class _Exporter:
    def __init__(self, model, graph: _Graph, opts: _Options):
        self.weights, self.cfg, self.g, self.opts = model.weights, model.config, graph, opts
        self.encoder = model.config.embedding is not None

    # --- linear layers ------------------------------------------------------------------------------------

    def _matmul_nbits(self, x: str, nb: onnx_pack.NBits, prefix: str) -> str:
        n, k = nb.shape
        inputs = [x, self.g.const(prefix + ".qweight", nb.packed), self.g.const(prefix + ".scales", nb.scales)]
        if nb.zeros is not None:
            inputs.append(self.g.const(prefix + ".qzeros", nb.zeros))
        self.g.kinds["MatMulNBits"] = self.g.kinds.get("MatMulNBits", 0) + 1
        return self.g.one("MatMulNBits", inputs, domain=MS, name=prefix + "/MatMulNBits", K=k, N=n, bits=nb.bits,
                          block_size=nb.block, accuracy_level=self.opts.accuracy_level)

    def _sliced_head(self, x: str, nb: onnx_pack.NBits) -> str:
        """The lm_head as LM_HEAD_SLICES MatMulNBits over row ranges, concatenated into [1, N, vocab]."""
        n = nb.shape[0]
        bounds = np.linspace(0, n, min(LM_HEAD_SLICES, n) + 1).astype(int)
        parts = []
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            part = onnx_pack.NBits(nb.packed[a:b], nb.scales[a:b], None if nb.zeros is None else nb.zeros[a:b],
                                   nb.bits, nb.block)
            parts.append(self._matmul_nbits(x, part, f"lm_head.{i}"))
        return self.g.one("Concat", parts, name="lm_head/Concat", axis=-1)

    def _float_matmul(self, x: str, w: np.ndarray, prefix: str) -> str:
        self.g.kinds["MatMul"] = self.g.kinds.get("MatMul", 0) + 1
        weight = self.g.const(prefix + ".weight_t", np.ascontiguousarray(np.asarray(w, np.float32).T))
        return self.g.one("MatMul", [x, weight], name=prefix + "/MatMul")

    def linear(self, x: str, names_: list[str], prefix: str) -> str:
        """y = x · [W_a; W_b; …]ᵀ for the canonical weights `names_`, fused into one op. Quantized weights with
        one grid go to MatMulNBits with their codes; anything else runs as float MatMul (dequantized exactly)."""
        qs = [_qtensor_or_none(self.weights, n) for n in names_]
        if all(q is not None for q in qs) and len({(q.bits, q.group_size) for q in qs}) == 1:
            codes, scales, zeros = onnx_pack.concat_rows(qs)
            nb = onnx_pack.from_codes(codes, scales, zeros, qs[0].bits, qs[0].group_size)
            del codes, scales, zeros
            if nb is not None:
                return self._matmul_nbits(x, nb, prefix)
            self.opts.notes.append(f"{prefix}: no MatMulNBits block fits; stored as float")
        w = np.concatenate([q.dequantize() if q is not None else self.weights.get(n) for q, n in zip(qs, names_)])
        return self._float_matmul(x, w, prefix)

    # --- blocks -------------------------------------------------------------------------------------------

    def attention(self, i: int, x: str, cos: str, sin: str) -> str:
        cfg, p = self.cfg, f"layers.{i}."
        if cfg.qk_norm or cfg.attention_bias:
            q, k, v = (self.linear(x, [p + r], f"layers.{i}.attn.{r}_proj") for r in ("q", "k", "v"))
            if cfg.attention_bias:
                q, k, v = (self.g.one("Add", [t, self.g.const(f"layers.{i}.attn.{r}_proj.bias", self.weights.get(
                    p + r + "_bias"))]) for t, r in ((q, "q"), (k, "k"), (v, "v")))
            if cfg.qk_norm:
                q = self._head_norm(q, p + "q_norm", cfg.num_heads, f"layers.{i}.attn.q_norm")
                k = self._head_norm(k, p + "k_norm", cfg.num_kv_heads, f"layers.{i}.attn.k_norm")
            qkv = [q, k, v]
        else:
            qkv = [self.linear(x, [p + "q", p + "k", p + "v"], f"layers.{i}.attn.qkv_proj"), "", ""]
        if self.encoder:
            return self.linear(self.bidirectional_attention(i, qkv, cos, sin), [p + "o"], f"layers.{i}.attn.o_proj")
        past_k, past_v = sc.past_names(i)
        present_k, present_v = sc.present_names(i)
        out = self.g.node("GroupQueryAttention", [*qkv, past_k, past_v, self.seqlens_k, self.total_length, cos, sin],
                          outputs=[f"layers.{i}.attn/out", present_k, present_v], domain=MS,
                          name=f"layers.{i}.attn/GroupQueryAttention", num_heads=cfg.num_heads,
                          kv_num_heads=cfg.num_kv_heads, do_rotary=1, rotary_interleaved=0)[0]
        return self.linear(out, [p + "o"], f"layers.{i}.attn.o_proj")

    def bidirectional_attention(self, i: int, qkv: list[str], cos: str, sin: str) -> str:
        """Every token attends to every unpadded token of its row: [B, S, q_size] before o_proj."""
        cfg, g, d = self.cfg, self.g, self.cfg.head_dim
        if not qkv[1]:
            qkv = g.node("Split", [qkv[0], g.shape_const([cfg.q_size, cfg.kv_size, cfg.kv_size])], n_out=3, axis=-1)
        heads = cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads
        # [B, S, h·d] → [B, h, S, d]
        q, k, v = (g.one("Transpose", [g.one("Reshape", [t, g.shape_const([0, 0, h, d])])], perm=[0, 2, 1, 3])
                   for t, h in zip(qkv, heads))
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        group = cfg.num_heads // cfg.num_kv_heads
        # the heads sharing a KV head as one axis: q [B, kv, group, S, d] against k, v [B, kv, 1, S, d]
        q = g.one("Reshape", [q, g.shape_const([0, cfg.num_kv_heads, group, -1, d])])
        k, v = (g.one("Unsqueeze", [t, g.shape_const([2])]) for t in (k, v))
        scores = g.one("MatMul", [q, g.one("Transpose", [k], perm=[0, 1, 2, 4, 3])], name=f"layers.{i}.attn/QK")
        scores = g.one("Add", [g.one("Mul", [scores, self.attn_scale]), self.key_padding])
        ctx = g.one("MatMul", [g.one("Softmax", [scores], axis=-1), v], name=f"layers.{i}.attn/AV")
        ctx = g.one("Transpose", [g.one("Reshape", [ctx, g.shape_const([0, cfg.num_heads, -1, d])])], perm=[0, 2, 1, 3])
        return g.one("Reshape", [ctx, g.shape_const([0, 0, cfg.q_size])])

    def _rope(self, x: str, cos: str, sin: str) -> str:
        """HF's rotate_half RoPE on [B, h, S, d] at positions 0..S-1 (rows are right-padded)."""
        g, half = self.g, self.cfg.head_dim // 2
        x1, x2 = g.node("Split", [x, g.shape_const([half, half])], n_out=2, axis=-1)
        c, s = self.rope_rows
        first = g.one("Sub", [g.one("Mul", [x1, c]), g.one("Mul", [x2, s])])
        second = g.one("Add", [g.one("Mul", [x2, c]), g.one("Mul", [x1, s])])
        return g.one("Concat", [first, second], axis=-1)

    def encoder_inputs(self, cos: str, sin: str) -> None:
        """Once per graph: the rotary rows 0..S-1, the score scale and the additive key mask [B, 1, 1, 1, S]
        (0 for tokens, -3e38 for padding, which softmax turns into exact zeros)."""
        g = self.g
        length = g.one("Gather", [g.one("Shape", [sc.INPUT_IDS]), g.const("one_index", np.array([1], np.int64))],
                       axis=0)
        zero = g.shape_const([0])
        self.rope_rows = tuple(g.one("Slice", [t, zero, length, zero]) for t in (cos, sin))
        mask = g.one("Cast", [sc.ATTENTION_MASK], to=TensorProto.FLOAT)
        bias = g.one("Mul", [g.one("Sub", [mask, g.const("one_f32", np.array(1, np.float32))]),
                             g.const("mask_min", np.array(3.0e38, np.float32))])
        self.key_padding = g.one("Reshape", [bias, g.shape_const([0, 1, 1, 1, -1])], name="key_padding/Reshape")
        self.attn_scale = g.const("attn_scale", np.array(self.cfg.head_dim ** -0.5, np.float32))

    def mean_pool(self, x: str) -> str:
        """[B, S, H] → [B, H]: the mean over the positions pool_mask marks (the query prefix is left out)."""
        g = self.g
        weights = g.one("Unsqueeze", [g.one("Cast", [sc.POOL_MASK], to=TensorProto.FLOAT), g.shape_const([2])])
        axis = g.shape_const([1])
        total = g.one("ReduceSum", [g.one("Mul", [x, weights]), axis], keepdims=0)
        return g.one("Div", [total, g.one("ReduceSum", [weights, axis], keepdims=0)], name="pooling/Div")

    def _head_norm(self, x: str, weight: str, heads: int, prefix: str) -> str:
        cfg = self.cfg
        split = self.g.one("Reshape", [x, self.g.shape_const([0, 0, heads, cfg.head_dim])])
        normed = self.g.one("SimplifiedLayerNormalization", [split, self.g.const(prefix + ".weight",
                            self.weights.get(weight))], name=prefix + "/SimplifiedLayerNormalization", axis=-1,
                            epsilon=cfg.rms_norm_eps)
        return self.g.one("Reshape", [normed, self.g.shape_const([0, 0, heads * cfg.head_dim])])

    def dense_mlp(self, i: int, x: str) -> str:
        p, inter = f"layers.{i}.", self.cfg.intermediate_size
        gate_up = self.linear(x, [p + "gate", p + "up"], f"layers.{i}.mlp.gate_up_proj")
        gate, up = self.g.node("Split", [gate_up, self.g.shape_const([inter, inter])], n_out=2, axis=-1)
        act = self.g.one("Mul", [gate, self.g.one("Sigmoid", [gate])])
        return self.linear(self.g.one("Mul", [act, up]), [p + "down"], f"layers.{i}.mlp.down_proj")

    def moe(self, i: int, x: str) -> str:
        cfg, moe, p = self.cfg, self.cfg.moe, f"layers.{i}."
        flat = self.g.one("Reshape", [x, self.g.shape_const([-1, cfg.hidden_size])])
        router = self._float_matmul(flat, self.weights.get(p + "router"), f"layers.{i}.moe.router")
        experts = range(moe.num_experts)
        qs = [_qtensor_or_none(self.weights, f"{p}experts.0.{r}") for r in ("gate", "up", "down")]
        quantized = all(q is not None for q in qs) and len({(q.bits, q.group_size) for q in qs}) == 1
        bits = onnx_pack.storage_bits(qs[0].bits) if quantized else None
        group = qs[0].group_size if quantized else None
        # QMoE's block-wise 8-bit experts always quantize activations to int8 (its CPU kernel has no fp32 path),
        # so they are exact only at accuracy level 4; below it the experts run dequantized in the float MoE op.
        use_qmoe = quantized and not (bits == 8 and group != PER_CHANNEL and self.opts.accuracy_level < 4)
        if use_qmoe and group != PER_CHANNEL and (cfg.hidden_size % group or moe.expert_intermediate_size % group):
            use_qmoe = False
        attrs = dict(k=moe.top_k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                     activation_beta=0.0, normalize_routing_weights=int(moe.norm_topk_prob))
        name = f"layers.{i}.moe"
        if use_qmoe:
            fc1 = self._stack_experts(i, experts, ("gate", "up"), bits, group)
            fc2 = self._stack_experts(i, experts, ("down",), bits, group)
            inputs = [flat, router, fc1[0], fc1[1], "", fc2[0], fc2[1], "", "", "", "", fc1[2] or "", fc2[2] or ""]
            if not moe.norm_topk_prob:
                # Without renormalisation QMoE would mix by its top-k softmax; router_weights makes it mix by the
                # full softmax probabilities while router_probs (the logits) still select the experts.
                inputs += ["", self.g.one("Softmax", [router], axis=-1)]
            while inputs[-1] == "":
                inputs.pop()
            if group != PER_CHANNEL:
                attrs["block_size"] = group
            out = self.g.one("QMoE", inputs, domain=MS, name=name + "/QMoE", expert_weight_bits=bits,
                             accuracy_level=self.opts.accuracy_level, **attrs)
            self.g.kinds["QMoE"] = self.g.kinds.get("QMoE", 0) + 1
        else:
            fc1, fc2 = self._float_experts(i, experts)
            out = self.g.one("MoE", [flat, router, fc1, "", fc2], domain=MS, name=name + "/MoE", **attrs)
            self.g.kinds["MoE"] = self.g.kinds.get("MoE", 0) + 1
        return self.g.one("Reshape", [out, self.hidden_shape])

    def _stack_experts(self, i: int, experts, roles: tuple[str, ...], bits: int, group: int):
        """[E, rows, K·bits/8] codes, [E, rows(, blocks)] scales and packed zeros (None when all default); for
        gate|up the rows interleave gate and up (the layout QMoE's CPU SwiGLU requires)."""
        packed = scales = zeros = None
        default = True
        for e in experts:
            qs = [self.weights.qtensor(f"layers.{i}.experts.{e}.{r}") for r in roles]
            codes = np.stack([q.codes for q in qs], axis=1).reshape(-1, qs[0].codes.shape[1])
            s = np.stack([q.scales for q in qs], axis=1).reshape(-1, qs[0].scales.shape[1])
            z = np.stack([q.zeros for q in qs], axis=1).reshape(-1, qs[0].zeros.shape[1])
            row_packed = onnx_pack.pack_low_first(codes, bits)
            if packed is None:
                packed = np.empty((len(experts), *row_packed.shape), np.uint8)
                scales = np.empty((len(experts), *s.shape), np.float32)
                zeros = np.empty((len(experts), *z.shape), np.uint8)
            packed[e], scales[e], zeros[e] = row_packed, s, z
            default &= bool(np.all(z == 1 << (bits - 1)))
        role = "fc1" if len(roles) == 2 else "fc2"
        prefix = f"layers.{i}.moe.{role}"
        if group == PER_CHANNEL:
            scales, zeros = scales[..., 0], zeros[..., 0]  # column-wise: one scale per output row
        zp = None if default else self.g.const(prefix + ".qzeros", onnx_pack.pack_low_first(zeros, bits))
        return self.g.const(prefix + ".qweight", packed), self.g.const(prefix + ".scales", scales), zp

    def _float_experts(self, i: int, experts) -> tuple[str, str]:
        cfg = self.cfg
        inter, h = cfg.moe.expert_intermediate_size, cfg.hidden_size
        fc1 = np.empty((len(experts), 2 * inter, h), np.float32)
        fc2 = np.empty((len(experts), h, inter), np.float32)
        for e in experts:
            p = f"layers.{i}.experts.{e}."
            fc1[e] = np.stack([self.weights.get(p + "gate"), self.weights.get(p + "up")], axis=1).reshape(2 * inter, h)
            fc2[e] = self.weights.get(p + "down")
        return (self.g.const(f"layers.{i}.moe.fc1.weight", fc1), self.g.const(f"layers.{i}.moe.fc2.weight", fc2))

    # --- head -----------------------------------------------------------------------------------------------

    def lm_head_kind(self) -> str:
        if self.encoder:
            return "none"
        choice = self.opts.lm_head
        source = "embed" if self.cfg.tie_word_embeddings else "lm_head"
        carried = _qtensor_or_none(self.weights, source) if source == "lm_head" else None
        if choice == "auto":
            if carried is not None:
                return "carried"
            return "q8" if self.weights.format is not None else "float"
        return choice

    def embedding(self) -> tuple[str | onnx_pack.NBits, str]:
        """(the table the lm_head may share, token embeddings [1, S, H]). A tied model with a q8/q4 lm_head
        gathers from the same codes as the lm_head (GatherBlockQuantized), but from its own copy of them:
        onnxruntime repacks MatMulNBits weights at load and frees the original only when no other node reads
        it, so one shared initializer would stay resident twice. A private copy costs its size on disk and
        only the rows actually gathered in RAM (it is memory-mapped)."""
        cfg, g = self.cfg, self.g
        if cfg.tie_word_embeddings and self.lm_head_kind() in ("q8", "q4"):
            nb = onnx_pack.quantize_rtn(self.weights.get("embed"), 8 if self.lm_head_kind() == "q8" else 4)
            if nb.zeros is None:
                codes = g.const("embed_tokens.qweight", nb.packed)
                rows = g.one("GatherBlockQuantized", [codes, sc.INPUT_IDS, g.const("embed_tokens.scales",
                             nb.scales[..., None])], domain=MS, name="embed_tokens/GatherBlockQuantized",
                             bits=nb.bits, block_size=nb.block, quantize_axis=2, gather_axis=0)
                return nb, g.one("Reshape", [rows, g.shape_const([0, 0, cfg.hidden_size])])
        embed = g.const("embed_tokens.weight", self.weights.get("embed"))
        return embed, g.one("Gather", [embed, sc.INPUT_IDS], name="embed_tokens/Gather", axis=0)

    def lm_head(self, x: str, embed) -> str:
        """[B, N, H] → [B, N, V]."""
        cfg, kind = self.cfg, self.lm_head_kind()
        source = "embed" if cfg.tie_word_embeddings else "lm_head"
        if kind == "carried":
            return self.linear(x, ["lm_head"], "lm_head")
        if isinstance(embed, onnx_pack.NBits):  # tied, quantized: the codes the embedding gathers from
            return self._sliced_head(x, embed)
        if kind in ("q8", "q4"):
            return self._sliced_head(x, onnx_pack.quantize_rtn(self.weights.get(source), 8 if kind == "q8" else 4))
        if cfg.tie_word_embeddings:  # float: Gemm with transB on the embedding table itself (stored once)
            flat = self.g.one("Reshape", [x, self.g.shape_const([-1, cfg.hidden_size])])
            logits = self.g.one("Gemm", [flat, embed], name="lm_head/Gemm", transB=1)
            self.g.kinds["MatMul"] = self.g.kinds.get("MatMul", 0) + 1
            rows = self.g.one("Slice", [self.g.one("Shape", [x]), self.g.shape_const([0]), self.g.shape_const([2])])
            shape = self.g.one("Concat", [rows, self.g.shape_const([cfg.vocab_size])], axis=0)
            return self.g.one("Reshape", [logits, shape])
        q = _qtensor_or_none(self.weights, "lm_head")
        return self._float_matmul(x, q.dequantize() if q is not None else self.weights.get("lm_head"), "lm_head")

    # --- the whole decoder ----------------------------------------------------------------------------------

    def _release(self) -> None:
        """Unmap the source's files after a layer, so the pages it read leave this process's resident set
        (safetensors checkpoints reopen their mmap on the next read; GGUF sources stay open)."""
        if isinstance(self.weights, HFCheckpoint):
            self.weights.close()

    def sequence_lengths(self) -> None:
        """GroupQueryAttention's seqlens_k (int32 [B]: each row's valid length − 1, i.e. the attention mask's
        row sum − 1) and total_sequence_length (int32 scalar: the mask's width), computed once."""
        g = self.g
        total = g.one("ReduceSum", [sc.ATTENTION_MASK, g.shape_const([1])], name="attention_mask/ReduceSum",
                      keepdims=0)
        self.seqlens_k = g.one("Cast", [g.one("Sub", [total, g.const("one_i64", np.array(1, np.int64))])],
                               name="seqlens_k/Cast", to=TensorProto.INT32)
        width = g.one("Gather", [g.one("Shape", [sc.ATTENTION_MASK]), g.const("one_index", np.array(1, np.int64))],
                      axis=0)
        self.total_length = g.one("Cast", [width], name="total_sequence_length/Cast", to=TensorProto.INT32)

    def keep_logits(self, x: str) -> str:
        """The last `logits_to_keep` positions of x [B, S, H] (all of them when it is 0, its default)."""
        g = self.g
        g.const(sc.LOGITS_TO_KEEP, np.zeros(1, np.int64))  # the optional input's default
        start = g.one("Neg", [sc.LOGITS_TO_KEEP])
        end = g.const("int64_max", np.array([np.iinfo(np.int64).max], np.int64))
        return g.one("Slice", [x, start, end, g.shape_const([1])], name="logits_to_keep/Slice")

    def build(self, max_len: int, on_step: Callable[[str], None] | None) -> None:
        cfg, g = self.cfg, self.g
        step = on_step or (lambda _: None)
        cos, sin = rope_cos_sin(cfg, np.arange(max_len))
        cos, sin = g.const("rotary.cos_cache", cos), g.const("rotary.sin_cache", sin)
        if self.encoder:
            self.encoder_inputs(cos, sin)
        else:
            self.sequence_lengths()
        embed, x = self.embedding()
        # [B, S, H], for reshapes back from [B·S, H] (MoE). Dense graphs do not read it, yet onnxruntime's arena
        # peaked 175 MB higher at a 512-token prefill of Kanana-1.5-2.1B without this node (the same bytes of
        # op outputs; its allocation order differs), so it stays.
        self.hidden_shape = g.one("Shape", [x], name="hidden/Shape")
        step("embed")
        residual, pending = x, None
        eps = cfg.rms_norm_eps
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            attn_norm = g.const(p + "input_layernorm.weight", self.weights.get(p + "attn_norm"))
            if pending is None:
                normed = g.one("SimplifiedLayerNormalization", [residual, attn_norm],
                               name=p + "input_layernorm/SimplifiedLayerNormalization", axis=-1, epsilon=eps)
            else:
                normed, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [pending, residual, attn_norm],
                                                n_out=4, domain=MS, name=p + "input_layernorm/SkipLayerNorm",
                                                epsilon=eps)
            attn = self.attention(i, normed, cos, sin)
            ffn_norm = g.const(p + "post_attention_layernorm.weight", self.weights.get(p + "ffn_norm"))
            normed, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [attn, residual, ffn_norm], n_out=4,
                                            domain=MS, name=p + "post_attention_layernorm/SkipLayerNorm", epsilon=eps)
            pending = self.moe(i, normed) if cfg.moe else self.dense_mlp(i, normed)
            self._release()
            step(f"layer {i}")
        norm = g.const("norm.weight", self.weights.get("norm"))
        normed = g.node("SkipSimplifiedLayerNormalization", [pending, residual, norm], n_out=4, domain=MS,
                        name="norm/SkipLayerNorm", epsilon=eps)[0]
        if self.encoder:
            g.node("Identity", [self.mean_pool(normed)], outputs=[sc.EMBEDDINGS], name="embeddings/Identity")
            step("pooling")
            return
        logits = self.lm_head(self.keep_logits(normed), embed)
        g.node("Identity", [logits], outputs=[sc.LOGITS], name="logits/Identity")
        step("lm_head")


def _value_infos(cfg: ModelConfig) -> tuple[list, list]:
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    vi = helper.make_tensor_value_info
    if cfg.embedding is not None:
        return ([vi(name, i64, ["batch_size", "sequence_length"]) for name in sc.ENCODER_INPUTS],
                [vi(sc.EMBEDDINGS, f, ["batch_size", cfg.hidden_size])])
    inputs = [vi(sc.INPUT_IDS, i64, ["batch_size", "sequence_length"]),
              vi(sc.ATTENTION_MASK, i64, ["batch_size", "total_sequence_length"])]
    outputs = [vi(sc.LOGITS, f, ["batch_size", "logits_length", cfg.vocab_size])]
    for layer in range(cfg.num_layers):
        for name in sc.past_names(layer):
            inputs.append(vi(name, f, ["batch_size", cfg.num_kv_heads, "past_sequence_length", cfg.head_dim]))
        for name in sc.present_names(layer):
            outputs.append(vi(name, f, ["batch_size", cfg.num_kv_heads, "present_sequence_length", cfg.head_dim]))
    # An input with an initializer of the same name is optional: runtimes that do not feed it (genai) get 0.
    inputs.append(vi(sc.LOGITS_TO_KEEP, i64, [1]))
    return inputs, outputs


def export_steps(cfg: ModelConfig) -> int:
    """How many on_step calls export_onnx makes (for a progress bar): embed, each layer, lm_head."""
    return cfg.num_layers + 2


def _check_expressible(model) -> None:
    cfg = model.config
    if cfg.head_dim % 16:
        raise KananaQuantError(f"{model.path}: head_dim {cfg.head_dim} is not a multiple of 16, which onnxruntime's "
                               "GroupQueryAttention needs")
    if cfg.moe and cfg.attention_bias:
        raise KananaQuantError(f"{model.path}: attention bias in an MoE model is not supported by the ONNX export")


def _genai_config(model) -> dict:
    """onnxruntime-genai's config: only keys its schema accepts (it refuses any other)."""
    cfg, tok = model.config, model.tokenizer
    eos = sorted(set(tok.eos_ids) | set(cfg.eos_token_ids))
    return {
        "model": {
            # genai picks its input handling by type; the graph carries the architecture itself, so dense and
            # MoE (Mixtral or Qwen-MoE naming alike) are all "llama" to it.
            "type": "llama",
            "bos_token_id": tok.bos_id if tok.bos_id is not None else cfg.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": eos[0] if eos else 0,
            "context_length": cfg.max_position_embeddings,
            "vocab_size": cfg.vocab_size,
            "decoder": {
                "filename": sc.MODEL_FILE,
                "hidden_size": cfg.hidden_size,
                "num_attention_heads": cfg.num_heads,
                "num_key_value_heads": cfg.num_kv_heads,
                "head_size": cfg.head_dim,
                "num_hidden_layers": cfg.num_layers,
                "session_options": {"log_id": "kanana-quant", "provider_options": []},
                "inputs": {"input_ids": sc.INPUT_IDS, "attention_mask": sc.ATTENTION_MASK,
                           "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": sc.LOGITS, "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"past_present_share_buffer": True, "max_length": cfg.max_position_embeddings,
                   "do_sample": False},
    }


def _metadata(model, opts: _Options, report_kinds: dict, moe_op: str | None, lm_head: str, files: list[str]) -> dict:
    fmt = model.weights.format
    return {
        "format": sc.FORMAT, "version": sc.FORMAT_VERSION, "kanana_quant_version": __version__,
        "source": str(model.path), "accuracy_level": opts.accuracy_level, "lm_head": lm_head,
        "quantization": fmt.to_hf() if fmt is not None else None, "ops": report_kinds, "moe_op": moe_op,
        "notes": opts.notes, "tokenizer_files": files,
        "inputs": list(sc.ENCODER_INPUTS) if model.config.embedding is not None else
        [sc.INPUT_IDS, sc.ATTENTION_MASK, "past_key_values.%d.key", "past_key_values.%d.value", sc.LOGITS_TO_KEEP],
        "kind": "encoder" if model.config.embedding is not None else "decoder",
    }


def _estimate_bytes(model, opts: _Options) -> int:
    return int(model.weights.nbytes() * (2.2 if model.weights.format is None else 1.5)) + (1 << 20)  # float sources grow from bf16 to fp32


def check_options(accuracy_level: int, lm_head: str) -> None:
    """The export's own settings, checked before any model is loaded."""
    if accuracy_level not in ACCURACY_LEVELS:
        raise KananaQuantError(f"--accuracy-level must be one of {ACCURACY_LEVELS}, got {accuracy_level}")
    if lm_head not in LM_HEAD_CHOICES:
        raise KananaQuantError(f"--lm-head {lm_head!r} is not known; choose one of: {', '.join(LM_HEAD_CHOICES)}")


def export_onnx(model, out_dir: str | Path, accuracy_level: int = 4, lm_head: str = "auto",
                on_step: Callable[[str], None] | None = None, overwrite: bool = False) -> ExportReport:
    """Write `model` (a LoadedModel) as an ONNX export directory; returns what was written.

    accuracy_level: MatMulNBits / QMoE `accuracy_level` (0 = fp32 activations, exact to the numpy runtime;
    4 = int8 activations, the fast CPU path). lm_head: auto (the checkpoint's codes when it quantized lm_head,
    8-bit RTN for other quantized sources, float for float sources), float, q8 or q4.
    """
    check_options(accuracy_level, lm_head)
    _check_expressible(model)
    out = Path(out_dir)
    if out.suffix in (".onnx", ".gguf"):
        raise KananaQuantError(f"{out}: the ONNX export is a directory (model.onnx, weights, tokenizer); "
                               "pass a directory path")
    cfg = model.config
    opts = _Options(accuracy_level, lm_head)
    ensure_free_space(out.parent if out.parent.exists() else Path("."), _estimate_bytes(model, opts),
                      f"exporting {out.name}")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        graph = _Graph(tmp / sc.DATA_FILE)
        exporter = _Exporter(model, graph, opts)
        try:
            exporter.build(cfg.max_position_embeddings, on_step)
        finally:
            graph.close()
        inputs, outputs = _value_infos(cfg)
        onnx_graph = helper.make_graph(graph.nodes, "kanana_decoder", inputs, outputs, graph.initializers)
        proto = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                             helper.make_opsetid(MS, 1)],
                                  producer_name="kanana-quant", producer_version=__version__)
        proto.ir_version = 10
        onnx.save_model(proto, str(tmp / sc.MODEL_FILE))
        files = _write_side_files(model, tmp)
        moe_op = next((k for k in ("QMoE", "MoE") if k in graph.kinds), None)
        metadata = _metadata(model, opts, dict(graph.kinds), moe_op, exporter.lm_head_kind(), files)
        if cfg.embedding is None:  # onnxruntime-genai runs decoders only
            (tmp / sc.SIDECAR).write_text(json.dumps(_genai_config(model), indent=2, ensure_ascii=False),
                                          encoding="utf-8")
        (tmp / sc.METADATA).write_text(json.dumps(metadata, indent=2, ensure_ascii=False), encoding="utf-8")
        kinds = dict(graph.kinds)
    for note in opts.notes:
        log.warning("%s", note)
    nbytes = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return ExportReport(out, nbytes, kinds, moe_op, metadata["lm_head"])


def _tokenizer_config(text: str, tok) -> str:
    """tokenizer_config.json with `add_bos_token` saying what the tokenizer itself does (Kanana's, like
    Llama-3's, prepends <|begin_of_text|> through tokenizer.json's post-processor). onnxruntime-extensions
    (onnxruntime-genai's tokenizer) reads the flag; transformers' answer is unchanged by it."""
    config = json.loads(text)
    if isinstance(config, dict) and tok.bos_id is not None:
        config["add_bos_token"] = tok.encode("a", add_special_tokens=True)[:1] == [tok.bos_id]
        text = json.dumps(config, indent=2, ensure_ascii=False)
    return text


def _write_side_files(model, tmp: Path) -> list[str]:
    """config.json (without quantization_config: the export is its own format) and the tokenizer files."""
    raw = dict(model.config.raw)
    raw.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(raw, indent=2, ensure_ascii=False), encoding="utf-8")
    files = side_files(Path(model.path), model.tokenizer)
    if "tokenizer_config.json" in files:
        files["tokenizer_config.json"] = _tokenizer_config(files["tokenizer_config.json"], model.tokenizer)
    for fname, text in files.items():
        (tmp / fname).write_text(text, encoding="utf-8")
    return sorted(files)
