"""GPTQ straight into a GGUF: every linear is quantized by GPTQ on the grid of the GGML type llama.cpp's
mix gives it (`--type Q4_K_M` → Q4_K/Q5_K/Q6_K/Q5_0/Q8_0 per tensor, as llama-quantize would choose), and
the codes are packed as they are. The layer loop is the driver's; this module rounds (GGMLRounder), keeps
each layer's packed bytes in the work folder, and has the GGUF writer take them as they are."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from kanana_quant.errors import KananaQuantError
from kanana_quant.gguf.mix import FLOAT_TYPES, file_type_info, tensor_type
from kanana_quant.gguf.writer import export_gguf
from kanana_quant.loader import LoadedModel
from kanana_quant.qcheckpoint import QTensor
from kanana_quant.progress import log
from kanana_quant import names
from kanana_quant.quant import ggml_grid
from kanana_quant.quant import target_bpw as target_bpw_mod
from kanana_quant.quant.gptq import GPTQ
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


# Calibration tokens per input column below which GPTQ's Hessian is too poorly sampled to trust on its own
# calibration inputs: the run warns, and the never-worse-than-RTN guard scores GPTQ on held-out tokens.
FEW_TOKENS_PER_COLUMN = 4


def output_error(delta: torch.Tensor, H: torch.Tensor) -> float:
    """Σ over rows of δ H δᵀ: the squared output error of weights off by δ on the inputs H was built from."""
    return float(((delta @ H) * delta).sum())


class GGMLRounder:
    """GPTQ on each tensor's GGML grid (gguf.mix's type, fitted by ggml_grid); types it does not target stay
    float and are encoded by the writer.

    Never worse than RTN: per tensor, GPTQ's output error is compared with that of round-to-nearest on the same
    fitted grid (the searched block parameters, codes rounded), and the better is kept. With enough calibration
    tokens the comparison is on the calibration inputs (H). With few tokens GPTQ fits H's noise, and on its own
    inputs it always wins, so then GPTQ is also run on the even calibration sequences alone and both are scored
    on the odd ones: GPTQ is kept only if it wins on tokens it never saw."""

    def __init__(self, cfg, file_type: str, opts: QuantOptions, guard: bool = True,
                 types: Callable[[], dict] | None = None):
        self.cfg, self.file_type, self.opts, self.guard = cfg, file_type, opts, guard
        self.types = types or dict  # per-tensor types replacing the mix's (--target-bpw), computed on first use
        self._warned: set[int] = set()

    def held_out(self, samples: int, seq_len: int, cols: int) -> bool:
        """Whether a stage with `cols` input columns should keep held-out halves (and warn once per width)."""
        few = samples * seq_len < FEW_TOKENS_PER_COLUMN * cols
        if few and cols not in self._warned:
            self._warned.add(cols)
            log(f"warning: {samples} x {seq_len} calibration tokens are few for {cols}-wide layers (fewer than "
                f"{FEW_TOKENS_PER_COLUMN} per column): GPTQ is kept per tensor only where it beats RTN on held-out "
                "tokens; pass more --samples")
        return few and samples >= 2 and self.guard

    def round(self, layer, index, solvers, groups, stored, report, batched) -> None:
        counts = report.rounding if report.rounding is not None else {"gptq": 0, "rtn": 0, "held_out": 0}
        report.rounding = counts
        for solver, roles in zip(solvers, groups):
            full = [f"layers.{index}.{r}" for r in roles]
            qtypes = {self.types().get(n) or tensor_type(self.cfg, n, self.file_type, has_imatrix=True)
                      for n in full}
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

            W, H, halves = solver.W.clone(), solver.H.clone(), solver.halves
            shrink = self.opts.gptq_shrink(gguf=True)
            result = solver.fasterquant(_ANY_SPEC, percdamp=self.opts.damp, act_order=self.opts.act_order,
                                        grid=grid, shrink=shrink)
            g = fitted["fit"].grid.to(W.device)
            rtn_codes, rtn_weight = g.round(W, g.scale, g.zero)
            held = halves is not None and halves[0].nsamples > 0 and halves[1].nsamples > 0
            if held:  # GPTQ fitted on the even sequences, both scored on the odd ones
                probe = GPTQ(W)
                probe.H, probe.nsamples = halves[0].H, halves[0].nsamples
                probe_result = probe.fasterquant(_ANY_SPEC, percdamp=self.opts.damp, act_order=self.opts.act_order,
                                                 grid=lambda w, imp: g, shrink=shrink)
                gptq_err = output_error(W - probe_result.weight, halves[1].H)
                rtn_err = output_error(W - rtn_weight, halves[1].H)
            else:
                gptq_err, rtn_err = output_error(W - result.weight, H), output_error(W - rtn_weight, H)
            del H, halves
            keep_rtn = self.guard and rtn_err < gptq_err
            counts["rtn" if keep_rtn else "gptq"] += 1
            counts["held_out"] += int(held)
            codes, weight = (rtn_codes, rtn_weight) if keep_rtn else (result.codes, result.weight)
            data = fitted["fit"].pack(codes.to(torch.uint8).cpu().numpy())  # one byte row per weight row
            report.loss += float(result.loss)
            start = 0
            for role in roles:
                rows = slice(start, start + layer.w[role].shape[0])
                start = rows.stop
                stored[role] = GGMLTensor(qtype, data[rows])
                layer.w[role] = weight[rows].to(layer.w[role].device)  # true-sequential


class GGUFSink:
    def __init__(self, model: LoadedModel, out: Path, opts: QuantOptions, file_type: str, guard: bool = True,
                 target_bpw: float | None = None):
        """guard: keep, per tensor, the better of GPTQ and RTN on the same grid (off: GPTQ everywhere).
        target_bpw: pick each layer linear's type so they average this many bits per weight (target_bpw.py)."""
        key = self.check(opts, file_type, out)
        if target_bpw is not None:
            target_bpw_mod.check_target(target_bpw, model.config)
        self.model, self.out, self.file_type, self.fmt = model, Path(out), key, opts.fmt
        self.opts, self.target_bpw, self._types = opts, target_bpw, None
        self.rounder = GGMLRounder(model.config, key, opts, guard, self.types)
        self.kind = {"output": "gguf", "gguf_type": key, "target_bpw": target_bpw}
        log(f"GPTQ on the {key} grids, its Hessian shrunk {opts.gptq_shrink(gguf=True):g} toward its diagonal "
            "(--shrink)")

    def types(self) -> dict:
        """--target-bpw's per-tensor types (a float pre-pass over the calibration, run once), or {}."""
        if self.target_bpw is None:
            return {}
        if self._types is None:
            cfg = self.model.config
            log(f"--target-bpw {self.target_bpw:g}: measuring each linear's error per type on the float model")
            errors = target_bpw_mod.sensitivities(self.model, self.opts)
            sizes = {n: int(np.prod(names.tensor_shape(cfg, n))) for n in errors}
            self._types = target_bpw_mod.allocate(errors, sizes, self.target_bpw)
            got = sum(target_bpw_mod.bits_per_weight(t) * sizes[n] for n, t in self._types.items()) / sum(
                sizes.values())
            counts = {t.name: list(self._types.values()).count(t) for t in dict.fromkeys(self._types.values())}
            log(f"--target-bpw {self.target_bpw:g}: {got:.3f} bits per weight over the layer linears "
                f"({', '.join(f'{k} {v}' for k, v in counts.items())})")
        return self._types

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
        reports = work.reports()
        totals = {k: sum((r.get("rounding") or {}).get(k, 0) for r in reports) for k in ("gptq", "rtn", "held_out")}
        log(f"rounding kept per tensor: GPTQ {totals['gptq']}, searched RTN {totals['rtn']} "
            f"({totals['held_out']} decided on held-out calibration tokens)")
        per_layer = [[(r.get("rounding") or {}).get(k, 0) for k in ("gptq", "rtn", "held_out")] for r in reports]
        metadata = {"kanana_quant.quantize_report": json.dumps({"rounding": totals,
                                                                "per_layer_gptq_rtn_held_out": per_layer,
                                                                "gptq_shrink": self.opts.gptq_shrink(gguf=True)})}
        try:
            # calibrated: the types llama-quantize picks with an importance matrix, so the files compare at equal size
            export_gguf(self.model, self.out, self.file_type, packed=_PackedLayers(files), has_imatrix=True,
                        metadata=metadata, types=self.types())
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
