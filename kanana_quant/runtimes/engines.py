"""Pick and open the engine that runs a model: numpy (any format), llama.cpp (a .gguf) or onnxruntime
(an ONNX export directory). Every engine follows runtimes.generate.Engine, so generate, chat and eval are
written once."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable

from kanana_quant.errors import KananaQuantError

ENGINES = ("auto", "numpy", "llama.cpp", "onnxruntime")
# KV-cache storage by engine (the first is the engine's default) and bytes per cached value. llama.cpp
# quantizes V only with flash attention on. onnxruntime's GroupQueryAttention can store float16 (OnnxEngine's
# kv_type) but is not offered it: on the CPU it converts the whole cache to float32 on every step, so the peak
# memory is not lower and decoding is slower (bench/long_context.py, Kanana-1.5-8B shape at 16K tokens: f32
# 0.89 tokens/s and 10.3 GiB resident; f16 0.43 tokens/s and 13.0 GiB; f16 without onnxruntime's memory arena
# 0.09 tokens/s, peak 12.4 GiB).
KV_TYPES = {"numpy": ("f32", "f16"), "onnxruntime": ("f32",), "llama.cpp": ("f16", "f32", "q8_0")}
KV_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}
PACKAGES = {"llama.cpp": ("llama_cpp", "llamacpp"), "onnxruntime": ("onnxruntime", "onnx")}  # module, extra


def missing_package(engine: str) -> str | None:
    """Why `engine` cannot run here (its package is not installed), or None."""
    module, extra = PACKAGES.get(engine, (None, None))
    if module is None or importlib.util.find_spec(module) is not None:
        return None
    return f"--engine {engine} needs the {module} package; install it with `pip install 'kanana-quant[{extra}]'`"


def resolve_engine(engine: str, path: Path) -> str:
    """`auto` means the runtime the file was made for: onnxruntime for an ONNX export, numpy otherwise
    (numpy runs GGUF files too, and llama.cpp is an optional extra)."""
    if engine not in ENGINES:
        raise KananaQuantError(f"--engine {engine!r} is not known; choose one of: {', '.join(ENGINES)}")
    from kanana_quant.loader import is_onnx_export

    onnx = is_onnx_export(path)
    if engine == "auto":
        return "onnxruntime" if onnx else "numpy"
    if engine == "llama.cpp" and path.suffix != ".gguf":
        raise KananaQuantError(f"--engine llama.cpp runs .gguf files, not {path}; export one with "
                               "`kanana-quant export gguf`")
    if engine == "onnxruntime" and not onnx:
        raise KananaQuantError(f"--engine onnxruntime runs an ONNX export directory, not {path}; export one "
                               "with `kanana-quant export onnx`")
    if engine == "numpy" and onnx:
        raise KananaQuantError(f"{path} is an ONNX export; run it with --engine onnxruntime")
    return engine


def kv_type_for(engine: str, kv_type: str | None) -> str:
    """The KV type an engine stores: as asked (when it can), or its default."""
    types = KV_TYPES[engine]
    if kv_type in (None, "auto"):
        return types[0]
    if kv_type not in types:
        raise KananaQuantError(f"--kv-type {kv_type} is not available in {engine}; it stores {', '.join(types)}")
    return kv_type


def kv_cache_bytes(cfg, tokens: int, kv_type: str) -> int:
    """Keys and values of `tokens` positions in every layer."""
    return int(2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * tokens * KV_BYTES[kv_type])


def open_engine(loaded, engine: str = "auto", max_seq_len: int | None = None, threads: int | None = None,
                on_layer: Callable[[int], None] | None = None, isolated: bool = True, kv_type: str | None = None):
    """The engine for an opened model. llama.cpp and onnxruntime run in a child process unless
    `isolated` is False, so a native crash there is an EngineCrashed error here (POSIX only: elsewhere they
    run in this process).

    The context is checked against the RAM left before anything is allocated: an explicit `max_seq_len` whose
    KV cache (of `kv_type`, default the engine's) and weights do not fit is refused with one line; without
    one, the model's context is cut to what fits (logged)."""
    from kanana_quant.resources import fit_context

    if loaded.config.embedding is not None:
        raise KananaQuantError(f"{loaded.path}: an embedding model ({loaded.config.architecture}) has no lm_head "
                               "to generate with; run it with `kanana-quant embed`")
    engine = resolve_engine(engine, loaded.path)
    kv_type = kv_type_for(engine, kv_type)
    max_seq_len = fit_context(loaded, max_seq_len, kv_cache_bytes(loaded.config, 1, kv_type), kv_type)
    if engine == "numpy":
        from kanana_quant.runtimes.numpy_engine import NumpyEngine

        return NumpyEngine(loaded.weights, max_seq_len=max_seq_len, on_layer=on_layer, kv_type=kv_type)
    why = missing_package(engine)
    if why:
        raise KananaQuantError(why)
    if isolated and os.name == "posix":
        from kanana_quant.runtimes.isolated import IsolatedEngine

        return IsolatedEngine(engine, loaded.path, max_seq_len=max_seq_len, threads=threads, kv_type=kv_type)
    if engine == "llama.cpp":
        from kanana_quant.runtimes.llamacpp_engine import LlamaCppEngine

        return LlamaCppEngine(loaded.path, loaded.config, max_seq_len=max_seq_len, threads=threads, kv_type=kv_type)
    from kanana_quant.runtimes.onnx_engine import OnnxEngine

    return OnnxEngine(loaded.path, max_seq_len=max_seq_len, threads=threads, kv_type=kv_type)


def open_encoder(loaded, engine: str = "auto", threads: int | None = None, isolated: bool = True):
    """The engine that runs an embedding model (embed.Encoder): numpy (any format), onnxruntime (an ONNX
    export) or llama.cpp (a .gguf in its embedding mode); the native two in a child process unless `isolated`
    is False (POSIX only), as open_engine's."""
    from kanana_quant.embed import embedding_config

    emb = embedding_config(loaded.config, str(loaded.path))
    engine = resolve_engine(engine, loaded.path)
    why = missing_package(engine)
    if why:
        raise KananaQuantError(why)
    if engine == "numpy":
        from kanana_quant.runtimes.numpy_engine import NumpyEngine

        return NumpyEngine(loaded.weights, max_seq_len=emb.max_length)
    if isolated and os.name == "posix":
        from kanana_quant.runtimes.isolated import IsolatedEncoder

        return IsolatedEncoder(engine, loaded.path, threads=threads)
    if engine == "onnxruntime":
        from kanana_quant.runtimes.onnx_engine import OnnxEncoder

        return OnnxEncoder(loaded.path, threads=threads)
    from kanana_quant.runtimes.llamacpp_engine import LlamaCppEncoder

    return LlamaCppEncoder(loaded.path, loaded.config, threads=threads)
