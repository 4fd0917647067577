"""Quantized checkpoints: HF directories whose linear layers are stored in the standard GPTQ (v1) or AWQ
(GEMM) safetensors layouts, with a `quantization_config` block in config.json.

Layouts: `rtn` and `gptq` results are written in the GPTQ layout (`qweight`/`qzeros`/`scales`/`g_idx`,
quant_method "gptq", desc_act false: act-order runs with static groups, so groups stay contiguous and
g_idx is i // group_size). `awq` results at 4 bits are written in the AWQ GEMM layout (quant_method "awq");
AWQ at other widths has no AWQ layout and uses the GPTQ one (its scales are already folded into the
weights and norms, so the grid is the same). Routers, norms and embeddings stay float; lm_head is
quantized only when asked (`lm_head` in the config).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kanana_quant import names
from kanana_quant.checkpoint import HFCheckpoint
from kanana_quant.config import ModelConfig
from kanana_quant.errors import KananaQuantError
from kanana_quant.quant import packing
from kanana_quant.safetensors_io import TensorSpec

METHODS = ("rtn", "gptq", "awq", "awq-gptq")  # awq-gptq: AWQ's scales, then GPTQ's rounding (GPTQ layout)
SUPPORTED_BITS = packing.GPTQ_BITS
QUANTIZED_ROLES = frozenset(names.ATTENTION_LINEARS + names.MLP_LINEARS)


@dataclass(frozen=True)
class QuantFormat:
    method: str
    bits: int
    group_size: int  # -1 = per-channel
    sym: bool
    lm_head: bool = False
    lm_head_bits: int | None = None  # None: the same bits as the layers

    def __post_init__(self):
        if self.method not in METHODS:
            raise KananaQuantError(f"--method {self.method!r} is not supported; choose one of: {', '.join(METHODS)}")
        for flag, value in (("--bits", self.bits), ("--lm-head-bits", self.lm_head_bits)):
            if value is not None and (value not in SUPPORTED_BITS or isinstance(value, bool)):
                raise KananaQuantError(f"{flag} {value!r} is not supported; choose one of {SUPPORTED_BITS}")

    @property
    def layout(self) -> str:
        return "awq" if self.method == "awq" and self.bits == 4 else "gptq"

    def bits_for(self, name: str) -> int:
        return self.lm_head_bits or self.bits if name == "lm_head" else self.bits

    def to_hf(self) -> dict:
        ours = {"method": self.method, "sym": self.sym, "lm_head": self.lm_head}
        if self.lm_head and self.bits_for("lm_head") != self.bits:
            ours["lm_head_bits"] = self.lm_head_bits
        block = {"quant_method": self.layout, "bits": self.bits, "group_size": self.group_size, "kanana_quant": ours}
        if self.layout == "awq":
            return {**block, "version": "gemm", "zero_point": not self.sym}
        block = {**block, "desc_act": False, "sym": self.sym, "static_groups": True, "checkpoint_format": "gptq",
                 "lm_head": self.lm_head}
        if "lm_head_bits" in ours:  # GPTQModel's per-module override (its keys are regexes of module names)
            block["dynamic"] = {"lm_head": {"bits": self.lm_head_bits}}
        return block

    @classmethod
    def from_hf(cls, block: dict, source: str) -> "QuantFormat":
        if not isinstance(block, dict) or block.get("quant_method") not in ("gptq", "awq"):
            raise KananaQuantError(f"{source}: quantization_config is not GPTQ or AWQ; not a kanana-quant checkpoint")
        ours = block.get("kanana_quant") or {}
        if not isinstance(ours, dict):
            raise KananaQuantError(f"{source}: quantization_config.kanana_quant must be an object")
        layout = block["quant_method"]
        if layout == "gptq" and block.get("desc_act"):
            raise KananaQuantError(f"{source}: desc_act=true (reordered groups) is not supported; re-quantize "
                                   "with static groups")
        sym = ours.get("sym", block.get("sym", not block.get("zero_point", True)))
        bits, group_size, method = block.get("bits"), block.get("group_size", -1), ours.get("method", layout)
        if not (isinstance(bits, int) and isinstance(group_size, int)) or isinstance(bits, bool) \
                or isinstance(group_size, bool):
            raise KananaQuantError(f"{source}: quantization_config lacks integer bits/group_size")
        if bits not in SUPPORTED_BITS or not (group_size == packing.PER_CHANNEL or 0 < group_size <= 1 << 20):
            raise KananaQuantError(f"{source}: quantization_config bits {bits} / group_size {group_size} is not "
                                   f"supported (bits {', '.join(map(str, SUPPORTED_BITS))}; group_size -1 or > 0)")
        if method not in METHODS:
            raise KananaQuantError(f"{source}: quantization_config method {repr(method)[:40]} is not one of "
                                   f"{', '.join(METHODS)}")
        head_bits = ours.get("lm_head_bits")
        if head_bits is not None and (head_bits not in SUPPORTED_BITS or isinstance(head_bits, bool)):
            raise KananaQuantError(f"{source}: quantization_config lm_head_bits {repr(head_bits)[:20]} is not one "
                                   f"of {', '.join(map(str, SUPPORTED_BITS))}")
        fmt = cls(method=method, bits=bits, group_size=group_size, sym=bool(sym),
                  lm_head=bool(ours.get("lm_head", block.get("lm_head", False))), lm_head_bits=head_bits)
        if fmt.layout != layout:
            raise KananaQuantError(f"{source}: quantization_config says {layout} but method {fmt.method} at "
                                   f"{fmt.bits} bits is stored as {fmt.layout}")
        return fmt

    def quantizes(self, name: str) -> bool:
        if name == "lm_head":
            return self.lm_head
        return name.startswith("layers.") and name.rsplit(".", 1)[-1] in QUANTIZED_ROLES


@dataclass
class QTensor:
    """Integer codes on a grid: W[o, i] = scales[o, g] · (codes[o, i] − zeros[o, g]), g = i // group."""

    codes: np.ndarray  # uint8 [out, in]
    scales: np.ndarray  # float32 [out, groups], fp16-representable
    zeros: np.ndarray  # uint8 [out, groups]
    bits: int
    group_size: int  # -1 = per-channel

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def group_width(self) -> int:
        return packing.group_width(self.group_size, self.codes.shape[1])

    def dequantize(self, rows: slice = slice(None)) -> np.ndarray:
        codes = self.codes[rows]
        out, cols = codes.shape
        g = cols // self.group_width()
        grid = codes.reshape(out, g, -1).astype(np.float32) - self.zeros[rows, :, None]
        return (grid * self.scales[rows, :, None]).reshape(out, cols)

    def pack(self, layout: str) -> dict[str, np.ndarray]:
        if layout == "awq":
            return packing.pack_awq(self.codes, self.zeros, self.scales, self.group_size)
        return packing.pack_gptq(self.codes, self.zeros, self.scales, self.bits, self.group_size)

    @classmethod
    def unpack(cls, layout: str, tensors: dict[str, np.ndarray], bits: int, group_size: int) -> "QTensor":
        if layout == "awq":
            codes, zeros, scales = packing.unpack_awq(tensors, group_size)
        else:
            codes, zeros, scales = packing.unpack_gptq(tensors, bits, group_size)
        return cls(codes.astype(np.uint8), scales.astype(np.float32), zeros.astype(np.uint8), bits, group_size)


def packed_specs(fmt: QuantFormat, base: str, out_features: int, in_features: int,
                 bits: int | None = None) -> list[TensorSpec]:
    """The tensors a quantized linear [out, in] is stored as, named `{base}.qweight` etc. (`bits`: this
    tensor's, when it differs from the format's, e.g. an 8-bit lm_head)."""
    bits = bits or fmt.bits
    groups = in_features // packing.group_width(fmt.group_size, in_features)
    if fmt.layout == "awq":
        return [TensorSpec(f"{base}.qweight", "I32", (in_features, out_features // 8)),
                TensorSpec(f"{base}.qzeros", "I32", (groups, out_features // 8)),
                TensorSpec(f"{base}.scales", "F16", (groups, out_features))]
    return [TensorSpec(f"{base}.qweight", "I32", (in_features * bits // 32, out_features)),
            TensorSpec(f"{base}.qzeros", "I32", (groups, out_features * bits // 32)),
            TensorSpec(f"{base}.scales", "F16", (groups, out_features)),
            TensorSpec(f"{base}.g_idx", "I32", (in_features,))]


def hf_base(hf_weight_name: str) -> str:
    return hf_weight_name.removesuffix(".weight")


class QuantizedCheckpoint(HFCheckpoint):
    """A checkpoint written by `kanana-quant quantize` (or any desc_act-free GPTQ / AWQ-GEMM checkpoint).
    Implements weights.QuantizedWeights."""

    format: QuantFormat

    def __init__(self, model_dir, config: ModelConfig | None = None):
        from kanana_quant.config import load_config

        config = config or load_config(model_dir)
        self.format = QuantFormat.from_hf(config.raw.get("quantization_config"), f"{model_dir}/config.json")
        super().__init__(model_dir, config)

    def is_quantized(self, name: str) -> bool:
        return self.format.quantizes(name)

    def _check_one(self, name: str) -> None:
        if not self.is_quantized(name):
            return super()._check_one(name)
        out, cols = names.tensor_shape(self.config, name)
        base = hf_base(self._hf[name])
        fmt, bits = self.format, self.format.bits_for(name)
        if not packing.packable(fmt.layout, bits, fmt.group_size, out, cols):
            raise KananaQuantError(f"{self.dir}: {bits}-bit {fmt.layout} group {fmt.group_size} cannot pack "
                                   f"{base} [{out}, {cols}]; the checkpoint is corrupt")
        for spec in packed_specs(self.format, base, out, cols, bits):
            file = self._file_of(spec.name)
            info = file.tensors[spec.name]
            if info.shape != spec.shape or info.dtype != spec.dtype:
                raise KananaQuantError(f"{file.path}: {spec.name} is {info.dtype}{list(info.shape)}, expected "
                                       f"{spec.dtype}{list(spec.shape)} for {bits}-bit "
                                       f"group {self.format.group_size}; the checkpoint is corrupt")

    def qtensor(self, name: str, rows: slice = slice(None)) -> QTensor:
        """The tensor's codes, unpacked from the memory-mapped file; `rows` picks a block of output rows
        (see packing.output_rows)."""
        base = hf_base(self._hf[name])
        out, cols = names.tensor_shape(self.config, name)
        tensors, bits = {}, self.format.bits_for(name)
        for spec in packed_specs(self.format, base, out, cols, bits):
            tensors[spec.name.rsplit(".", 1)[1]] = self._file_of(spec.name).raw(spec.name)
        if rows != slice(None):
            tensors = packing.output_rows(self.format.layout, tensors, bits, *rows.indices(out)[:2])
        return QTensor.unpack(self.format.layout, tensors, bits, self.format.group_size)

    def get(self, name: str, dtype=np.float32) -> np.ndarray:
        if self.is_quantized(name):
            return self.qtensor(name).dequantize().astype(dtype, copy=False)
        return super().get(name, dtype)

    def dtype(self, name: str) -> str:
        return f"Q{self.format.bits_for(name)}" if self.is_quantized(name) else super().dtype(name)
