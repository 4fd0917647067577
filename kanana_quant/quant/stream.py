"""LayerStream: quantize a model one decoder layer at a time.

Load layer i from the mmap'd checkpoint, push the calibration activations through it, quantize its linears
(RTN, GPTQ or AWQ), write them, and feed the quantized layer's outputs to layer i+1. Peak memory is one
layer of float32 weights plus the activations, which live in disk memmaps in a work folder beside the
output (the page cache keeps them in RAM when they fit). After every layer a state file records progress,
so `--resume` continues at the next layer and produces the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kanana_quant import names
from kanana_quant.atomic import atomic_file, ensure_free_space
from kanana_quant.checkpoint import HFCheckpoint, save_checkpoint
from kanana_quant.errors import KananaQuantError
from kanana_quant.layers_torch import TorchLayer, rms_norm
from kanana_quant.loader import LoadedModel
from kanana_quant.qcheckpoint import QTensor, QuantFormat, hf_base, packed_specs
from kanana_quant.quant import awq
from kanana_quant.quant.gptq import GPTQ, fasterquant_batched
from kanana_quant.quant.grid import QuantSpec, quantize_rtn
from kanana_quant.quant.moe import expert_tokens
from kanana_quant.resources import AWQ_TOKENS
from kanana_quant.safetensors_io import SafetensorsFile, TensorSpec, write_safetensors

EXPERT_CHUNK = 8  # experts per batched GPTQ sweep: fewer Python steps per column, bounded Hessian memory
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                "special_tokens_map.json")


@dataclass
class QuantOptions:
    fmt: QuantFormat
    calib: str = "builtin"
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    batch: int = 8  # calibration sequences per forward batch
    damp: float = 0.01
    act_order: bool = True
    device: str = "cpu"
    extra: dict = field(default_factory=dict)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.fmt.bits, self.fmt.group_size, self.fmt.sym)

    @property
    def calibrated(self) -> bool:
        return self.fmt.method != "rtn"


@dataclass
class LayerReport:
    layer: int
    seconds: float
    loss: float = 0.0
    expert_tokens: list[int] | None = None


def check_format(model: LoadedModel, fmt: QuantFormat) -> None:
    """Every linear must fit the grid and the packed layout: fail before any work."""
    cfg = model.config
    spec = QuantSpec(fmt.bits, fmt.group_size, fmt.sym)
    if fmt.lm_head and fmt.layout == "awq" and fmt.bits_for("lm_head") != fmt.bits:
        raise KananaQuantError("AWQ's GEMM layout has one width for every tensor: --lm-head-bits must equal --bits "
                               "with --method awq")
    quantized = [n for n in names.canonical_names(cfg) if fmt.quantizes(n)]
    if fmt.lm_head and "lm_head" not in quantized:
        quantized.append("lm_head")  # tied: the lm_head is quantized from the embedding, which stays float
    for name in quantized:
        out, cols = (cfg.vocab_size, cfg.hidden_size) if name == "lm_head" else names.tensor_shape(cfg, name)
        spec.check(cols, name)
        bits = fmt.bits_for(name)
        per_word = 8 if fmt.layout == "awq" else 32 // math.gcd(32, bits)
        if out % per_word or (fmt.layout == "gptq" and cols * bits % 32):
            raise KananaQuantError(f"{bits}-bit {fmt.layout} packing cannot hold {name} [{out}, {cols}]; "
                                   "choose other --bits")


class LayerStream:
    def __init__(self, model: LoadedModel, out: Path, opts: QuantOptions,
                 on_stage: Callable[[str], None] | None = None):
        self.model, self.cfg, self.out, self.opts = model, model.config, Path(out), opts
        self.work = self.out.parent / f".{self.out.name}.work"
        self.device = torch.device(opts.device)
        self.on_stage = on_stage or (lambda _: None)
        self.hf = names.hf_name_map(self.cfg)

    # -- bookkeeping ----------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        facts = {"source": str(self.model.path.resolve()), "config": self.cfg.raw,
                 "options": {k: v for k, v in asdict(self.opts).items() if k != "device"}}
        return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()

    def _state(self) -> dict | None:
        path = self.work / "state.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def _save_state(self, state: dict) -> None:
        with atomic_file(self.work / "state.json") as tmp:
            tmp.write_text(json.dumps(state))

    def _acts(self, which: int, mode: str) -> np.memmap:
        shape = (self.opts.samples, self.opts.seq_len, self.cfg.hidden_size)
        return np.memmap(self.work / f"acts{which}.f32", dtype=np.float32, mode=mode, shape=shape)

    def start(self, resume: bool) -> int:
        """Prepare the work folder; returns the first layer still to quantize."""
        if self.out.exists():
            raise KananaQuantError(f"{self.out}: already exists; choose another output or remove it first")
        state = self._state()
        if state and not resume:
            raise KananaQuantError(f"{self.work}: an interrupted run is there; pass --resume to continue it "
                                   "or delete that folder to start over")
        if state and state["fingerprint"] != self.fingerprint():
            raise KananaQuantError(f"{self.work}: the interrupted run used other settings or another model; "
                                   "delete that folder to start over")
        if state:
            return state["done"] + 1
        if resume:
            raise KananaQuantError(f"{self.work}: nothing to resume (no interrupted run for {self.out})")
        ensure_free_space(self.out.parent, self._estimated_bytes(), f"quantizing into {self.out.name}")
        self._side_files()
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        if self.opts.calibrated:
            from kanana_quant.calib import calibration_ids

            ids = calibration_ids(self.model.tokenizer, self.opts.calib, self.opts.samples, self.opts.seq_len,
                                  self.opts.seed)
            acts = self._acts(0, "w+")
            embed = self.model.weights.get("embed")
            for i in range(len(ids)):
                acts[i] = embed[ids[i]]
            acts.flush()
            del acts
        self._save_state({"fingerprint": self.fingerprint(), "done": -1})
        return 0

    def _estimated_bytes(self) -> int:
        per_weight = self.opts.fmt.bits / 8 + 4 / max(self.opts.fmt.group_size, 32)
        quantized = sum(math.prod(names.tensor_shape(self.cfg, n)) for n in names.canonical_names(self.cfg)
                        if self.opts.fmt.quantizes(n))
        acts = 2 * self.opts.samples * self.opts.seq_len * self.cfg.hidden_size * 4 if self.opts.calibrated else 0
        return int(2 * quantized * per_weight + self.model.weights.nbytes() * 0.1 + acts)

    # -- one layer ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run_layer(self, i: int) -> LayerReport:
        t0 = time.perf_counter()
        w = {r: torch.from_numpy(a).to(self.device) for r, a in self.model.weights.layer(i).items()}
        self._release_source()
        layer = TorchLayer(self.cfg, w, self.opts.seq_len)
        report = LayerReport(i, 0.0)
        if self.opts.fmt.method == "rtn":
            qt = {r: self._rtn(w[r]) for r in w if self._quantized_role(r)}
        else:
            src = self._acts(i % 2, "r")
            qt = self._gptq(layer, src, report) if self.opts.fmt.method == "gptq" else self._awq(layer, src, report)
            dst = self._acts((i + 1) % 2, "w+")
            self.on_stage("forward")
            for b, x in zip(range(0, len(src), self.opts.batch), self._batches(src)):
                dst[b:b + len(x)] = layer.forward(x).cpu().numpy()
            dst.flush()
            del src, dst
        self._write_layer(i, w, qt)
        del w, layer, qt
        _return_freed_memory()
        report.seconds = time.perf_counter() - t0
        state = self._state()
        state["done"] = i
        state.setdefault("reports", []).append(asdict(report))
        self._save_state(state)
        return report

    def _release_source(self) -> None:
        """Unmap the source files once a layer is copied out: mmap'd pages read stay in this process's
        resident set otherwise, and over 32 layers of a 31 GB MoE that is the whole file (safetensors
        checkpoints reopen their mmap on the next read; GGUF sources stay mapped)."""
        if isinstance(self.model.weights, HFCheckpoint):
            self.model.weights.close()

    def _quantized_role(self, role: str) -> bool:
        return self.opts.fmt.quantizes(f"layers.0.{role}")

    def _qtensor(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bits: int | None = None) -> QTensor:
        return QTensor(codes.cpu().numpy().astype(np.uint8), scales.float().cpu().numpy(),
                       zeros.cpu().numpy().astype(np.uint8), bits or self.opts.fmt.bits, self.opts.fmt.group_size)

    @torch.inference_mode()
    def _lm_head(self) -> QTensor:
        """The output projection at --lm-head-bits: GPTQ on the final-norm activations of the quantized
        model when the method is GPTQ, else round-to-nearest with the clipping search."""
        fmt, src = self.opts.fmt, self.model.weights
        weight = torch.from_numpy(src.get("embed" if self.cfg.tie_word_embeddings else "lm_head")).to(self.device)
        spec = QuantSpec(fmt.bits_for("lm_head"), fmt.group_size, fmt.sym)
        search = self.opts.extra.get("search", True)
        if fmt.method != "gptq":
            return self._qtensor(*quantize_rtn(weight, spec, search), bits=spec.bits)
        self.on_stage("lm_head")
        solver = GPTQ(weight)
        del weight
        norm = torch.from_numpy(src.get("norm")).to(self.device)
        for x in self._batches(self._acts(self.cfg.num_layers % 2, "r")):
            solver.add_batch(rms_norm(x, norm, self.cfg.rms_norm_eps))
        result = solver.fasterquant(spec, percdamp=self.opts.damp, act_order=self.opts.act_order, search=search)
        return self._qtensor(result.codes, result.scales, result.zeros, bits=spec.bits)

    def _rtn(self, weight: torch.Tensor, importance: torch.Tensor | None = None, search: bool | None = None) -> QTensor:
        if search is None:
            # Unweighted clipping search helps symmetric grids but hurt asymmetric ones in bench/quality.py
            # (SmolLM2: 3-bit g64 asym PPL 97.5 -> 101.2, 4-bit per-channel asym 52.6 -> 75.0).
            search = self.opts.extra.get("search", self.opts.fmt.sym)
        codes, scales, zeros = quantize_rtn(weight.float(), self.opts.spec, search, importance)
        return self._qtensor(codes, scales, zeros)

    def _set(self, layer: TorchLayer, role: str, q: QTensor) -> None:
        # Later stages must see the quantized weights (true-sequential), exactly as they will be stored.
        layer.w[role] = torch.from_numpy(q.dequantize()).to(self.device)

    def _batches(self, src: np.memmap):
        for b in range(0, len(src), self.opts.batch):
            yield torch.from_numpy(np.array(src[b:b + self.opts.batch])).to(self.device)

    def _gptq_group(self, layer: TorchLayer, roles: list[str], feed: Callable, qt: dict, report: LayerReport,
                    src: np.memmap) -> None:
        """One GPTQ stage: the roles share their input, so one Hessian is accumulated and copied."""
        self.on_stage("+".join(r.split(".")[-1] for r in roles) if len(roles) < 4 else f"{len(roles)} linears")
        first = GPTQ(layer.w[roles[0]])
        for x in self._batches(src):
            first.add_batch(feed(x))
        self._solve([first] + [self._sharing(layer.w[r], first) for r in roles[1:]], roles, layer, qt, report)

    @staticmethod
    def _sharing(weight: torch.Tensor, template: GPTQ) -> GPTQ:
        g = GPTQ(weight)
        g.H, g.nsamples, g.tokens = template.H.clone(), template.nsamples, template.tokens
        return g

    def _solve(self, solvers: list[GPTQ], roles: list[str], layer: TorchLayer, qt: dict, report: LayerReport):
        for role, solver in zip(roles, solvers):
            result = solver.fasterquant(self.opts.spec, percdamp=self.opts.damp, act_order=self.opts.act_order,
                                        search=self.opts.extra.get("search", True))
            qt[role] = self._qtensor(result.codes, result.scales, result.zeros)
            report.loss += float(result.loss)
            self._set(layer, role, qt[role])

    def _gptq(self, layer: TorchLayer, src: np.memmap, report: LayerReport) -> dict[str, QTensor]:
        qt: dict[str, QTensor] = {}
        self._gptq_group(layer, ["q", "k", "v"], layer.attention_input, qt, report, src)
        self._gptq_group(layer, ["o"], lambda x: layer.attention_context(layer.attention_input(x)), qt, report, src)

        def mlp_in(x):
            return layer.mlp_input(layer.after_attention(x, layer.attention_context(layer.attention_input(x))))

        if not self.cfg.moe:
            self._gptq_group(layer, ["gate", "up"], mlp_in, qt, report, src)
            self._gptq_group(layer, ["down"], lambda x: layer.swiglu_hidden(mlp_in(x)), qt, report, src)
            return qt
        self.on_stage("experts")
        xs = torch.cat([mlp_in(x).reshape(-1, self.cfg.hidden_size) for x in self._batches(src)])
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
            self._solve_stacked(solvers, [[p + "gate", p + "up"] for p in prefixes], layer, qt, report)
            solvers = []
            for e, p in zip(chunk, prefixes):
                solver = GPTQ(layer.w[p + "down"])
                solver.add_batch(layer.swiglu_hidden(xs[routed[e].rows], p), routed[e].weights)
                solvers.append(solver)
            self._solve_stacked(solvers, [[p + "down"] for p in prefixes], layer, qt, report)
        return qt

    def _solve_stacked(self, solvers: list[GPTQ], roles: list[list[str]], layer: TorchLayer, qt: dict,
                       report: LayerReport) -> None:
        """Experts in one batched GPTQ sweep; solver k's rows are roles[k]'s weights stacked in order."""
        results = fasterquant_batched(solvers, self.opts.spec, percdamp=self.opts.damp,
                                      act_order=self.opts.act_order, search=self.opts.extra.get("search", True))
        for result, group in zip(results, roles):
            report.loss += result.loss
            start = 0
            for role in group:
                rows = slice(start, start + layer.w[role].shape[0])
                start = rows.stop
                qt[role] = self._qtensor(result.codes[rows], result.scales[rows], result.zeros[rows])
                self._set(layer, role, qt[role])

    def _awq(self, layer: TorchLayer, src: np.memmap, report: LayerReport) -> dict[str, QTensor]:
        """AWQ in AutoAWQ's order: scales searched on the float layer's activations and folded into the
        previous op (norm → q/k/v, v → o without GQA, norm → gate/up, up → down), then every linear clipped
        on its scaled input and rounded. MoE experts get their own up → down scales on their routed
        tokens; their gate/up share the norm with the router, so they get clipping only."""
        w, spec, hidden_size = layer.w, self.opts.spec, self.cfg.hidden_size
        pick = awq.search_sequences(src.shape[0], self.opts.extra.get("awq_tokens", AWQ_TOKENS), self.opts.seq_len)
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
        self.on_stage("clip")
        qt = {}
        for role in [r for r in w if self._quantized_role(r)]:
            kind = role.rsplit(".", 1)[-1]
            source = {"k": "q", "v": "q", "up": "gate"}.get(kind, kind)
            x = inputs[role.removesuffix(kind) + source] if role.startswith("experts.") else inputs[source]
            # AWQ leaves q and k unclipped: their errors pass through softmax, not the output directly.
            clipped = w[role] if kind in ("q", "k") else awq.search_clip(x, w[role], spec)
            qt[role] = self._rtn(clipped, search=False)
            self._set(layer, role, qt[role])
        return qt

    # -- output ---------------------------------------------------------------------------------------
    def _layer_specs(self, i: int) -> list[TensorSpec]:
        specs = []
        for role in names.layer_roles(self.cfg):
            name = f"layers.{i}.{role}"
            out, *rest = names.tensor_shape(self.cfg, name)
            if self.opts.fmt.quantizes(name):
                specs += packed_specs(self.opts.fmt, hf_base(self.hf[name]), out, rest[0])
            else:
                specs.append(TensorSpec(self.hf[name], self.model.weights.dtype(name), (out, *rest)))
        return specs

    def _write_layer(self, i: int, w: dict[str, torch.Tensor], qt: dict[str, QTensor]) -> None:
        tensors: dict[str, np.ndarray] = {}
        for role, q in qt.items():
            for suffix, array in q.pack(self.opts.fmt.layout).items():
                tensors[f"{hf_base(self.hf[f'layers.{i}.{role}'])}.{suffix}"] = array
        for role, value in w.items():
            if role not in qt:  # norms (AWQ may have rescaled them), router, biases
                tensors[self.hf[f"layers.{i}.{role}"]] = value.float().cpu().numpy()
        write_safetensors(self.work / f"layer{i}.safetensors", self._layer_specs(i), lambda s: tensors[s.name])

    def finish(self) -> Path:
        """Assemble the final checkpoint from the per-layer files (streamed) and drop the work folder."""
        cfg, src = self.cfg, self.model.weights
        specs = [TensorSpec(self.hf["embed"], src.dtype("embed"), names.tensor_shape(cfg, "embed"))]
        layer_files = [SafetensorsFile(self.work / f"layer{i}.safetensors") for i in range(cfg.num_layers)]
        owner = {}
        for i, file in enumerate(layer_files):
            for spec in self._layer_specs(i):
                specs.append(spec)
                owner[spec.name] = file
        specs.append(TensorSpec(self.hf["norm"], src.dtype("norm"), names.tensor_shape(cfg, "norm")))
        head = {}
        if self.opts.fmt.lm_head:
            q = self._lm_head()
            head = {f"lm_head.{k}": v for k, v in q.pack(self.opts.fmt.layout).items()}
            specs += packed_specs(self.opts.fmt, "lm_head", cfg.vocab_size, cfg.hidden_size, q.bits)
        elif "lm_head" in self.hf:
            specs.append(TensorSpec(self.hf["lm_head"], src.dtype("lm_head"), names.tensor_shape(cfg, "lm_head")))
        canonical = {hf: n for n, hf in self.hf.items()}

        reading = []

        def produce(spec: TensorSpec) -> np.ndarray:
            file = owner.get(spec.name)
            if reading and reading[-1] is not file:  # tensors come in order: the last file is done with
                reading.pop().close()
                self._release_source()
            if spec.name in head:
                return head[spec.name]
            if file is not None:
                if not reading:
                    reading.append(file)
                return file.raw(spec.name) if spec.dtype in ("I32", "F16") else file.get(spec.name)
            name = canonical[spec.name]
            if hasattr(src, "raw") and spec.dtype == src.dtype(name):
                return src.raw(name)  # unchanged (embeddings, norm): no float32 copy of a 128K-row table
            return src.get(name)

        config = dict(cfg.raw)
        config["quantization_config"] = self.opts.fmt.to_hf()
        if self.opts.fmt.lm_head:
            config["tie_word_embeddings"] = False  # a quantized lm_head is its own tensor; the embedding stays float
        reports = (self._state() or {}).get("reports", [])
        files = {"config.json": json.dumps(config, indent=2, ensure_ascii=False), **self._side_files(),
                 "quantize_report.json": json.dumps(reports, indent=1)}  # inside the atomic directory
        save_checkpoint(self.out, specs, produce, files)
        for file in layer_files:
            file.close()
        shutil.rmtree(self.work, ignore_errors=True)
        return self.out

    def _side_files(self) -> dict[str, str]:
        """Tokenizer and generation files copied into the output (read at the start too, so a broken one
        fails before hours of work, not after)."""
        if not self.model.path.is_dir():  # a GGUF source carries its tokenizer in metadata
            return self.model.tokenizer.to_files()
        files = {}
        for fname in COPIED_FILES:
            path = self.model.path / fname
            if path.is_file():
                try:
                    files[fname] = path.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError) as e:
                    raise KananaQuantError(f"{path}: cannot be read as UTF-8 text ({type(e).__name__}); "
                                           "fix or remove it") from None
        return files


def _return_freed_memory() -> None:
    """glibc keeps a freed layer's memory for reuse; hand it back so resident memory shows one layer."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def prepare(model: LoadedModel, out: Path, opts: QuantOptions, resume: bool = False,
            on_stage: Callable[[str], None] | None = None) -> tuple[LayerStream, int]:
    """Check everything a user can get wrong and set up the work folder: (stream, first layer to run)."""
    check_format(model, opts.fmt)
    stream = LayerStream(model, out, opts, on_stage)
    return stream, stream.start(resume)


def quantize_model(model: LoadedModel, out: Path, opts: QuantOptions, resume: bool = False,
                   on_layer: Callable[[LayerReport], None] | None = None,
                   on_stage: Callable[[str], None] | None = None) -> Path:
    stream, first = prepare(model, out, opts, resume, on_stage)
    for i in range(first, model.config.num_layers):
        report = stream.run_layer(i)
        if on_layer:
            on_layer(report)
    return stream.finish()
