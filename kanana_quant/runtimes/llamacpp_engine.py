"""A GGUF file run by real llama.cpp (llama-cpp-python), behind the same Engine interface as the numpy
runtime, so our sampler, chat loop and perplexity drive it.

Which llama.cpp runs matters: llama-cpp-python compiles llama.cpp with -march=native, and on an Intel Xeon
with AMX that build puts quantized weights into ggml's AMX buffer, whose first decode segfaults (llama.cpp
issue #20824). README's install line builds without AMX (NO_AMX_FLAGS); CPU repacking, which makes Q4_0 fast,
stays on. pip reuses a wheel it built earlier whatever the flags say, so the engine checks the build it got
(`llama_print_system_info`) and, if AMX is compiled in, loads without ggml's extra buffer types: no AMX and no
repacking, slower but correct.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from kanana_quant.errors import KananaQuantError
from kanana_quant.progress import log
from kanana_quant.rope import llamacpp_yarn
from kanana_quant.runtimes.generate import thread_budget

GGML_KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # engines.KV_TYPES names → ggml_type
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
REINSTALL = (f'CFLAGS="{NO_AMX_FLAGS}" CXXFLAGS="{NO_AMX_FLAGS}" '
             "pip install --force-reinstall --no-cache-dir --no-deps llama-cpp-python")


@lru_cache(maxsize=1)
def build_features() -> dict[str, str]:
    """What the installed llama.cpp was compiled with, from its own report ("AMX_INT8 = 1 | REPACK = 1 ...")."""
    import llama_cpp

    text = llama_cpp.llama_print_system_info().decode(errors="replace")
    return dict(re.findall(r"(\w+) = (\w+)", text))


def load_plan(features: dict[str, str]) -> tuple[bool, str]:
    """(use ggml's extra buffer types?, the configuration in words) for a build with these features."""
    repack = features.get("REPACK") == "1"
    if features.get("AMX_INT8") == "1":
        return False, ("llama.cpp built with AMX, which crashes on quantized weights (llama.cpp #20824): loading "
                       "without extra buffer types (no AMX, no CPU repacking; slower). For full speed: " + REINSTALL)
    return True, f"llama.cpp without AMX, CPU repacking {'on' if repack else 'not built in'}"


@contextmanager
def _model_params(**fields):
    """Llama() builds its llama_model_params from llama_model_default_params() and exposes no argument for
    these fields, so the defaults are amended for the duration of one load."""
    import llama_cpp.llama_cpp as native

    default = native.llama_model_default_params

    def amended():
        params = default()
        for name, value in fields.items():
            setattr(params, name, value)
        return params

    native.llama_model_default_params = amended
    try:
        yield
    finally:
        native.llama_model_default_params = default


class LlamaCppEngine:
    name = "llama.cpp"

    def __init__(self, path: Path, config, max_seq_len: int | None = None, threads: int | None = None,
                 kv_type: str = "f16", extra_buffers: bool | None = None):
        """extra_buffers: load with ggml's extra buffer types (CPU repacking, AMX); None decides from the build."""
        from llama_cpp import Llama

        self.config = config
        self.max_seq_len = min(max_seq_len or config.max_position_embeddings, config.max_position_embeddings)
        # A quantized V cache needs flash attention in llama.cpp; otherwise its defaults (f16, no flash).
        kv = {"type_k": GGML_KV_TYPES[kv_type], "type_v": GGML_KV_TYPES[kv_type], "flash_attn": kv_type == "q8_0"}
        kv.update(llamacpp_yarn(config) or {})
        threads = thread_budget(threads) or os.cpu_count() or 1
        extra_bufts, self.configuration = load_plan(build_features())
        if extra_buffers is not None and extra_buffers != extra_bufts:
            extra_bufts, self.configuration = extra_buffers, f"llama.cpp with extra buffer types {'on' if extra_buffers else 'off'} (as asked)"
        log(f"[dim]{self.configuration}[/dim]" if extra_bufts else f"[yellow]{self.configuration}[/yellow]")
        try:
            with _model_params(use_extra_bufts=extra_bufts):
                self.llm = Llama(model_path=str(path), n_ctx=self.max_seq_len,
                                 n_batch=min(self.max_seq_len, 512), n_threads=threads, n_threads_batch=threads,
                                 verbose=False, **kv)
        except ValueError as exc:  # llama-cpp-python's wording for "llama.cpp refused the file"
            raise KananaQuantError(f"{path}: llama.cpp could not load it ({exc})") from None
        self.n_vocab = self.llm.n_vocab()

    @property
    def pos(self) -> int:
        return self.llm.n_tokens

    @pos.setter
    def pos(self, value: int) -> None:
        # llama-cpp-python drops KV entries past n_tokens at the next eval: this is the rewind.
        self.llm.n_tokens = value

    def reset(self) -> None:
        self.llm.reset()

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        ids = [int(i) for i in ids]
        start = self.pos
        if start + len(ids) > self.max_seq_len:
            raise KananaQuantError(f"context of {start + len(ids)} tokens exceeds the model's {self.max_seq_len}; "
                                   "shorten the prompt or --max-tokens")
        # Llama.eval keeps every position's logits only in a [context, vocabulary] array fixed at load
        # (logits_all: 2 GiB for 4K tokens of a 128K vocabulary); asking llama.cpp for the rows of this call
        # alone costs nothing when they are not wanted, and perplexity and draft verification want them.
        llm, rows = self.llm, []
        llm._ctx.kv_cache_seq_rm(-1, start, -1)  # forget what lies past pos: the rewind
        for i in range(0, len(ids), llm.n_batch):
            chunk = ids[i:i + llm.n_batch]
            llm._batch.set_batch(batch=chunk, n_past=llm.n_tokens, logits_all=all_logits)
            llm._ctx.decode(llm._batch)
            llm.input_ids[llm.n_tokens:llm.n_tokens + len(chunk)] = chunk
            llm.n_tokens += len(chunk)
            n = len(chunk) if all_logits else 1
            rows.append(np.array(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n, self.n_vocab)),
                                 dtype=np.float32))
        return np.concatenate(rows) if all_logits else rows[-1][0]


class LlamaCppEncoder:
    """An embedding GGUF in llama.cpp's embedding mode (embed.Encoder). The file says bidirectional attention
    and mean pooling (gguf/writer.py), but llama.cpp's mean covers every token, a query's instruction prefix
    included; so the context runs with pooling none, which returns each token's final-norm hidden state, and
    the pool mask's mean is taken here."""

    name = "llama.cpp"

    def __init__(self, path: Path, config, threads: int | None = None):
        import llama_cpp
        from llama_cpp import Llama

        self.config = config
        length = config.embedding.max_length
        threads = thread_budget(threads) or os.cpu_count() or 1
        extra_bufts, self.configuration = load_plan(build_features())
        try:
            with _model_params(use_extra_bufts=extra_bufts):
                # a non-causal batch must fit in one micro-batch: n_ubatch = the longest input
                self.llm = Llama(model_path=str(path), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE,
                                 n_ctx=length, n_batch=length, n_ubatch=length, n_threads=threads,
                                 n_threads_batch=threads, verbose=False, type_k=GGML_KV_TYPES["f32"],
                                 type_v=GGML_KV_TYPES["f32"])  # f32 K/V: llama.cpp's f16 default moves them
        except ValueError as exc:
            raise KananaQuantError(f"{path}: llama.cpp could not load it ({exc})") from None
        self._native = llama_cpp

    def token_states(self, ids: Sequence[int]) -> np.ndarray:
        """[T, hidden]: every token's final-norm hidden state, the whole sequence in one bidirectional batch."""
        llm = self.llm
        llm._batch.reset()
        llm._batch.add_sequence([int(i) for i in ids], 0, True)
        llm._ctx.kv_cache_clear()
        llm._ctx.decode(llm._batch)
        n, width = len(ids), self.config.hidden_size
        states = np.ctypeslib.as_array(self._native.llama_get_embeddings(llm._ctx.ctx), shape=(n * width,))
        return np.array(states, np.float32).reshape(n, width)

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray, pool_mask: np.ndarray) -> np.ndarray:
        out = np.empty((len(input_ids), self.config.hidden_size), np.float32)
        for b, (ids, mask, pool) in enumerate(zip(input_ids, attention_mask, pool_mask)):
            n = int(mask.sum())
            weights = np.asarray(pool[:n], np.float32)
            out[b] = weights @ self.token_states(ids[:n]) / weights.sum()
        return out
