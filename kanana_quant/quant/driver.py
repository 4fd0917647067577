"""quantize_model: a model quantized one decoder layer at a time into a sink (a GPTQ/AWQ checkpoint or a
GGUF file), resumably.

Load layer i from the mmap'd source, push the calibration activations through it, quantize its linears with
the recipe, hand them to the sink, and feed the quantized layer's outputs to layer i+1. Peak memory is one
layer of float32 weights plus the activations, which live in the work folder's disk memmaps. After every
layer the work folder records progress, so `resume` continues at the next layer. cli, demo and bench all
quantize through this one function.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from kanana_quant.atomic import ensure_free_space
from kanana_quant.errors import KananaQuantError
from kanana_quant.layers_torch import TorchLayer
from kanana_quant.loader import LoadedModel
from kanana_quant.quant.options import LayerReport, QuantOptions
from kanana_quant.quant.recipes import Recipe
from kanana_quant.quant.sinks import CheckpointSink, Sink
from kanana_quant.quant.workdir import WorkDir
from kanana_quant.resources import check_quantize


def quantize_model(model: LoadedModel, out: Path, opts: QuantOptions, resume: bool = False,
                   sink: Sink | None = None, on_start: Callable[[int], None] | None = None,
                   on_layer: Callable[[LayerReport], None] | None = None,
                   on_stage: Callable[[str], None] | None = None) -> Path:
    """Quantize `model` into `out` (CheckpointSink unless another sink is given) and return the output path.

    on_start(first layer to run) once set up; on_layer(report) after each layer; on_stage(name) as a layer
    moves through its stages (for progress displays). Every problem a user can cause is a KananaQuantError
    raised before the first layer runs.
    """
    out = Path(out)
    if model.weights.format is not None:
        raise KananaQuantError(f"{model.path}: is already quantized; pass the float model")
    if opts.fmt.lm_head and not model.config.has_lm_head and model.config.embedding:
        raise KananaQuantError(f"{model.path}: an embedding model has no lm_head to quantize; drop --lm-head-bits")
    check_quantize(model, opts.fmt.method, opts.samples, opts.seq_len)  # RAM (and context length) before work
    sink = sink or CheckpointSink(model, out, opts)
    cfg = model.config
    facts = {"source": str(model.path.resolve()), "config": cfg.raw, "output": sink.kind,
             "options": {k: v for k, v in asdict(opts).items() if k != "device"}}
    work = WorkDir(out, facts, (opts.samples, opts.seq_len, cfg.hidden_size))
    first = work.resume_from(resume)
    if first is None:
        acts = 2 * opts.samples * opts.seq_len * cfg.hidden_size * 4 if opts.calibrated else 0
        ensure_free_space(out.parent, sink.estimated_bytes() + acts, f"quantizing into {out.name}")
        work.create()
        if opts.calibrated:
            _embed_calibration(model, opts, work)
        work.started()
        first = 0
    if on_start:
        on_start(first)
    recipe = Recipe(cfg, opts, sink.rounder, on_stage)
    for i in range(first, cfg.num_layers):
        report = _run_layer(model, recipe, sink, work, i)
        if on_layer:
            on_layer(report)
    lm_head = None
    if opts.fmt.lm_head:
        lm_head = recipe.lm_head(model.weights, work.acts(cfg.num_layers, "r") if opts.calibrated else None)
    path = sink.finish(work, lm_head)
    work.remove()
    return path


def _embed_calibration(model: LoadedModel, opts: QuantOptions, work: WorkDir) -> None:
    from kanana_quant.calib import calibration_ids

    ids = calibration_ids(model.tokenizer, opts.calib, opts.samples, opts.seq_len, opts.seed,
                          encoder=model.config.embedding is not None)
    acts = work.acts(0, "w+")
    embed = model.weights.get("embed")
    for i in range(len(ids)):
        acts[i] = embed[ids[i]]
    acts.flush()


@torch.inference_mode()
def _run_layer(model: LoadedModel, recipe: Recipe, sink: Sink, work: WorkDir, i: int) -> LayerReport:
    t0 = time.perf_counter()
    device = recipe.device
    w = {r: torch.from_numpy(a).to(device) for r, a in model.weights.layer(i).items()}
    # Unmap the source once the layer is copied out: mmap'd pages read stay in this process's resident set
    # otherwise, and over 32 layers of a 31 GB MoE that is the whole file (the next read maps it again).
    model.weights.close()
    layer = TorchLayer(model.config, w, recipe.opts.seq_len)
    report = LayerReport(i, 0.0)
    src = work.acts(i, "r") if recipe.opts.calibrated else None
    stored = recipe.quantize(layer, i, src, report)
    if src is not None:
        dst = work.acts(i + 1, "w+")
        recipe.on_stage("forward")
        for b, x in zip(range(0, len(src), recipe.opts.batch), recipe.batches(src)):
            dst[b:b + len(x)] = layer.forward(x).cpu().numpy()
        dst.flush()
        del src, dst
    sink.write_layer(work, i, w, stored)
    del w, layer, stored
    _return_freed_memory()
    report.seconds = time.perf_counter() - t0
    work.layer_done(report)
    return report


def _return_freed_memory() -> None:
    """glibc keeps a freed layer's memory for reuse; hand it back so resident memory shows one layer."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
