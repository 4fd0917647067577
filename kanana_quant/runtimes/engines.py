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


def open_engine(loaded, engine: str = "auto", max_seq_len: int | None = None, threads: int | None = None,
                on_layer: Callable[[int], None] | None = None, isolated: bool = True):
    """The engine for an opened model. llama.cpp and onnxruntime run in a child process unless
    `isolated` is False, so a native crash there is an EngineCrashed error here (POSIX only: elsewhere they
    run in this process)."""
    engine = resolve_engine(engine, loaded.path)
    if engine == "numpy":
        from kanana_quant.runtimes.numpy_engine import NumpyEngine

        return NumpyEngine(loaded.weights, max_seq_len=max_seq_len, on_layer=on_layer)
    why = missing_package(engine)
    if why:
        raise KananaQuantError(why)
    if isolated and os.name == "posix":
        from kanana_quant.runtimes.isolated import IsolatedEngine

        return IsolatedEngine(engine, loaded.path, max_seq_len=max_seq_len, threads=threads)
    if engine == "llama.cpp":
        from kanana_quant.runtimes.llamacpp_engine import LlamaCppEngine

        return LlamaCppEngine(loaded.path, loaded.config, max_seq_len=max_seq_len, threads=threads)
    from kanana_quant.runtimes.onnx_engine import OnnxEngine

    return OnnxEngine(loaded.path, max_seq_len=max_seq_len, threads=threads)
