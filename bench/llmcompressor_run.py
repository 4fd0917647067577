"""llm-compressor's AWQ or GPTQ on a float Hugging Face directory, for bench/quality.py's comparison rows. Runs in
llm-compressor's own venv (bench/common.py's bench_venv; it needs another transformers than ours), so it imports
nothing from kanana_quant.

    python bench/llmcompressor_run.py MODEL_DIR CALIB.npy OUT_DIR --method awq|gptq --bits 4 --group 64 --sym

CALIB.npy: the [samples, seq_len] int64 token windows our quantizers calibrate on. OUT_DIR: the fake-quantized
model (every quantized linear dequantized with llm-compressor's own fake_quantize and scales, so a float reader
scores exactly what its compressed checkpoint would hold) plus report.json: versions, recipe, seconds, and a
grid check that every weight group holds at most 2^bits distinct values.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, forward_quantize
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from llmcompressor.modifiers.transform.awq import AWQModifier
from llmcompressor.pipelines.cache import IntermediatesCache
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

PACKAGES = ("llmcompressor", "compressed-tensors", "transformers", "torch")
SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
# AWQModifier pins its cached activations for faster copies to a GPU without checking that there is one (0.14.0.1,
# transform/awq/base.py; its other pin sites check torch.accelerator.is_available()), which raises "Cannot access
# accelerator device" on a CPU-only torch. Pinning changes no value, so on CPU it is skipped.
CPU_PATCH = "IntermediatesCache.pin_memory skipped: no accelerator"


def recipe(method: str, bits: int, group: int, sym: bool) -> list:
    """llm-compressor's published recipes (examples/awq/llama_example.py: AWQ with duo_scaling="both", then
    min/max quantization; examples/quantization_w4a16: GPTQModifier) on our grid instead of W4A16's."""
    layout = {"strategy": "channel"} if group == -1 else {"strategy": "group", "group_size": group}
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, **layout)
    quant = {"config_groups": {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
             "ignore": ["lm_head"]}
    if method == "awq":
        return [AWQModifier(duo_scaling="both"), QuantizationModifier(**quant)]
    return [GPTQModifier(**quant)]


def describe(modifiers: list) -> dict:
    """The recipe as run, defaults included (they are what the row measured)."""
    out = {}
    for m in modifiers:
        fields = m.model_dump(mode="json", exclude={"config_groups", "requires_calibration_data", "offload_device",
                                                    "index", "group", "start", "end", "update",
                                                    "initialized_", "finalized_", "started_", "ended_"})
        if getattr(m, "config_groups", None):
            fields["weights"] = m.config_groups["group_0"].weights.model_dump(mode="json", exclude_none=True)
        out[type(m).__name__] = {k: v for k, v in fields.items() if v not in (None, [], {})}
    return out


def distinct_levels(w: torch.Tensor, group: int) -> int:
    """The most distinct values any (row, group) of w holds."""
    g = w.reshape(-1, w.shape[1] if group == -1 else group).sort(dim=1).values
    return int(((g[:, 1:] != g[:, :-1]).sum(dim=1) + 1).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("calib", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--method", choices=("awq", "gptq"), required=True)
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group", type=int, required=True)
    ap.add_argument("--sym", action=argparse.BooleanOptionalAction, required=True)
    args = ap.parse_args()

    patched = not torch.accelerator.is_available()
    if patched:
        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    ids = np.load(args.calib, allow_pickle=False)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    modifiers = recipe(args.method, args.bits, args.group, args.sym)
    started = time.perf_counter()
    # The windows were drawn at random offsets already, and order enters neither AWQ's means nor GPTQ's Hessian.
    oneshot(model=model, dataset=data, recipe=modifiers, max_seq_length=ids.shape[1],
            num_calibration_samples=len(ids), shuffle_calibration_samples=False)
    seconds = time.perf_counter() - started

    tensors, levels, quantized = {}, 0, 0
    with torch.no_grad():
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is not None and scheme.weights is not None:
                w = forward_quantize(module, module.weight, "weight", scheme.weights).float()
                levels = max(levels, distinct_levels(w, args.group))
                tensors[f"{name}.weight"] = w.contiguous()
                quantized += 1
        for name, p in model.state_dict().items():
            last = name.rsplit(".", 1)[-1]
            if name in tensors or last.startswith("weight_") or (name == "lm_head.weight" and
                                                                 model.config.tie_word_embeddings):
                continue  # qparams are folded into the dequantized weight; a tied head is the embedding
            tensors[name] = p.detach().float().contiguous()
    if quantized == 0 or levels > 2 ** args.bits:
        raise SystemExit(f"llm-compressor {args.method}: {quantized} linears quantized, up to {levels} distinct "
                         f"values per group (a {args.bits}-bit grid allows {2 ** args.bits})")
    args.out.mkdir(parents=True)
    save_file(tensors, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    for name in SIDE_FILES:
        if (args.model / name).is_file():
            shutil.copy(args.model / name, args.out / name)
    # The export read back as a plain float model must give the logits of llm-compressor's own fake-quantized forward.
    probe = torch.as_tensor(ids[:1, :64])
    with torch.no_grad():
        theirs = model(probe).logits
        export = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)(probe).logits
    logit_diff = float((theirs - export).abs().max())
    if logit_diff > 1e-3:
        raise SystemExit(f"llm-compressor {args.method}: the exported model's logits differ from its own by "
                         f"{logit_diff:.3g}")
    report = {"versions": {p: version(p) for p in PACKAGES}, "recipe": describe(modifiers), "quantize_seconds": seconds,
              "quantized_linears": quantized, "max_levels_per_group": levels, "export_max_logit_diff": logit_diff,
              **({"cpu_patch": CPU_PATCH} if patched else {})}
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
