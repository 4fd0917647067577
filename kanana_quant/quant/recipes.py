"""The methods, one decoder layer at a time: RTN, GPTQ (true-sequential: each stage is calibrated on the
outputs of the stages already quantized) and AWQ (AutoAWQ's order), plus the optional quantized lm_head.

GPTQ's Hessians are gathered here; how its column sweep rounds and what it stores is the Rounder's: codes on
our integer grid for GPTQ/AWQ checkpoints (CodeRounder), or each tensor's GGML type for GGUF files
(gguf_sink.GGMLRounder).
"""

from __future__ import annotations

import copy
from typing import Callable, Protocol

import numpy as np
import torch

from kanana_quant.config import ModelConfig
from kanana_quant.layers_torch import TorchLayer, rms_norm
from kanana_quant.qcheckpoint import QTensor
from kanana_quant.quant import awq
from kanana_quant.quant.gptq import GPTQ, fasterquant_batched
from kanana_quant.quant.grid import QuantSpec, quantize_rtn
from kanana_quant.quant.moe import expert_tokens
from kanana_quant.quant.options import LayerReport, QuantOptions
from kanana_quant.weights import Weights

EXPERT_CHUNK = 8  # experts per batched GPTQ sweep: fewer Python steps per column, bounded Hessian memory


class Rounder(Protocol):
    def held_out(self, samples: int, seq_len: int, cols: int) -> bool:
        """Whether GPTQ solvers of `cols` columns should also keep even/odd-sequence Hessians (GPTQ.halves)."""

    def round(self, layer: TorchLayer, index: int, solvers: list[GPTQ], groups: list[list[str]], stored: dict,
              report: LayerReport, batched: bool) -> None:
        """Run GPTQ's sweep of every solver; solver k holds the rows of groups[k]'s roles stacked in order.
        Each role's stored form goes into `stored`, and its rounded weight back into `layer` (later stages
        are calibrated on it). `batched`: the solvers have equal shapes and may sweep together."""


def to_qtensor(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int) -> QTensor:
    return QTensor(codes.cpu().numpy().astype(np.uint8), scales.float().cpu().numpy(),
                   zeros.cpu().numpy().astype(np.uint8), bits, group_size)


def set_weight(layer: TorchLayer, role: str, q: QTensor) -> None:
    # Later stages must see the quantized weights (true-sequential), exactly as they will be stored.
    layer.w[role] = torch.from_numpy(q.dequantize()).to(layer.w[role].device)


class CodeRounder:
    """GPTQ on the checkpoint's own grid (bits, group size, sym): codes, fp16 scales and zeros per group."""

    def __init__(self, opts: QuantOptions):
        self.opts = opts

    def held_out(self, samples: int, seq_len: int, cols: int) -> bool:
        return False

    def round(self, layer, index, solvers, groups, stored, report, batched) -> None:
        o = self.opts
        if batched:
            results = fasterquant_batched(solvers, o.spec, percdamp=o.damp, act_order=o.act_order,
                                          search=o.gptq_search, shrink=o.gptq_shrink(gguf=False))
        else:
            results = [s.fasterquant(o.spec, percdamp=o.damp, act_order=o.act_order, search=o.gptq_search,
                                     shrink=o.gptq_shrink(gguf=False)) for s in solvers]
        for result, roles in zip(results, groups):
            report.loss += float(result.loss)
            start = 0
            for role in roles:
                rows = slice(start, start + layer.w[role].shape[0])
                start = rows.stop
                stored[role] = to_qtensor(result.codes[rows], result.scales[rows], result.zeros[rows],
                                          o.fmt.bits, o.fmt.group_size)
                set_weight(layer, role, stored[role])


class Recipe:
    """Quantize decoder layers with opts' method; `stored` results are QTensors (or the rounder's type)."""

    def __init__(self, cfg: ModelConfig, opts: QuantOptions, rounder: Rounder,
                 on_stage: Callable[[str], None] | None = None):
        self.cfg, self.opts, self.rounder = cfg, opts, rounder
        self.device = torch.device(opts.device)
        self.on_stage = on_stage or (lambda _: None)

    def batches(self, src: np.memmap):
        for b in range(0, len(src), self.opts.batch):
            yield torch.from_numpy(np.array(src[b:b + self.opts.batch])).to(self.device)

    def quantize(self, layer: TorchLayer, index: int, src: np.memmap | None, report: LayerReport) -> dict:
        """The stored form of every linear the method quantizes; `src` holds the layer's calibration inputs."""
        method = self.opts.fmt.method
        if method == "rtn":
            return {r: self.rtn(layer.w[r]) for r in layer.w if self._quantized(r)}
        if method == "gptq":
            return self.gptq(layer, index, src, report)
        if method == "awq-gptq":
            return self.awq_gptq(layer, index, src, report)
        return self.awq(layer, src, report)

    def _quantized(self, role: str) -> bool:
        return self.opts.fmt.quantizes(f"layers.0.{role}")

    def rtn(self, weight: torch.Tensor, importance: torch.Tensor | None = None,
            search: bool | None = None) -> QTensor:
        o = self.opts
        codes, scales, zeros = quantize_rtn(weight.float(), o.spec, o.rtn_search if search is None else search,
                                            importance)
        return to_qtensor(codes, scales, zeros, o.fmt.bits, o.fmt.group_size)

    # -- GPTQ -------------------------------------------------------------------------------------------------
    def _stage(self, layer: TorchLayer, index: int, roles: list[str], feed: Callable, stored: dict,
               report: LayerReport, src: np.memmap) -> None:
        """One GPTQ stage: the roles share their input, so one Hessian is accumulated and copied."""
        self.on_stage("+".join(r.split(".")[-1] for r in roles) if len(roles) < 4 else f"{len(roles)} linears")
        cols = layer.w[roles[0]].shape[1]
        first = GPTQ(layer.w[roles[0]], split=self.rounder.held_out(self.opts.samples, self.opts.seq_len, cols))
        for x in self.batches(src):
            first.add_batch(feed(x))
        solvers = [first] + [_sharing(layer.w[r], first) for r in roles[1:]]
        self.rounder.round(layer, index, solvers, [[r] for r in roles], stored, report, batched=False)

    def gptq(self, layer: TorchLayer, index: int, src: np.memmap, report: LayerReport) -> dict:
        stored: dict = {}
        self._stage(layer, index, ["q", "k", "v"], layer.attention_input, stored, report, src)
        self._stage(layer, index, ["o"], lambda x: layer.attention_context(layer.attention_input(x)), stored,
                    report, src)

        def mlp_in(x):
            return layer.mlp_input(layer.after_attention(x, layer.attention_context(layer.attention_input(x))))

        if not self.cfg.moe:
            self._stage(layer, index, ["gate", "up"], mlp_in, stored, report, src)
            self._stage(layer, index, ["down"], lambda x: layer.swiglu_hidden(mlp_in(x)), stored, report, src)
            return stored
        self.on_stage("experts")
        xs = torch.cat([mlp_in(x).reshape(-1, self.cfg.hidden_size) for x in self.batches(src)])
        routed = expert_tokens(layer, xs, self.cfg.moe)
        report.expert_tokens = [r.routed for r in routed]
        for first in range(0, len(routed), EXPERT_CHUNK):
            chunk = range(first, min(first + EXPERT_CHUNK, len(routed)))
            prefixes = [f"experts.{e}." for e in chunk]
            solvers = []
            for e, p in zip(chunk, prefixes):
                # gate and up share their input, so one GPTQ over their stacked rows is the same as two
                solver = GPTQ(torch.cat([layer.w[p + "gate"], layer.w[p + "up"]]))
                solver.add_batch(xs[routed[e].rows], routed[e].weights)
                solvers.append(solver)
            self.rounder.round(layer, index, solvers, [[p + "gate", p + "up"] for p in prefixes], stored, report,
                               batched=True)
            solvers = []
            for e, p in zip(chunk, prefixes):
                solver = GPTQ(layer.w[p + "down"])
                solver.add_batch(layer.swiglu_hidden(xs[routed[e].rows], p), routed[e].weights)
                solvers.append(solver)
            self.rounder.round(layer, index, solvers, [[p + "down"] for p in prefixes], stored, report,
                               batched=True)
        return stored

    # -- AWQ --------------------------------------------------------------------------------------------------
    def awq(self, layer: TorchLayer, src: np.memmap, report: LayerReport) -> dict[str, QTensor]:
        """AWQ in AutoAWQ's order: scales searched on the float layer's activations and folded into the
        previous op (norm → q/k/v, v → o without GQA, norm → gate/up, up → down), then every linear clipped
        on its scaled input and rounded. MoE experts get their own up → down scales on their routed
        tokens; their gate/up share the norm with the router, so they get clipping only."""
        w, spec = layer.w, self.opts.spec
        inputs = self._awq_scale(layer, src, report)
        self.on_stage("clip")
        stored = {}
        for role in [r for r in w if self._quantized(r)]:
            kind = role.rsplit(".", 1)[-1]
            source = {"k": "q", "v": "q", "up": "gate"}.get(kind, kind)
            x = inputs[role.removesuffix(kind) + source] if role.startswith("experts.") else inputs[source]
            # AWQ leaves q and k unclipped: their errors pass through softmax, not the output directly.
            clipped = w[role] if kind in ("q", "k") else awq.search_clip(x, w[role], spec)
            stored[role] = self.rtn(clipped, search=False)
            set_weight(layer, role, stored[role])
        return stored

    def awq_gptq(self, layer: TorchLayer, index: int, src: np.memmap, report: LayerReport) -> dict:
        """AWQ's activation-aware scales folded into the previous ops (as `awq`), then GPTQ rounds the scaled
        linears on calibration inputs that pass through the scaled layer (llm-compressor stacks the two the
        same way). The float layer is unchanged by the folding, so GPTQ's Hessians see the same model."""
        self._awq_scale(layer, src, report)  # the scaled inputs are rebuilt stage by stage by GPTQ
        return self.gptq(layer, index, src, report)

    def _awq_scale(self, layer: TorchLayer, src: np.memmap, report: LayerReport) -> dict:
        """Search and fold AWQ's scales into `layer`; returns each linear's scaled calibration input."""
        w, spec, hidden_size = layer.w, self.opts.spec, self.cfg.hidden_size
        pick = awq.search_sequences(src.shape[0], self.opts.awq_tokens, self.opts.seq_len)
        seqs = torch.from_numpy(np.array(src[pick])).to(self.device)  # whole sequences: attention needs them
        self.on_stage("scales")
        x_attn = layer.attention_input(seqs).reshape(-1, hidden_size)
        s = awq.search_scales(x_attn, [w["q"], w["k"], w["v"]], spec)
        awq.fold_scales(w["attn_norm"], [w["q"], w["k"], w["v"]], s)
        inputs = {"q": x_attn / s}
        ctx = layer.attention_context(layer.attention_input(seqs))
        mlp_in = layer.mlp_input(layer.after_attention(seqs, ctx)).reshape(-1, hidden_size)
        ctx = ctx.reshape(-1, self.cfg.q_size)
        if self.cfg.num_heads == self.cfg.num_kv_heads:
            s = awq.search_scales(ctx, [w["o"]], spec)
            awq.fold_scales(w["v"], [w["o"]], s)
            ctx = ctx / s
        inputs["o"] = ctx
        experts = [""] if not self.cfg.moe else [f"experts.{e}." for e in range(self.cfg.moe.num_experts)]
        if self.cfg.moe:
            routed = expert_tokens(layer, mlp_in, self.cfg.moe)
            report.expert_tokens = [r.routed for r in routed]
            rows = [r.rows for r in routed]
        else:
            s = awq.search_scales(mlp_in, [w["gate"], w["up"]], spec)
            awq.fold_scales(w["ffn_norm"], [w["gate"], w["up"]], s)
            mlp_in = mlp_in / s
            rows = [slice(None)]
        for p, r in zip(experts, rows):
            x = mlp_in[r]
            hidden = layer.swiglu_hidden(x, p)
            s = awq.search_scales(hidden, [w[p + "down"]], spec)
            awq.fold_scales(w[p + "up"], [w[p + "down"]], s)
            inputs |= {p + "gate": x, p + "down": layer.swiglu_hidden(x, p)}
        return inputs

    # -- lm_head ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def lm_head(self, weights: Weights, final_acts: np.memmap | None) -> QTensor:
        """The output projection at --lm-head-bits: GPTQ on the final-norm activations of the quantized
        model when the method is GPTQ, else round-to-nearest with the clipping search."""
        fmt, cfg = self.opts.fmt, self.cfg
        weight = torch.from_numpy(weights.get("embed" if cfg.tie_word_embeddings else "lm_head")).to(self.device)
        spec = QuantSpec(fmt.bits_for("lm_head"), fmt.group_size, fmt.sym)
        search = self.opts.gptq_search
        if fmt.method != "gptq":
            return to_qtensor(*quantize_rtn(weight, spec, search), spec.bits, fmt.group_size)
        self.on_stage("lm_head")
        solver = GPTQ(weight)
        del weight
        norm = torch.from_numpy(weights.get("norm")).to(self.device)
        for x in self.batches(final_acts):
            solver.add_batch(rms_norm(x, norm, cfg.rms_norm_eps))
        result = solver.fasterquant(spec, percdamp=self.opts.damp, act_order=self.opts.act_order, search=search,
                                    shrink=self.opts.gptq_shrink(gguf=False))
        return to_qtensor(result.codes, result.scales, result.zeros, spec.bits, fmt.group_size)


def _sharing(weight: torch.Tensor, template: GPTQ) -> GPTQ:
    g = GPTQ(weight)
    g.H, g.nsamples, g.tokens = template.H.clone(), template.nsamples, template.tokens
    if template.halves is not None:
        g.halves = tuple(copy.copy(h) for h in template.halves)
        for h, t in zip(g.halves, template.halves):
            h.H = t.H.clone()
    return g
