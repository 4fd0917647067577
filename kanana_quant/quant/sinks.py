"""Where quantized layers go. A sink checks up front that the output can hold the model, writes each finished
layer into the work folder, and assembles the output at the end: CheckpointSink a GPTQ/AWQ-layout safetensors
checkpoint, gguf_sink.GGUFSink a llama.cpp GGUF file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from kanana_quant import names
from kanana_quant.checkpoint import save_checkpoint
from kanana_quant.errors import KananaQuantError
from kanana_quant.loader import LoadedModel
from kanana_quant.qcheckpoint import QTensor, QuantFormat, hf_base, packed_specs
from kanana_quant.quant import packing
from kanana_quant.quant.options import QuantOptions
from kanana_quant.quant.recipes import CodeRounder, Rounder
from kanana_quant.quant.workdir import WorkDir
from kanana_quant.safetensors_io import SafetensorsFile, TensorSpec, write_safetensors
from kanana_quant.tokenizer import side_files


class Sink(Protocol):
    rounder: Rounder  # how GPTQ rounds for this output
    kind: dict  # what kind of output, for the run's fingerprint

    def estimated_bytes(self) -> int:
        """Disk the finished output and its layer files will need."""

    def write_layer(self, work: WorkDir, index: int, weights: dict[str, torch.Tensor], stored: dict) -> None:
        """Layer `index` as it will be output: `stored` for the quantized linears, `weights` for the rest."""

    def finish(self, work: WorkDir, lm_head: QTensor | None) -> Path:
        """Assemble the output from the layer files (streamed) and return its path."""


def output_bytes(model: LoadedModel, fmt: QuantFormat) -> int:
    """A generous estimate of a quantized output plus its layer files: the quantized linears twice at fmt's
    bits and scales, and a tenth of the source for everything else."""
    per_weight = fmt.bits / 8 + 4 / max(fmt.group_size, 32)
    quantized = sum(math.prod(names.tensor_shape(model.config, n)) for n in names.canonical_names(model.config)
                    if fmt.quantizes(n))
    return int(2 * quantized * per_weight + model.weights.nbytes() * 0.1)


class CheckpointSink:
    """A GPTQ v1 / AWQ GEMM safetensors checkpoint (QuantizedCheckpoint reads it back)."""

    def __init__(self, model: LoadedModel, out: Path, opts: QuantOptions):
        self.model, self.cfg, self.out, self.opts, self.fmt = model, model.config, Path(out), opts, opts.fmt
        self.hf = names.hf_name_map(self.cfg, names.WRITTEN_LAYOUT)  # MoE: the layout GPTQModel loads
        self.rounder = CodeRounder(opts)
        self.kind = {"output": "checkpoint"}
        self._check()
        self.side_files = side_files(model.path, model.tokenizer)  # read now: a broken one fails before the work

    def _check(self) -> None:
        """Every linear must fit the grid and the packed layout: fail before any work."""
        cfg, fmt = self.cfg, self.fmt
        spec = self.opts.spec
        if fmt.lm_head and fmt.layout == "awq" and fmt.bits_for("lm_head") != fmt.bits:
            raise KananaQuantError("AWQ's GEMM layout has one width for every tensor: --lm-head-bits must equal "
                                   "--bits with --method awq")
        quantized = [n for n in names.canonical_names(cfg) if fmt.quantizes(n)]
        if fmt.lm_head and "lm_head" not in quantized:
            quantized.append("lm_head")  # tied: the lm_head is quantized from the embedding, which stays float
        for name in quantized:
            out, cols = (cfg.vocab_size, cfg.hidden_size) if name == "lm_head" else names.tensor_shape(cfg, name)
            spec.check(cols, name)
            bits = fmt.bits_for(name)
            if not packing.packable(fmt.layout, bits, fmt.group_size, out, cols):
                raise KananaQuantError(f"{bits}-bit {fmt.layout} packing cannot hold {name} [{out}, {cols}]; "
                                       "choose other --bits")

    def estimated_bytes(self) -> int:
        return output_bytes(self.model, self.fmt)

    def _layer_specs(self, i: int) -> list[TensorSpec]:
        specs = []
        for role in names.layer_roles(self.cfg):
            name = f"layers.{i}.{role}"
            out, *rest = names.tensor_shape(self.cfg, name)
            if self.fmt.quantizes(name):
                specs += packed_specs(self.fmt, hf_base(self.hf[name]), out, rest[0])
            else:
                specs.append(TensorSpec(self.hf[name], self.model.weights.dtype(name), (out, *rest)))
        return specs

    def write_layer(self, work: WorkDir, index: int, weights: dict[str, torch.Tensor], stored: dict) -> None:
        tensors: dict[str, np.ndarray] = {}
        for role, q in stored.items():
            for suffix, array in q.pack(self.fmt.layout).items():
                tensors[f"{hf_base(self.hf[f'layers.{index}.{role}'])}.{suffix}"] = array
        for role, value in weights.items():
            if role not in stored:  # norms (AWQ may have rescaled them), router, biases
                tensors[self.hf[f"layers.{index}.{role}"]] = value.float().cpu().numpy()
        write_safetensors(work.layer_file(index), self._layer_specs(index), lambda s: tensors[s.name])

    def finish(self, work: WorkDir, lm_head: QTensor | None) -> Path:
        cfg, src = self.cfg, self.model.weights
        specs = [TensorSpec(self.hf["embed"], src.dtype("embed"), names.tensor_shape(cfg, "embed"))]
        layer_files = [SafetensorsFile(work.layer_file(i)) for i in range(cfg.num_layers)]
        owner = {}
        for i, file in enumerate(layer_files):
            for spec in self._layer_specs(i):
                specs.append(spec)
                owner[spec.name] = file
        specs.append(TensorSpec(self.hf["norm"], src.dtype("norm"), names.tensor_shape(cfg, "norm")))
        head = {}
        if lm_head is not None:
            head = {f"lm_head.{k}": v for k, v in lm_head.pack(self.fmt.layout).items()}
            specs += packed_specs(self.fmt, "lm_head", cfg.vocab_size, cfg.hidden_size, lm_head.bits)
        elif "lm_head" in self.hf:
            specs.append(TensorSpec(self.hf["lm_head"], src.dtype("lm_head"), names.tensor_shape(cfg, "lm_head")))
        canonical = {hf: n for n, hf in self.hf.items()}
        reading = []

        def produce(spec: TensorSpec) -> np.ndarray:
            file = owner.get(spec.name)
            if reading and reading[-1] is not file:  # tensors come in order: the last file is done with
                reading.pop().close()
                src.close()
            if spec.name in head:
                return head[spec.name]
            if file is not None:
                if not reading:
                    reading.append(file)
                return file.raw(spec.name) if spec.dtype in ("I32", "F16") else file.get(spec.name)
            name = canonical[spec.name]
            if spec.dtype == src.dtype(name):
                return src.raw(name)  # unchanged (embeddings, norm): no float32 copy of a 128K-row table
            return src.get(name)

        config = dict(cfg.raw)
        config["quantization_config"] = self.fmt.to_hf()
        if lm_head is not None:
            config["tie_word_embeddings"] = False  # a quantized lm_head is its own tensor; the embedding stays float
        files = {"config.json": json.dumps(config, indent=2, ensure_ascii=False), **self.side_files,
                 "quantize_report.json": json.dumps(work.reports(), indent=1)}  # inside the atomic directory
        save_checkpoint(self.out, specs, produce, files)
        for file in layer_files:
            file.close()
        return self.out
