"""What a quantization run is asked to do (QuantOptions) and what it reports per layer (LayerReport)."""

from __future__ import annotations

from dataclasses import dataclass

from kanana_quant.errors import KananaQuantError
from kanana_quant.qcheckpoint import QuantFormat
from kanana_quant.quant.grid import QuantSpec
from kanana_quant.resources import AWQ_TOKENS


# Measured on SmolLM2 against llama.cpp+imatrix by bench/gguf_quality.py (numbers in README, BENCHMARKS.md).
GGUF_SHRINK = 0.5


@dataclass(frozen=True)
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
    # The clipping search when scales are fitted. None: each method's measured default, on for GPTQ and for
    # symmetric RTN, off for asymmetric RTN (it hurt there in bench/quality.py: SmolLM2 3-bit g64 asym PPL
    # 97.5 -> 101.2, 4-bit per-channel asym 52.6 -> 75.0). AWQ clips with its own search instead.
    search: bool | None = None
    awq_tokens: int = AWQ_TOKENS  # tokens AWQ's scale search runs on, in whole sequences
    # GPTQ's Hessian shrunk toward its diagonal by this fraction (gptq.py GPTQ._take). None: each output's
    # measured default, GGUF_SHRINK for --format gguf (bench/gguf_quality.py) and 0 (plain GPTQ) for HF
    # checkpoints, where bench/quality.py has not measured it.
    shrink: float | None = None

    def __post_init__(self):
        QuantSpec(self.fmt.bits, self.fmt.group_size, self.fmt.sym)  # bits and group size
        if self.samples < 1 or self.seq_len < 8:
            raise KananaQuantError(f"--samples must be >= 1 and --seq-len >= 8, got {self.samples} and "
                                   f"{self.seq_len}")
        if self.damp <= 0:
            raise KananaQuantError(f"--damp must be > 0, got {self.damp}")
        if self.shrink is not None and not 0 <= self.shrink <= 1:
            raise KananaQuantError(f"--shrink must be between 0 (plain GPTQ) and 1 (weighted RTN), got {self.shrink}")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.fmt.bits, self.fmt.group_size, self.fmt.sym)

    @property
    def calibrated(self) -> bool:
        return self.fmt.method != "rtn"

    @property
    def rtn_search(self) -> bool:
        return self.fmt.sym if self.search is None else self.search

    def gptq_shrink(self, gguf: bool) -> float:
        return self.shrink if self.shrink is not None else GGUF_SHRINK if gguf else 0.0

    @property
    def gptq_search(self) -> bool:
        return True if self.search is None else self.search


@dataclass
class LayerReport:
    layer: int
    seconds: float
    loss: float = 0.0
    expert_tokens: list[int] | None = None
    # GGUF: how many tensors kept GPTQ's codes and how many the searched RTN on the same grid (it scored lower
    # error on the calibration inputs, held-out ones when tokens are few for the width); held_out: that check ran
    rounding: dict[str, int] | None = None
