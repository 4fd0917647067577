"""GPTQ straight into a GGUF: every linear is quantized by GPTQ on the grid of the GGML type llama.cpp's
mix gives it (`--type Q4_K_M` → Q4_K/Q5_K/Q6_K/Q5_0/Q8_0 per tensor, as llama-quantize would choose), and
the codes are packed as they are. Layer streaming, activations in memmaps and --resume come from
LayerStream; only the per-linear solve, the per-layer files and the final assembly differ."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kanana_quant.errors import KananaQuantError
from kanana_quant.exporters.gguf import export_gguf, file_type_info, permute_rows, tensor_type
from kanana_quant.loader import LoadedModel
from kanana_quant.quant import ggml_grid
from kanana_quant.quant.grid import QuantSpec
from kanana_quant.quant.stream import LayerStream, QuantOptions
from kanana_quant.safetensors_io import SafetensorsFile, TensorSpec, write_safetensors

_ANY_SPEC = QuantSpec(4, 32, True)  # unused by GPTQ on a fixed grid beyond its row check (rows are 32-blocks)


@dataclass
class GGMLTensor:
    qtype: object
    data: np.ndarray  # the type's bytes, rows in Hugging Face order


class GGUFStream(LayerStream):
    def __init__(self, model: LoadedModel, out: Path, opts: QuantOptions, file_type: str, on_stage=None):
        if opts.fmt.method != "gptq":
            raise KananaQuantError("--format gguf quantizes with --method gptq (rtn into GGUF is "
                                   "`kanana-quant export gguf`)")
        self.file_type = file_type_info(file_type)[0]
        opts.extra = {**opts.extra, "gguf_type": self.file_type}  # part of the resume fingerprint
        super().__init__(model, out, opts, on_stage)
        self._layer = 0

    def run_layer(self, i: int):
        self._layer = i
        return super().run_layer(i)

    def _quantized_role(self, role: str) -> bool:
        return False  # everything GPTQ does not target stays float until the exporter writes it

    def _solve(self, solvers, roles, layer, qt, report, role_of: list[str] | None = None):
        for role, solver in zip(roles, solvers):
            parts = role_of or [role]  # the roles whose rows the solver holds, stacked in order
            qtype = tensor_type(self.cfg, f"layers.{self._layer}.{parts[0]}", self.file_type)
            fit = ggml_grid.fitter(qtype)
            if fit is None:
                continue
            fitted = {}

            def grid(w: torch.Tensor, importance: torch.Tensor):
                fitted["fit"] = fit(w.cpu(), importance.cpu())  # the block fitters are numpy
                g = fitted["fit"].grid
                return type(g)(g.scale.to(w.device), g.zero.to(w.device), g.maxq)

            result = solver.fasterquant(_ANY_SPEC, percdamp=self.opts.damp, act_order=self.opts.act_order,
                                        grid=grid)
            data = fitted["fit"].pack(result.codes.cpu().numpy())  # one byte row per weight row
            report.loss += float(result.loss)
            start = 0
            for part in parts:
                rows = slice(start, start + layer.w[part].shape[0])
                start = rows.stop
                qt[part] = GGMLTensor(qtype, data[rows])
                layer.w[part] = result.weight[rows].to(self.device)  # true-sequential: later stages see these

    def _solve_stacked(self, solvers, roles, layer, qt, report) -> None:
        """Experts one at a time on their GGUF grids; stacked gate+up rows share one type and split after."""
        for solver, group in zip(solvers, roles):
            full = [f"layers.{self._layer}.{r}" for r in group]
            qtypes = {tensor_type(self.cfg, n, self.file_type) for n in full}
            if len(qtypes) != 1:
                raise KananaQuantError(f"{', '.join(full)}: stacked for GPTQ but given different GGUF types")
            stacked = "+".join(group)
            self._solve([solver], [stacked], layer, qt, report, role_of=group)

    def _write_layer(self, i, w, qt) -> None:
        specs, tensors = [], {}
        for role, value in w.items():
            name = f"layers.{i}.{role}"
            if role in qt:
                tensors[name + ".ggml"] = qt[role].data
                specs.append(TensorSpec(name + ".ggml", "U8", qt[role].data.shape))
            else:
                tensors[name] = value.float().cpu().numpy()
                specs.append(TensorSpec(name, "F32", tuple(value.shape)))
        write_safetensors(self.work / f"layer{i}.safetensors", specs, lambda s: tensors[s.name])

    def finish(self) -> Path:
        files = [SafetensorsFile(self.work / f"layer{i}.safetensors") for i in range(self.cfg.num_layers)]
        weights = _StreamedWeights(self.model.weights, files, self.cfg, self.file_type)
        try:
            export_gguf(LoadedModel(self.model.path, self.cfg, weights, self.model.tokenizer), self.out,
                        self.file_type)
        finally:
            for f in files:
                f.close()
        shutil.rmtree(self.work, ignore_errors=True)
        return self.out


class _StreamedWeights:
    """The exporter's view of a finished run: GPTQ's packed bytes where it quantized, float elsewhere."""

    def __init__(self, source, layer_files: list[SafetensorsFile], cfg, file_type: str):
        self.source, self.files, self.config, self.file_type = source, layer_files, cfg, file_type
        self._open: SafetensorsFile | None = None

    def _file(self, name: str):
        if not name.startswith("layers."):
            return None
        file = self.files[int(name.split(".")[1])]
        # The exporter reads layer after layer: unmap the previous layer's file, whose pages read so far would
        # otherwise stay in this process's resident set until the end (SafetensorsFile remaps on its next read).
        if self._open is not None and self._open is not file:
            self._open.close()
        self._open = file
        return file

    def get(self, name: str, dtype=np.float32) -> np.ndarray:
        file = self._file(name)
        return self.source.get(name, dtype) if file is None else file.get(name, dtype)

    def is_quantized(self, name: str) -> bool:
        return False

    def ggml_bytes(self, name: str, qtype, heads: int | None) -> np.ndarray | None:
        """This tensor's bytes as GPTQ packed them, if it packed it as qtype."""
        file = self._file(name)
        if file is None or name + ".ggml" not in file.tensors:
            return None
        if tensor_type(self.config, name, self.file_type) != qtype:
            return None
        data = file.raw(name + ".ggml")
        return permute_rows(data, heads) if heads else data  # one byte row per weight row
