"""GPTQ straight into a GGUF: every linear is quantized by GPTQ on the grid of the GGML type llama.cpp's
mix gives it (`--type Q4_K_M` → Q4_K/Q5_K/Q6_K/Q5_0/Q8_0 per tensor, as llama-quantize would choose), and
the codes are packed as they are. The layer loop is the driver's; this module rounds (GGMLRounder), keeps
each layer's packed bytes in the work folder, and has the GGUF writer take them as they are."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from kanana_quant.errors import KananaQuantError
from kanana_quant.gguf.mix import FLOAT_TYPES, file_type_info, tensor_type
from kanana_quant.gguf.writer import export_gguf
from kanana_quant.loader import LoadedModel
from kanana_quant.qcheckpoint import QTensor
from kanana_quant.quant import ggml_grid
from kanana_quant.quant.grid import QuantSpec
from kanana_quant.quant.options import QuantOptions
from kanana_quant.quant.sinks import output_bytes
from kanana_quant.quant.workdir import WorkDir
from kanana_quant.safetensors_io import SafetensorsFile, TensorSpec, write_safetensors

_ANY_SPEC = QuantSpec(4, 32, True)  # unused by GPTQ on a fixed grid beyond its row check (rows are 32-blocks)


@dataclass
class GGMLTensor:
    qtype: GGMLQuantizationType
    data: np.ndarray  # the type's bytes, rows in Hugging Face order


class GGMLRounder:
    """GPTQ on each tensor's GGML grid (gguf.mix's type, fitted by ggml_grid); types it does not target stay
    float and are encoded by the writer."""

    def __init__(self, cfg, file_type: str, opts: QuantOptions):
        self.cfg, self.file_type, self.opts = cfg, file_type, opts

    def round(self, layer, index, solvers, groups, stored, report, batched) -> None:
        for solver, roles in zip(solvers, groups):
            full = [f"layers.{index}.{r}" for r in roles]
            qtypes = {tensor_type(self.cfg, n, self.file_type, has_imatrix=True) for n in full}
            if len(qtypes) != 1:
                raise KananaQuantError(f"{', '.join(full)}: stacked for GPTQ but given different GGUF types")
            qtype = qtypes.pop()
            fit = ggml_grid.fitter(qtype)
            if fit is None:
                continue
            fitted = {}

            def grid(w: torch.Tensor, importance: torch.Tensor):
                fitted["fit"] = fit(w.cpu(), importance.cpu())  # the block fitters are numpy
                return fitted["fit"].grid.to(w.device)

            result = solver.fasterquant(_ANY_SPEC, percdamp=self.opts.damp, act_order=self.opts.act_order,
                                        grid=grid)
            data = fitted["fit"].pack(result.codes.cpu().numpy())  # one byte row per weight row
            report.loss += float(result.loss)
            start = 0
            for role in roles:
                rows = slice(start, start + layer.w[role].shape[0])
                start = rows.stop
                stored[role] = GGMLTensor(qtype, data[rows])
                layer.w[role] = result.weight[rows].to(layer.w[role].device)  # true-sequential


class GGUFSink:
    def __init__(self, model: LoadedModel, out: Path, opts: QuantOptions, file_type: str):
        key = self.check(opts, file_type, out)
        self.model, self.out, self.file_type, self.fmt = model, Path(out), key, opts.fmt
        self.rounder = GGMLRounder(model.config, key, opts)
        self.kind = {"output": "gguf", "gguf_type": key}

    @staticmethod
    def check(opts: QuantOptions, file_type: str, out: Path) -> str:
        """What a GGUF output asks of the options, checked before any loading; the file type's name."""
        key, qtype, _ = file_type_info(file_type)
        if opts.fmt.method != "gptq":
            raise KananaQuantError("--format gguf runs GPTQ on the GGUF grids: use --method gptq (for RTN, "
                                   "`kanana-quant export gguf` quantizes as llama-quantize does)")
        if qtype in FLOAT_TYPES:
            raise KananaQuantError(f"--type {key} is not quantized; GPTQ needs a quantized GGUF type")
        if opts.fmt.lm_head:
            raise KananaQuantError("--lm-head-bits applies to --format hf; in a GGUF, --type decides the output "
                                   "tensor's type (Q6_K or Q8_0, as llama-quantize)")
        if Path(out).suffix != ".gguf":
            raise KananaQuantError(f"--format gguf writes a file: give -o a name ending in .gguf, not {out}")
        return key

    def estimated_bytes(self) -> int:
        return output_bytes(self.model, self.fmt)

    def write_layer(self, work: WorkDir, index: int, weights: dict[str, torch.Tensor], stored: dict) -> None:
        specs, tensors = [], {}
        for role, q in stored.items():  # only the packed linears: the writer reads the rest from the source
            name = f"layers.{index}.{role}.ggml"
            tensors[name] = q.data
            specs.append(TensorSpec(name, "U8", q.data.shape))
        write_safetensors(work.layer_file(index), specs, lambda s: tensors[s.name])

    def finish(self, work: WorkDir, lm_head: QTensor | None) -> Path:
        files = [SafetensorsFile(work.layer_file(i)) for i in range(self.model.config.num_layers)]
        try:
            # calibrated: the types llama-quantize picks with an importance matrix, so the files compare at equal size
            export_gguf(self.model, self.out, self.file_type, packed=_PackedLayers(files), has_imatrix=True)
        finally:
            for f in files:
                f.close()
        return self.out


class _PackedLayers:
    """GPTQ's packed bytes of each layer's linears, as the writer asks for them (writer.PackedBytes)."""

    def __init__(self, layer_files: list[SafetensorsFile]):
        self.files = layer_files
        self._open: SafetensorsFile | None = None

    def __call__(self, name: str, qtype: GGMLQuantizationType) -> np.ndarray | None:
        if not name.startswith("layers."):
            return None
        file = self.files[int(name.split(".")[1])]
        # The writer reads layer after layer: unmap the previous layer's file, whose pages read so far would
        # otherwise stay in this process's resident set until the end (SafetensorsFile remaps on its next read).
        if self._open is not None and self._open is not file:
            self._open.close()
        self._open = file
        if name + ".ggml" not in file.tensors:
            return None
        return file.raw(name + ".ggml")  # GPTQ packed it on the grid of the very type the writer plans
