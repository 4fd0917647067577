"""The `kanana-quant` command line: it only wires the library's steps together."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from kanana_quant.errors import EngineCrashed, KananaQuantError
from kanana_quant.progress import console, log, progress_bar

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize Kanana LLMs and run them offline on a CPU.")

EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130  # 0 success, 1 a bug (traceback): see README "Exit codes"

EngineOption = typer.Option("auto", help="auto, numpy, llama.cpp (a .gguf) or onnxruntime (an ONNX export); "
                                         "auto = onnxruntime for ONNX exports, else numpy.")
ModelArg = typer.Argument(..., help="Model directory, quantized checkpoint, .gguf file or Hugging Face id.")
LookupOption = typer.Option(True, "--lookup/--no-lookup", help="Prompt-lookup decoding: draft tokens by copying "
                                                               "from the prompt and the reply, verify them in one "
                                                               "forward (same output distribution; greedy: same text).")
KvTypeOption = typer.Option("auto", "--kv-type", help="KV-cache storage: auto (the engine's: f32 in numpy and "
                                                     "onnxruntime, f16 in llama.cpp), f32, f16 (numpy, "
                                                     "llama.cpp) or q8_0 (llama.cpp).")
CtxOption = typer.Option(None, "--ctx", help="Context length in tokens (default: the model's, cut to what fits in RAM).")
DraftOption = typer.Option(None, "--draft", help="A smaller model with the same tokenizer that drafts tokens for "
                                                  "MODEL (speculative decoding; run with the same --engine).")


def _load(model: str, max_seq_len: int | None = None, engine: str = "auto", kv_type: str = "auto"):
    from kanana_quant.hub import resolve_model
    from kanana_quant.loader import open_model
    from kanana_quant.runtimes.engines import open_engine, resolve_engine

    resolve_engine(engine, resolve_model(model))  # a wrong --engine fails before any loading
    loaded = open_model(model)
    with progress_bar(f"loading {loaded.path.name}", loaded.config.num_layers) as advance:
        runtime = open_engine(loaded, engine, max_seq_len=max_seq_len, on_layer=advance, kv_type=kv_type)
    return loaded, runtime


def _drafter(draft: Optional[str], lookup: bool, engine: str, loaded, params):
    """The drafter --draft / --lookup ask for, or None."""
    from kanana_quant.runtimes.sampling import Sampler
    from kanana_quant.runtimes.speculative import DraftModel, PromptLookup

    if draft is None:
        return PromptLookup() if lookup else None
    draft_loaded, draft_engine = _load(draft, max_seq_len=loaded.config.max_position_embeddings, engine=engine)
    probe = "Kanana 카나나는 한국어와 English를 함께 배웠다. 12345 🎉"
    if draft_loaded.tokenizer.encode(probe) != loaded.tokenizer.encode(probe):
        raise KananaQuantError(f"--draft {draft}: its tokenizer differs from the model's; a draft model must share "
                               "the vocabulary")
    return DraftModel(draft_engine, Sampler(params))


def _sampling(temperature: float, top_k: int, top_p: float, repetition_penalty: float, seed: Optional[int]):
    from kanana_quant.runtimes.sampling import SamplingParams

    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                          repetition_penalty=repetition_penalty, seed=seed)


@app.command()
def info(model: str = ModelArg, as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Shapes, parameter count, bytes, RoPE and MoE layout of a model."""
    from kanana_quant.hub import resolve_model
    from kanana_quant.loader import open_checkpoint

    path = resolve_model(model)
    ckpt = open_checkpoint(path)
    cfg = ckpt.config
    rope = cfg.rope_scaling
    facts = {
        "path": str(path), "architecture": cfg.architecture, "parameters": cfg.num_parameters(),
        "bytes": ckpt.nbytes(), "dtype": cfg.torch_dtype, "layers": cfg.num_layers, "hidden": cfg.hidden_size,
        "intermediate": cfg.intermediate_size, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "vocab": cfg.vocab_size, "context": cfg.max_position_embeddings,
        "tied_embeddings": cfg.tie_word_embeddings, "rope_theta": cfg.rope_theta,
        "rope_scaling": None if rope is None else {"type": rope.rope_type, "factor": rope.factor,
                                                   "original_context": rope.original_max_position_embeddings},
        "moe": None if cfg.moe is None else {"experts": cfg.moe.num_experts, "top_k": cfg.moe.top_k,
                                             "expert_intermediate": cfg.moe.expert_intermediate_size,
                                             "norm_topk_prob": cfg.moe.norm_topk_prob,
                                             "naming": cfg.moe.naming},
        "embedding": None if cfg.embedding is None else {
            "pooling": cfg.embedding.pooling, "attention": "bidirectional", "dimensions": list(cfg.embedding.dimensions),
            "max_length": cfg.embedding.max_length, "instruction_pooled": cfg.embedding.pool_instruction},
        "quantization": ckpt.format.to_hf() if ckpt.format is not None else None,
    }
    if as_json:
        print(json.dumps(facts, indent=2))
        return
    for key, value in facts.items():
        if key == "parameters":
            value = f"{value:,} ({value / 1e9:.2f} B)"
        elif key == "bytes":
            value = f"{value:,} ({value / 1e9:.2f} GB)"
        print(f"{key:16} {value}")


@app.command()
def synth(
    out: Path = typer.Option(..., "-o", "--out", help="Output model directory."),
    preset: Optional[str] = typer.Option(None, help="Full-size Kanana preset, e.g. kanana-1.5-2.1b."),
    tiny: Optional[str] = typer.Option(None, help="Tiny test model: dense, moe (Mixtral), qwen-moe or embedding (Kanana2Vec)."),
    seed: int = typer.Option(0, help="Random seed for the weights."),
    dtype: str = typer.Option("", help="F32, F16 or BF16 (default: F32 for tiny, BF16 for presets)."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
):
    """Write a Kanana-shaped HF model with random weights and a small trained tokenizer."""
    from kanana_quant import kanana
    from kanana_quant.synth import TINY, preset_config, synth_model

    if (preset is None) == (tiny is None):
        raise KananaQuantError(f"give exactly one of --preset ({', '.join(kanana.PRESETS)}) "
                               f"or --tiny ({', '.join(TINY)})")
    config = preset_config(preset if preset else f"tiny-{tiny}")
    dtype = dtype.upper() or ("BF16" if preset else "F32")
    from kanana_quant.config import ModelConfig
    from kanana_quant.names import canonical_names

    total = len(canonical_names(ModelConfig.from_hf(config, "preset")))
    with progress_bar(f"writing {out.name}", total) as advance:
        synth_model(out, config, seed=seed, dtype=dtype, overwrite=overwrite, on_tensor=advance)
    log(f"wrote {out}")


@app.command()
def generate(
    model: str = ModelArg,
    prompt: str = typer.Option(..., help="Prompt text."),
    max_tokens: int = typer.Option(64, help="Maximum new tokens."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_k: int = typer.Option(0, help="Keep the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1 = off)."),
    repetition_penalty: float = typer.Option(1.0, help="HF-style repetition penalty (1 = off)."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed."),
    chat_template: bool = typer.Option(False, "--chat", help="Wrap the prompt as a user turn in the chat template."),
    engine: str = EngineOption,
    lookup: bool = LookupOption,
    draft: Optional[str] = DraftOption,
    ctx: Optional[int] = CtxOption,
    kv_type: str = KvTypeOption,
):
    """Print the continuation of PROMPT (only the new text on stdout; logs on stderr)."""
    from kanana_quant.runtimes.generate import Decoding

    if max_tokens < 1:
        raise KananaQuantError(f"--max-tokens must be at least 1, got {max_tokens}")
    params = _sampling(temperature, top_k, top_p, repetition_penalty, seed)
    loaded, runtime = _load(model, max_seq_len=ctx, engine=engine, kv_type=kv_type)
    drafter = _drafter(draft, lookup, engine, loaded, params)
    tok = loaded.tokenizer
    ids = (tok.encode_chat([{"role": "user", "content": prompt}]) if chat_template
           else tok.encode(prompt, add_special_tokens=True))
    stream, count, start = tok.stream(), 0, time.perf_counter()
    decoding = Decoding(runtime, ids, max_tokens, params, tok.eos_ids, drafter=drafter)
    for step in decoding:
        count += 1
        sys.stdout.write(stream.push(step.token))
        sys.stdout.flush()
    sys.stdout.write(stream.flush() + "\n")
    elapsed = time.perf_counter() - start
    drafts = (f", {decoding.adaptive.accepted} of {decoding.adaptive.proposed} drafted tokens accepted"
              if decoding.adaptive.proposed else "")
    log(f"[dim]{count} tokens in {elapsed:.2f} s ({count / elapsed:.1f} tokens/s, prompt {len(ids)} tokens"
        f"{drafts})[/dim]")


@app.command(name="eval")
def evaluate(
    model: str = ModelArg,
    text: Path = typer.Option(..., help="UTF-8 text file to score."),
    ctx: int = typer.Option(512, help="Window length in tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    engine: str = EngineOption,
    kv_type: str = KvTypeOption,
    ref: Optional[str] = typer.Option(None, help="Float model to compare with: adds its perplexity and the KL "
                                                 "divergence from it."),
):
    """Perplexity over consecutive non-overlapping windows of CTX tokens (no BOS, each window alone)."""
    from kanana_quant.eval import perplexity

    if not text.is_file():
        raise KananaQuantError(f"{text}: no such text file")
    try:
        body = text.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KananaQuantError(f"{text}: not UTF-8 text") from None
    loaded, runtime = _load(model, max_seq_len=ctx, engine=engine, kv_type=kv_type)
    ids = loaded.tokenizer.encode(body, add_special_tokens=False)
    ref_runtime = None
    if ref is not None:
        ref_loaded, ref_runtime = _load(ref, max_seq_len=ctx)
        if ref_loaded.tokenizer.encode(body[:2000]) != loaded.tokenizer.encode(body[:2000]):
            raise KananaQuantError(f"--ref {ref}: its tokenizer differs from {model}'s; KL needs the same vocabulary")
    with progress_bar("scoring windows", max(len(ids) // max(ctx, 1), 1)) as advance:
        result = perplexity(runtime, ids, ctx, on_window=advance, ref=ref_runtime)
    result = {"model": str(loaded.path), "text": str(text), "engine": runtime.name, **result}
    if as_json:
        print(json.dumps(result, indent=2))
        return
    print(f"windows: {result['windows']} x {ctx} tokens, scored tokens: {result['tokens']}")
    if ref is not None:
        print(f"reference perplexity: {result['ref_perplexity']:.4f}")
        print(f"KL divergence from reference: {result['kl_divergence']:.6f} nats/token")
    print(f"perplexity: {result['perplexity']:.4f}")


@app.command(name="embed")
def embed_command(
    model: str = ModelArg,
    text: Optional[list[str]] = typer.Option(None, "--text", help="A text to embed (repeat for more)."),
    file: Optional[Path] = typer.Option(None, "--file", help="UTF-8 file with one text per line (blank lines skipped)."),
    instruction: Optional[str] = typer.Option(None, help="Embed the texts as queries with this instruction "
                                                         "(documents take none)."),
    dim: Optional[int] = typer.Option(None, help="Output size: a Matryoshka size the model declares (default: all)."),
    normalize: bool = typer.Option(False, help="Scale each embedding to unit length."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Write OUT.npy (float32 [n, dim]) or OUT.jsonl "
                                                                 "(text + embedding per line) instead of printing."),
    engine: str = EngineOption,
    batch_size: int = typer.Option(16, help="Texts per forward."),
):
    """Embeddings of texts with an embedding model, one row per text (JSON lines on stdout, or -o)."""
    from kanana_quant.embed import read_texts, write_embeddings

    texts = read_texts(text, file)
    if out is not None and out.suffix not in (".npy", ".jsonl"):
        raise KananaQuantError(f"-o {out}: write a .npy or .jsonl file")
    loaded, encoder = _load_encoder(model, engine)
    vectors = _embed(loaded, encoder, texts, instruction=instruction, dim=dim, normalize=normalize,
                     batch_size=batch_size)
    if out is None:
        for i, row in enumerate(vectors):
            print(json.dumps({"index": i, "embedding": [float(v) for v in row]}))
        return
    write_embeddings(out, texts, vectors)
    log(f"wrote {out} ({len(texts)} x {vectors.shape[1]})")


@app.command(name="eval-embed")
def eval_embed(
    model: str = ModelArg,
    ref: Optional[str] = typer.Option(None, help="Float model to compare with: cosine similarity of every "
                                                 "embedding to its own, and its retrieval scores."),
    pairs: Optional[Path] = typer.Option(None, help="A .jsonl of {query, passage[, lang]} (default: the built-in "
                                                    "203 Korean and English pairs)."),
    instruction: Optional[str] = typer.Option(None, help="The queries' instruction (default: the built-in set's)."),
    engine: str = EngineOption,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Retrieval accuracy (recall@1, MRR) on a bilingual query/passage set, and cosine similarity to --ref."""
    from kanana_quant import retrieval

    rows = retrieval.load_pairs(pairs)
    loaded, encoder = _load_encoder(model, engine)
    reference = _load_encoder(ref) if ref is not None else None
    result = retrieval.evaluate(loaded, encoder, rows, reference, instruction or retrieval.INSTRUCTION)
    result = {"model": str(loaded.path), "ref": None if ref is None else str(reference[0].path), **result}
    if as_json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return
    print(f"pairs: {result['pairs']}")
    for name, scores in (("model", result["retrieval"]), ("reference", result.get("ref_retrieval"))):
        for lang, s in (scores or {}).items():
            print(f"{name} {lang}: recall@1 {s['recall@1']:.4f}, MRR {s['mrr']:.4f} ({s['queries']} queries)")
    if ref is not None:
        c = result["cosine_to_ref"]
        print(f"cosine to reference: mean {c['mean']:.6f}, min {c['min']:.6f} over {c['texts']} texts")


def _load_encoder(model: str, engine: str = "auto"):
    from kanana_quant.embed import embedding_config
    from kanana_quant.hub import resolve_model
    from kanana_quant.loader import open_model
    from kanana_quant.runtimes.engines import open_encoder, resolve_engine

    resolve_engine(engine, resolve_model(model))
    loaded = open_model(model)
    embedding_config(loaded.config, str(loaded.path))
    return loaded, open_encoder(loaded, engine)


def _embed(loaded, encoder, texts, **kw):
    from kanana_quant.embed import embed

    start = time.perf_counter()
    vectors = embed(encoder, loaded.tokenizer, loaded.config, texts, source=str(loaded.path), **kw)
    log(f"[dim]{len(texts)} texts in {time.perf_counter() - start:.2f} s[/dim]")
    return vectors


@app.command()
def quantize(
    model: str = ModelArg,
    out: Path = typer.Option(..., "-o", "--out", help="Output directory for the quantized checkpoint."),
    method: str = typer.Option("gptq", help="gptq, awq (the published algorithm), awq-gptq (AWQ scales, then "
                                            "GPTQ rounding) or rtn."),
    bits: int = typer.Option(4, help="Bits per weight: 2, 3, 4 or 8."),
    group_size: int = typer.Option(128, help="Columns per scale: 32, 64, 128 or -1 (per-channel)."),
    sym: bool = typer.Option(True, "--sym/--asym", help="Symmetric grid (zero fixed) or asymmetric."),
    calib: str = typer.Option("builtin", help="Calibration text: builtin, a .txt/.jsonl file or folder, or a "
                                              "Hugging Face dataset id."),
    samples: int = typer.Option(128, help="Calibration sequences."),
    seq_len: int = typer.Option(512, help="Tokens per calibration sequence."),
    seed: int = typer.Option(0, help="Seed for drawing calibration windows."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    resume: bool = typer.Option(False, help="Continue an interrupted run at the next layer."),
    damp: float = typer.Option(0.01, help="GPTQ damping, as a fraction of the mean Hessian diagonal."),
    act_order: bool = typer.Option(True, "--act-order/--no-act-order", help="GPTQ column order by Hessian diagonal."),
    shrink: float = typer.Option(None, help="GPTQ: shrink the Hessian toward its diagonal by this fraction (0 = "
                                            "plain GPTQ, 1 = importance-weighted RTN). Default: 0 for HF "
                                            "checkpoints; with --format gguf the value measured best there "
                                            "(logged)."),
    lm_head_bits: int = typer.Option(0, help="Quantize lm_head too, at these bits (2, 3, 4 or 8; 0 = keep it "
                                             "float). A tied embedding stays float."),
    out_format: str = typer.Option("hf", "--format", help="hf (GPTQ/AWQ-layout checkpoint) or gguf (GPTQ on the "
                                                          "GGUF types of --type, written as OUT.gguf)."),
    gguf_type: str = typer.Option("Q4_K_M", "--type", help="With --format gguf: Q8_0, Q6_K, Q5_K_M, Q5_1, Q5_0, "
                                                           "Q4_K_M, Q4_1, Q4_0, IQ4_XS, IQ4_NL, Q3_K_L, Q3_K_M, "
                                                           "Q3_K_S or Q2_K."),
    target_bpw: float = typer.Option(None, "--target-bpw", help="With --format gguf: pick each layer linear's "
                                     "type (Q2_K … Q8_0) so they average this many bits per weight, bits going "
                                     "where the Hessian-weighted error per byte is highest."),
):
    """Quantize MODEL one decoder layer at a time into a GPTQ/AWQ-layout checkpoint (or a GGUF file)."""
    if out_format not in ("hf", "gguf"):
        raise KananaQuantError(f"--format {out_format!r} is not supported; choose hf or gguf")
    try:
        import torch
    except ImportError:
        raise KananaQuantError("quantize needs torch: pip install torch==2.13.0 (CPU build), then retry") from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise KananaQuantError(f"--device {device!r} is not available here; use cpu or auto")
    from kanana_quant.loader import open_model
    from kanana_quant.qcheckpoint import QuantFormat
    from kanana_quant.quant.driver import quantize_model
    from kanana_quant.quant.gguf_sink import GGUFSink
    from kanana_quant.quant.options import QuantOptions

    fmt = QuantFormat(method, bits, group_size, sym, lm_head=bool(lm_head_bits), lm_head_bits=lm_head_bits or None)
    opts = QuantOptions(fmt, calib, samples, seq_len, seed, damp=damp, act_order=act_order, device=device,
                        shrink=shrink)
    if target_bpw is not None and out_format != "gguf":
        raise KananaQuantError("--target-bpw applies to --format gguf")
    if out_format == "gguf":
        GGUFSink.check(opts, gguf_type, out)  # before loading anything
    loaded = open_model(model)
    sink = GGUFSink(loaded, out, opts, gguf_type, target_bpw=target_bpw) if out_format == "gguf" else None
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    # Shown once the run starts: the checks before it fail with one line, not under a bar.
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn(), console=console)
    task = bar.add_task(f"{method} {bits}-bit layers", total=loaded.config.num_layers, visible=False)

    def on_start(first: int) -> None:
        bar.update(task, completed=first, visible=True)
        bar.start()

    def on_stage(stage: str) -> None:
        bar.update(task, description=f"{method} {bits}-bit layer {int(bar.tasks[0].completed)}: {stage}")

    def on_layer(report) -> None:
        bar.advance(task)
        line = f"layer {report.layer}: {report.seconds:.1f} s"
        if report.loss:
            line += f", GPTQ loss {report.loss:.4g}"
        if report.rounding is not None:
            line += f", kept GPTQ on {report.rounding['gptq']} tensors, RTN on {report.rounding['rtn']}"
        if report.expert_tokens is not None:
            counts = report.expert_tokens
            line += f", routed tokens per expert min {min(counts)} / max {max(counts)}"
        if report.layer == loaded.config.num_layers - 1:
            bar.update(task, description="writing the output")
        bar.console.print(line, highlight=False)

    try:
        quantize_model(loaded, out, opts, resume, sink=sink, on_start=on_start, on_layer=on_layer,
                       on_stage=on_stage)
    finally:
        bar.stop()
    log(f"wrote {out}")


export_app = typer.Typer(no_args_is_help=True, help="Export a float or quantized model for another runtime.")
app.add_typer(export_app, name="export")


@export_app.command("gguf")
def export_gguf(
    src: str = typer.Argument(..., help="Float model, our quantized checkpoint, or a GGUF file."),
    out: Path = typer.Option(..., "-o", "--out", help="Output .gguf file."),
    file_type: str = typer.Option("Q4_K_M", "--type", help="F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q5_1, Q5_0, "
                                                           "Q4_K_M, Q4_1, Q4_0, IQ4_XS, IQ4_NL, Q3_K_L, Q3_K_M, "
                                                           "Q3_K_S or Q2_K."),
):
    """Write a llama.cpp GGUF; GPTQ/RTN/AWQ codes are carried over exactly where the GGUF type can hold them."""
    from kanana_quant.gguf.mix import file_type_info
    from kanana_quant.gguf.writer import export_gguf as export, tensor_count
    from kanana_quant.loader import open_model

    file_type_info(file_type)  # validates the type name before loading anything
    loaded = open_model(src)
    from kanana_quant.resources import check_gguf_export
    check_gguf_export(loaded, out, file_type)  # disk space before writing
    with progress_bar(f"writing {out.name}", tensor_count(loaded.config, file_type)) as advance:
        export(loaded, out, file_type, on_tensor=advance)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


@export_app.command("onnx")
def export_onnx(
    src: str = typer.Argument(..., help="Float model or our quantized checkpoint (RTN/GPTQ/AWQ)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory (model.onnx, weights, tokenizer, sidecar)."),
    accuracy_level: int = typer.Option(4, help="MatMulNBits/QMoE accuracy level: 4 = int8 activations (fastest "
                                               "on CPU), 0 = fp32 activations (matches the numpy runtime)."),
    lm_head: str = typer.Option("auto", help="auto (the checkpoint's codes, else 8-bit for quantized sources and "
                                             "float for float ones), float, q8 (blocks of up to 256) or q4 "
                                             "(blocks of 32)."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
):
    """Write an onnxruntime decoder (KV cache, GroupQueryAttention, MatMulNBits/QMoE carrying quantized codes
    exactly) and run it with `generate/chat/eval OUT` (engine onnxruntime)."""
    try:
        from kanana_quant.exporters.onnx import check_options, export_onnx as export, export_steps
    except ImportError as exc:
        raise KananaQuantError(f"export onnx needs the onnx package ({exc}); install it with "
                               "`pip install 'kanana-quant[onnx]'`") from None
    from kanana_quant.loader import open_model

    check_options(accuracy_level, lm_head)  # before loading anything
    loaded = open_model(src)
    with progress_bar(f"writing {out.name}", export_steps(loaded.config)) as advance:
        report = export(loaded, out, accuracy_level=accuracy_level, lm_head=lm_head, on_step=advance,
                        overwrite=overwrite)
    ops = ", ".join(f"{n} {k}" for k, n in sorted(report.linears.items()))
    log(f"wrote {out} ({report.nbytes / 1e6:.1f} MB; {ops}; lm_head {report.lm_head})")


@app.command()
def chat(
    model: str = ModelArg,
    system: Optional[str] = typer.Option(None, help="System prompt."),
    max_tokens: int = typer.Option(512, help="Maximum tokens per reply."),
    temperature: float = typer.Option(0.7),
    top_k: int = typer.Option(0),
    top_p: float = typer.Option(0.9),
    repetition_penalty: float = typer.Option(1.0),
    seed: Optional[int] = typer.Option(None),
    engine: str = EngineOption,
    lookup: bool = LookupOption,
    draft: Optional[str] = DraftOption,
    ctx: Optional[int] = CtxOption,
    kv_type: str = KvTypeOption,
):
    """Interactive chat with streaming replies. /reset clears the history, /exit or Ctrl-D quits;
    Ctrl-C stops a reply without ending the session."""
    from kanana_quant.runtimes.generate import ChatSession

    params = _sampling(temperature, top_k, top_p, repetition_penalty, seed)
    loaded, runtime = _load(model, max_seq_len=ctx, engine=engine, kv_type=kv_type)
    session = ChatSession(runtime, loaded.tokenizer, params, max_tokens, system,
                          drafter=_drafter(draft, lookup, engine, loaded, params))
    log(f"[bold]chatting with {loaded.path.name}[/bold] — /reset clears history, /exit quits, Ctrl-C stops a reply")
    while True:
        try:
            user = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if user.strip() in ("/exit", "/quit"):
            return
        if user.strip() == "/reset":
            session.reset()
            log("[dim]history cleared[/dim]")
            continue
        if not user.strip():
            continue
        reply = session.reply(user)
        try:
            for piece in reply:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            reply.close()
            log("\n[dim](reply stopped)[/dim]")
        print()


@app.command()
def serve(
    model: str = ModelArg,
    engine: str = EngineOption,
    kv_type: str = KvTypeOption,
    host: str = typer.Option("127.0.0.1", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, help="TCP port."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="KANANA_QUANT_API_KEY",
        help="Require `Authorization: Bearer KEY` on /v1 (or set KANANA_QUANT_API_KEY)."),
    parallel: int = typer.Option(1, help="Sequences decoded at once: engine instances, each with its own KV cache."),
    ctx: Optional[int] = typer.Option(None, help="Context length in tokens (default: the model's)."),
    queue: int = typer.Option(16, help="Requests that may wait for a free slot; more get 503 with Retry-After."),
    name: Optional[str] = typer.Option(None, help="Model id for clients (default: the model's file or folder name)."),
):
    """OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models) with a chat page at /."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "llguidance", "jsonschema") if importlib.util.find_spec(m) is None]
    if missing:
        raise KananaQuantError(f"serve needs {', '.join(missing)}; install with `pip install 'kanana-quant[serve]'`")
    from kanana_quant.serve import Settings, open_service, run

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log(f"[yellow]listening on {host} without --api-key: anyone who can reach it can use the model[/yellow]")
    service = open_service(model, Settings(engine=engine, parallel=parallel, ctx=ctx, max_queue=queue, name=name,
                                           api_key=api_key, kv_type=kv_type))
    slots = f"{parallel} slot{'s' if parallel > 1 else ''}"
    log(f"[bold]serving {service.name}[/bold] ({service.engine_name}, {slots}, context {service.context}) on "
        f"http://{host}:{port}/ — OpenAI API at http://{host}:{port}/v1")
    run(service, host, port)


@app.command()
def demo(
    model: str = typer.Option("smollm2", help="smollm2 (default, from PyPI), tiny (synthetic), or a model path/id."),
    out: Path = typer.Option(Path("kanana-quant-demo"), "-o", "--out", help="Folder for the demo's outputs."),
    method: str = typer.Option("gptq", help="gptq, awq or rtn."),
    bits: int = typer.Option(4, help="Bits per weight."),
    max_tokens: int = typer.Option(32, help="Tokens to generate per prompt."),
    samples: int = typer.Option(32, help="Calibration sequences."),
    seq_len: int = typer.Option(256, help="Tokens per calibration sequence and per perplexity window."),
):
    """The main job on a small real model: quantize, then run float and quantized side by side."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise KananaQuantError("demo quantizes, which needs torch: pip install torch==2.13.0 (CPU build)") from None
    from kanana_quant.demo import run_demo

    crashed = run_demo(model, out, method, bits, max_tokens, samples, seq_len)
    if crashed:
        log(f"[red]demo: {', '.join(crashed)} crashed (see the note above); the main path did not complete[/red]")
        raise typer.Exit(1)


def main() -> None:
    import signal

    from rich.markup import escape

    from kanana_quant.errors import os_error_exit

    def fail(message: str, code: int) -> None:  # messages quote file contents: escaped, "[/x]" is no markup
        console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(code)

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill`/`timeout`: clean up as Ctrl-C does
    try:
        code = app(standalone_mode=False)  # returns the exit code of --help, Ctrl-C (130), ...
        sys.exit(code if isinstance(code, int) and not isinstance(code, bool) else 0)
    except EngineCrashed as e:  # the engine failed, not the input
        fail(str(e), 1)
    except KananaQuantError as e:
        fail(str(e), EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except OSError as e:  # disk full, unwritable output: one line, exit 2 for a bad path, 1 otherwise
        fail(*os_error_exit(e))
    except MemoryError:
        fail("out of memory; lower --samples/--seq-len or --max-tokens, or use a machine with more RAM", 1)
    except typer.Abort:  # EOF at a prompt
        console.print("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:
        # click's usage errors (typer vendors click, so matched by shape): a bad flag, a missing argument
        if not (hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int)):
            raise  # a bug: traceback, exit 1
        if type(e).__name__ == "NoArgsIsHelpError":
            e.show()
            sys.exit(e.exit_code)
        ctx = getattr(e, "ctx", None)
        fail(" ".join(e.format_message().split()) + (f" (see {ctx.command_path} --help)" if ctx else ""), e.exit_code)


if __name__ == "__main__":
    main()
