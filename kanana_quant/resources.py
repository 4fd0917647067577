"""Resource checks that run before any long job: will it fit in RAM, will the output fit on disk.

A quantization that dies of memory after two hours, or a GGUF export that fills the disk at 95 %, is the
failure users hate most; both are predictable from the config and the flags, so they are refused up front
with one line that says what to change.

RAM for calibration (quant/driver.py): the activations between layers live in disk memmaps, so they cost
page cache, not required RAM; what must fit in RAM is one layer's weights (several float32 copies), one
forward batch with its intermediates, the GPTQ Hessians, and the tokens a method holds whole: AWQ's
~4096-token scale-search slice, and for MoE layers every calibration token at once (the router needs all of
them to give each expert its share).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from kanana_quant import names
from kanana_quant.atomic import ensure_free_space
from kanana_quant.config import ModelConfig
from kanana_quant.errors import KananaQuantError

F32 = 4
BATCH = 8  # QuantOptions.batch: calibration sequences per forward batch
AWQ_TOKENS = 4096  # calibration tokens the AWQ scale search reads per layer (QuantOptions.awq_tokens)
RAM_HEADROOM = 0.9  # plan on at most this share of the available RAM
MIN_CONTEXT = 256  # a context cut to fit RAM shorter than this is refused instead
GGUF_METADATA_BYTES = 16 << 20  # tokenizer and hyperparameters, over-estimated


def available_memory() -> int | None:
    """Bytes of RAM this process can still use: MemAvailable, capped by a cgroup (container) limit."""
    candidates = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    if not candidates:
        try:
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):
            pass
    cgroup = _cgroup_room()
    if cgroup is not None:
        candidates.append(cgroup)
    return min(candidates) if candidates else None


def fit_context(loaded, asked: int | None, kv_bytes_per_token: int, kv_type: str) -> int:
    """The context to open an engine with, decided before any allocation: `asked`, refused with one line when
    its KV cache and the weights will not fit in the RAM left; or, when not asked, the model's context cut to
    what fits."""
    cfg = loaded.config
    if asked is not None and asked < 1:
        raise KananaQuantError(f"--ctx must be at least 1, got {asked}")
    context = min(asked or cfg.max_position_embeddings, cfg.max_position_embeddings)
    room = available_memory()
    if room is None:
        return context
    weights = loaded.weights.nbytes()
    fits = int((room * RAM_HEADROOM - weights) // kv_bytes_per_token)
    if context <= fits:
        return context
    if asked is not None or fits < min(cfg.max_position_embeddings, MIN_CONTEXT):
        raise KananaQuantError(f"a context of {context} tokens needs {_size(weights + context * kv_bytes_per_token)} "
                               f"({kv_type} KV cache and weights), {_size(room)} of RAM is free; lower --ctx (at most "
                               f"{max(fits, 0)} fit) or store the cache smaller with --kv-type")
    from kanana_quant.progress import log

    log(f"[yellow]context cut from {context} to {fits} tokens: that is what fits in the {_size(room)} of RAM free "
        f"with a {kv_type} KV cache (--ctx and --kv-type choose)[/yellow]")
    return fits


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _cgroup_room() -> int | None:
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            return max(int(limit) - usage, 0)
    return None


def calibration_memory(cfg: ModelConfig, method: str, samples: int, seq_len: int,
                       batch: int = BATCH) -> dict[str, int]:
    """Estimated bytes of RAM a `quantize` run holds at its peak (one decoder layer at work), by what holds
    them (see the module docstring)."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    layer = sum(math.prod(names.tensor_shape(cfg, f"layers.0.{r}")) for r in names.layer_roles(cfg))
    widest = max(h, cfg.q_size, 2 * cfg.kv_size, 3 * inter)
    # float32 from the mmap, GPTQ's working copies, the dequantized replacements of the quantized stages
    need = {"layer weights": 3 * layer * F32}
    if method == "rtn":
        return need
    rows = min(batch, samples)
    scores = rows * cfg.num_heads * seq_len * seq_len  # if attention materialises its score matrix
    need["forward batch"] = (rows * seq_len * (4 * h + 2 * widest) + scores) * F32
    if method in ("gptq", "awq-gptq"):
        cols = max(h, cfg.q_size, inter)
        need["hessians"] = 4 * cols * cols * F32  # H, its damped flip, the Cholesky factor and inverse
    if method != "gptq":  # awq: whole sequences up to ~4096 tokens, their inputs and outputs of every linear
        tokens = min(samples, max(1, math.ceil(AWQ_TOKENS / seq_len))) * seq_len
        need["awq search tokens"] = tokens * (6 * h + 3 * cfg.q_size + 6 * inter) * F32
    if cfg.moe:
        tokens = samples * seq_len
        moe = cfg.moe
        per_expert = max(128, tokens * moe.top_k // moe.num_experts)
        need["moe tokens (all at once)"] = (tokens * (h + 2 * moe.num_experts)
                                            + per_expert * (2 * h + 3 * moe.expert_intermediate_size)) * F32
    return need


def start_memory(cfg: ModelConfig, samples: int, seq_len: int) -> int:
    """Bytes held while the calibration activations are first written: the float32 embedding and the ids."""
    return cfg.vocab_size * cfg.hidden_size * F32 + samples * seq_len * 8


def check_calibration_memory(cfg: ModelConfig, method: str, samples: int, seq_len: int,
                             available: int | None = None) -> int:
    """Refuse settings whose estimated peak exceeds the available RAM; returns the estimate."""
    need = calibration_memory(cfg, method, samples, seq_len)
    if method != "rtn":
        need = max(need, {"embedding and token ids": start_memory(cfg, samples, seq_len)},
                   key=lambda d: sum(d.values()))
    total = sum(need.values())
    available = available_memory() if available is None else available
    if available is not None and total > available * RAM_HEADROOM:
        biggest = max(need, key=need.get)
        hint = ("use a machine with more RAM, or --method rtn" if biggest in ("layer weights", "hessians")
                else "lower --samples or --seq-len")
        raise KananaQuantError(f"quantizing with --method {method} --samples {samples} --seq-len {seq_len} needs "
                               f"about {total / 2**30:.1f} GiB of RAM ({biggest}: {need[biggest] / 2**30:.1f} GiB) "
                               f"but {available / 2**30:.1f} GiB is available; {hint}")
    return total


def check_quantize(loaded, method: str, samples: int, seq_len: int) -> None:
    """quantize_model's pre-flight, before any calibration (the disk check follows once the sink says what
    it will write)."""
    cfg = loaded.config
    if seq_len > cfg.max_position_embeddings:
        raise KananaQuantError(f"--seq-len {seq_len} is longer than the model's context of "
                               f"{cfg.max_position_embeddings} tokens; lower it")
    check_calibration_memory(cfg, method, samples, seq_len)


def gguf_bytes(cfg: ModelConfig, file_type: str) -> int:
    """The size of a GGUF export, from the exporter's own per-tensor type choice."""
    from gguf import GGML_QUANT_SIZES

    from kanana_quant.gguf.mix import tensor_type

    total = GGUF_METADATA_BYTES
    for name in names.canonical_names(cfg):
        block, size = GGML_QUANT_SIZES[tensor_type(cfg, name, file_type)]
        total += -(-math.prod(names.tensor_shape(cfg, name)) // block) * size
    return total


def check_gguf_export(loaded, out: Path, file_type: str) -> None:
    """The CLI's pre-flight for `export gguf`: the file must fit beside its destination (written to a
    temporary name there, then renamed)."""
    ensure_free_space(Path(out).parent, gguf_bytes(loaded.config, file_type), f"writing {Path(out).name}")
