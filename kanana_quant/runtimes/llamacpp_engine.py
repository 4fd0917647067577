"""A GGUF file run by real llama.cpp (llama-cpp-python), behind the same Engine interface as the numpy
runtime, so our sampler, chat loop and perplexity drive it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from kanana_quant.errors import KananaQuantError
from kanana_quant.rope import llamacpp_yarn
from kanana_quant.runtimes.generate import thread_budget

GGML_TYPE_F32 = 0  # KV-cache type: keeps llama.cpp's attention in float32 like our runtimes


class LlamaCppEngine:
    name = "llama.cpp"

    def __init__(self, path: Path, config, max_seq_len: int | None = None, threads: int | None = None,
                 all_logits: bool = False, f32_kv_cache: bool = False):
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise KananaQuantError(f"--engine llama.cpp needs llama-cpp-python ({exc}); install it with "
                                   "`pip install 'kanana-quant[llamacpp]'`") from None
        self.config = config
        self.max_seq_len = min(max_seq_len or config.max_position_embeddings, config.max_position_embeddings)
        kv = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_kv_cache else {}
        kv.update(llamacpp_yarn(config) or {})
        threads = thread_budget(threads) or os.cpu_count() or 1
        try:
            self.llm = Llama(model_path=str(path), n_ctx=self.max_seq_len, n_batch=min(self.max_seq_len, 512),
                             n_threads=threads, n_threads_batch=threads, logits_all=all_logits,
                             verbose=False, **kv)
        except ValueError as exc:  # llama-cpp-python's wording for "llama.cpp refused the file"
            raise KananaQuantError(f"{path}: llama.cpp could not load it ({exc})") from None
        self.all_logits = all_logits
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
        if all_logits and not self.all_logits:
            raise RuntimeError("this llama.cpp engine was opened without all_logits")  # a caller bug
        self.llm.eval(ids)
        if all_logits:
            return np.array(self.llm.scores[start:start + len(ids)], dtype=np.float32)
        if self.all_logits:
            return np.array(self.llm.scores[start + len(ids) - 1], dtype=np.float32)
        last = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))
        return np.array(last, dtype=np.float32)
