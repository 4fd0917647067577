"""Which of the ecosystem's own engines load which of our outputs, measured: tiny dense (Llama) and MoE
(Mixtral) models quantized with GPTQ and AWQ 4-bit group 32, exported to ONNX and GGUF, each output loaded in
its real engine and compared with our numpy runtime (greedy tokens; logits of the prompt and each step).

    python bench/ecosystem.py [--work DIR] [--gptq-python PY] [--steps 16] [--save ecosystem]

Engines: onnxruntime-genai (`og.Model` + `og.Generator`) and our onnxruntime engine on the ONNX exports;
llama.cpp (llama-cpp-python) and gguf-py (its dequantization, through our GGUF reader) on the GGUFs;
transformers `from_pretrained(gguf_file=...)` on the GGUFs; GPTQModel `GPTQModel.load` and transformers
`from_pretrained` on the GPTQ/AWQ checkpoints. GPTQModel needs torch 2.14.1, so those two run in another
virtual environment (--gptq-python; `pip install torch==2.14.1 gptqmodel optimum` there): this file is also
the worker it runs (`--worker`), which imports nothing of kanana_quant.

GPTQModel's CPU kernels compute in bfloat16 (TorchFusedLinear casts float32 inputs) or float16, so its
float32 comparison takes every quantized linear's weights as GPTQModel itself dequantizes them (before any
forward, in float32), checks them bit for bit against ours, and runs the transformers model it built with those
weights in float32; the kernel's own greedy tokens are recorded beside it. The MoE checkpoint is also loaded
in the layout we wrote before (Mixtral's block_sparse_moe.experts.E.w1/w2/w3) to show why that changed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "Kanana is a bilingual model. 카카오의 카나나는 한국어와 영어를 함께 배웠습니다."
TOL = 1e-4  # float32 engines against the numpy runtime (logits)


# ---------------------------------------------------------------------------------------------------------
# Worker: runs in GPTQModel's virtual environment (torch 2.14.1, gptqmodel, transformers, optimum)


def _dequantize_all(model) -> dict:
    """name -> float32 [out, in] weight of every quantized linear, as GPTQModel's own unpacking gives it
    (before any forward: its CPU kernels repack the buffers into bfloat16 on the first call)."""
    out = {}
    for name, mod in model.named_modules():
        if not hasattr(mod, "qweight"):
            continue
        from gptqmodel.nn_modules.qlinear import PackableQuantLinear
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        if "Awq" in type(mod).__name__:  # AWQ GEMM modules: GPTQModel's AWQ unpacking
            w = dequantize_gemm(mod.qweight, mod.qzeros, mod.scales.float(), mod.bits, mod.group_size)
        elif isinstance(mod, PackableQuantLinear):
            w = PackableQuantLinear.dequantize_weight(mod)
        else:
            w = mod.dequantize_weight()
        w = w.float()
        out[name] = (w.T if w.shape[0] == mod.in_features and w.shape[1] == mod.out_features else w).contiguous()
    return out


def _float_linears(model, weights: dict) -> None:
    import torch

    for name, w in weights.items():
        mod = model.get_submodule(name)
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=getattr(mod, "bias", None) is not None)
        lin.weight.data = w.clone()
        if lin.bias is not None:
            lin.bias.data = mod.bias.float()
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, lin)


def _greedy(model, ids: list[int], steps: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return out[0, len(ids):].tolist()


def _worker_job(job: dict) -> dict:
    import numpy as np
    import torch

    result: dict = {"engine": job["engine"]}
    if job["engine"] == "gptqmodel":
        import gptqmodel
        from gptqmodel import BACKEND, GPTQModel

        result["version"] = f"GPTQModel {gptqmodel.__version__}"
        backend = BACKEND.TORCH_FUSED_AWQ if job["method"] == "awq" else BACKEND.TORCH_FUSED
        model = GPTQModel.load(job["path"], device="cpu", backend=backend, dtype=torch.float32).model
        result["loading"] = {}
    else:
        import transformers
        from transformers import AutoModelForCausalLM

        result["version"] = f"transformers {transformers.__version__}"
        model, info = AutoModelForCausalLM.from_pretrained(job["path"], device_map="cpu", dtype=torch.float32,
                                                           output_loading_info=True)
        result["loading"] = {k: sorted(v)[:4] + ([f"... {len(v)} in all"] if len(v) > 4 else [])
                             for k, v in info.items() if v}
    model.eval()
    result["class"] = type(model).__name__
    result["kernels"] = sorted({type(m).__name__ for _, m in model.named_modules() if hasattr(m, "qweight")})
    try:
        weights = _dequantize_all(model)
    except Exception as e:  # modules left uninitialised by the load (missing tensors) have garbage buffers
        result["dequantize_error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        weights = None
    try:
        result["kernel_tokens"] = _greedy(model, job["ids"], job["steps"])
    except Exception as e:
        result["forward_error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    if weights is None:
        return result
    np.savez(job["weights_out"], **{k.replace(".", "/"): v.numpy() for k, v in weights.items()})
    _float_linears(model, weights)
    with torch.no_grad():
        result["logits"] = model(torch.tensor([job["ids"]])).logits[0, -1].float().tolist()
    result["tokens"] = _greedy(model, job["ids"], job["steps"])
    return result


def worker(jobs_file: Path, out_file: Path) -> None:
    """Each job in its own try: one engine refusing one output is a measurement, not a failure."""
    results = []
    for job in json.loads(jobs_file.read_text()):
        t0 = time.perf_counter()
        try:
            result = _worker_job(job)
        except Exception as e:  # the engine's own words, first line
            from importlib.metadata import version

            package = {"gptqmodel": "GPTQModel", "transformers": "transformers"}[job["engine"]]
            result = {"engine": job["engine"], "version": f"{package} {version(package)}",
                      "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:400]}"}
        result.update(output=job["output"], seconds=round(time.perf_counter() - t0, 1))
        results.append(result)
    out_file.write_text(json.dumps(results))


# ---------------------------------------------------------------------------------------------------------
# Main: builds, quantizes and exports with kanana_quant, runs the engines that share its environment


def build(work: Path) -> dict:
    """{name: path} of every output: checkpoints, ONNX exports, GGUFs (and the float sources)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import VARIANTS

    from kanana_quant.exporters.onnx import export_onnx
    from kanana_quant.gguf.writer import export_gguf
    from kanana_quant.loader import open_model
    from kanana_quant.qcheckpoint import QuantFormat
    from kanana_quant.quant.driver import quantize_model
    from kanana_quant.quant.options import QuantOptions
    from kanana_quant.synth import synth_model

    outputs = {}
    # seeds whose random weights do not fall into repeating one token at once (greedy, float)
    for model, variant, seed in (("dense", "dense-256", 5), ("moe", "moe-mixtral", 11)):
        src = work / model
        if not src.exists():
            synth_model(src, VARIANTS[variant], seed=seed)
        outputs[f"{model} float"] = src
        for method, sym in (("gptq", True), ("awq", False)):
            ckpt = work / f"{model}-{method}"
            if not ckpt.exists():
                opts = QuantOptions(QuantFormat(method, 4, 32, sym), samples=16, seq_len=64)
                quantize_model(open_model(str(src)), ckpt, opts)
            outputs[f"{model} {method.upper()}"] = ckpt
            onnx = work / f"{model}-{method}-onnx"
            if not onnx.exists():
                export_onnx(open_model(str(ckpt)), onnx, accuracy_level=0, lm_head="float")
            outputs[f"{model} {method.upper()} → ONNX"] = onnx
        for kind in ("Q4_0", "F32"):  # Q4_0 carries the symmetric g32 codes; F32 holds them dequantized
            gguf = work / f"{model}-gptq-{kind}.gguf"
            if not gguf.exists():
                export_gguf(open_model(str(outputs[f"{model} GPTQ"])), gguf, kind)
            outputs[f"{model} GPTQ → GGUF {kind}"] = gguf
    old = work / "moe-gptq-block_sparse_moe"  # the layout quantize wrote before (Mixtral's own names)
    if not old.exists():
        from safetensors.numpy import load_file, save_file

        shutil.copytree(outputs["moe GPTQ"], old)
        renames = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
        tensors = {re.sub(r"mlp\.experts\.(\d+)\.(\w+_proj)",
                          lambda m: f"block_sparse_moe.experts.{m[1]}.{renames[m[2]]}", k)
                   .replace("mlp.gate.", "block_sparse_moe.gate."): v
                   for k, v in load_file(old / "model.safetensors").items()}
        save_file(tensors, old / "model.safetensors", metadata={"format": "pt"})
    outputs["moe GPTQ, block_sparse_moe layout (before)"] = old
    return outputs


def reference(path: Path, steps: int) -> dict:
    """Our numpy runtime on a checkpoint: prompt ids, greedy tokens, last-position logits of the prompt, and
    every quantized linear's dequantized weight."""
    import numpy as np

    from kanana_quant.loader import open_model
    from kanana_quant.runtimes.numpy_engine import NumpyEngine

    model = open_model(str(path))
    ids = model.tokenizer.encode(PROMPT, add_special_tokens=True)
    engine = NumpyEngine(model.weights)
    logits = engine.forward(ids)
    tokens = [int(np.argmax(logits))]
    for _ in range(steps - 1):
        tokens.append(int(np.argmax(engine.forward([tokens[-1]]))))
    return {"ids": ids, "tokens": tokens, "logits": np.asarray(logits, np.float32), "model": model}


def compare(ref: dict, tokens: list[int], logits=None) -> dict:
    import numpy as np

    same = 0
    for a, b in zip(ref["tokens"], tokens):
        if a != b:
            break
        same += 1
    row = {"tokens_identical": same, "steps": len(ref["tokens"]), "tokens": tokens}
    if logits is not None:
        row["max_abs_logit_diff"] = float(np.abs(np.asarray(logits, np.float32) - ref["logits"]).max())
    return row


def genai_run(path: Path, ids: list[int], steps: int) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + steps, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([ids], np.int32))
    first = np.array(gen.get_logits())[0, -1]
    tokens = []
    while len(tokens) < steps and not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return {"tokens": tokens, "logits": first, "version": f"onnxruntime-genai {og.__version__}"}


def ort_run(path: Path, ids: list[int], steps: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    from kanana_quant.runtimes.onnx_engine import OnnxEngine

    engine = OnnxEngine(path, threads=1)
    first = engine.forward(ids)
    tokens = [int(np.argmax(first))]
    for _ in range(steps - 1):
        tokens.append(int(np.argmax(engine.forward([tokens[-1]]))))
    return {"tokens": tokens, "logits": first, "version": f"onnxruntime {ort.__version__} (kanana-quant engine)"}


def llamacpp_run(path: Path, ids: list[int], steps: int) -> dict:
    import llama_cpp
    import numpy as np

    from kanana_quant.loader import open_checkpoint
    from kanana_quant.runtimes.llamacpp_engine import LlamaCppEngine

    engine = LlamaCppEngine(path, open_checkpoint(path).config, max_seq_len=256, threads=1)
    first = engine.forward(ids)
    tokens = [int(np.argmax(first))]
    for _ in range(steps - 1):
        tokens.append(int(np.argmax(engine.forward([tokens[-1]]))))
    row = {"tokens": tokens, "logits": first, "version": f"llama-cpp-python {llama_cpp.__version__}"}
    if "F32" not in path.name:
        row["note"] = (f"{gguf_head_note(path)}, and llama.cpp rounds activations to Q8_0 blocks for Q4_0 "
                       "weights: logits differ by both")
    else:
        row["note"] = "llama.cpp's default F16 KV cache"
    return row


def gguf_head_note(path: Path) -> str:
    """What the GGUF's mix did to the float tensors the checkpoint kept (llama-quantize's rules)."""
    from gguf import GGUFReader

    kinds = {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors if not t.name.startswith("blk.")}
    parts = [f"{name.split('.')[0]} {kind}" for name, kind in kinds.items() if name in ("token_embd.weight",
                                                                                           "output.weight")]
    return "the file's mix re-rounds the float embedding / lm_head (" + ", ".join(parts) + ")"


def ggufpy_run(path: Path, ref_model) -> dict:
    """gguf-py's dequantization of every quantized tensor (through our GGUF reader, which undoes llama.cpp's
    Q/K row order) against our dequantization of the checkpoint it was exported from."""
    import gguf
    import numpy as np

    from kanana_quant.loader import open_checkpoint

    theirs = open_checkpoint(path)
    names = [n for n in ref_model.weights.names if ref_model.weights.is_quantized(n)]
    worst = max(float(np.abs(theirs.get(n) - ref_model.weights.get(n)).max()) for n in names)
    return {"tensors": len(names), "max_abs_weight_diff": worst,
            "version": f"gguf-py {getattr(gguf, '__version__', '') or _dist_version('gguf')}"}


def transformers_gguf_run(path: Path, ref: dict, steps: int) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                       output_loading_info=True)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ref["ids"]])).logits[0, -1].float().numpy()
    tokens = _greedy(model, ref["ids"], steps)
    loading = {k: sorted(v)[:4] + ([f"... {len(v)} in all"] if len(v) > 4 else []) for k, v in info.items() if v}
    row = {"tokens": tokens, "logits": logits, "class": type(model).__name__, "loading": loading,
           "mlp": type(model.model.layers[0].mlp).__name__, "version": f"transformers {transformers.__version__}"}
    if "F32" not in path.name:
        row["note"] = gguf_head_note(path)
    return row


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def verdict(row: dict) -> str:
    """One phrase per cell, from the measurement alone."""
    if "error" in row:
        return "refused"
    if row.get("dequantize_error") or row.get("forward_error"):
        return "wrong"
    full = row.get("tokens_identical") == row.get("steps")
    exact = row.get("max_abs_logit_diff", 0.0) <= TOL and row.get("weights_identical", True)
    if row.get("loading", {}).get("missing_keys") or (row.get("mlp") and "Moe" not in row["mlp"] and row["moe"]):
        return "wrong"
    if full and exact:
        return "loads, identical"
    if full:
        return "loads, tokens identical"
    return "wrong" if row.get("exact_engine", True) else "loads, tokens differ"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/work/scratch-ecosystem"))
    ap.add_argument("--gptq-python", default="/work/venv-gptq/bin/python",
                    help="python of a virtual environment with torch 2.14.1, gptqmodel, transformers and optimum")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--save", default="ecosystem")
    ap.add_argument("--worker", nargs=2, type=Path, metavar=("JOBS", "OUT"), help=argparse.SUPPRESS)
    sp = ap.add_argument_group("the ONNX contract's speed (instead of the compatibility table)")
    sp.add_argument("--contract-speed", action="store_true",
                    help="time --onnx-before (exported by --old-tree's code) against --onnx-after, interleaved")
    sp.add_argument("--old-tree", type=Path, help="a source tree of the old contract (git archive 65dab01)")
    sp.add_argument("--onnx-before", type=Path)
    sp.add_argument("--onnx-after", type=Path)
    sp.add_argument("--rounds", type=int, default=4)
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument("--label", default="Kanana-1.5-2.1B, RTN 4-bit g128 asym")
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    if args.contract_speed:
        return contract_speed(args)

    import numpy as np

    sys.path.insert(0, str(HERE))
    from common import save

    args.work.mkdir(parents=True, exist_ok=True)
    outputs = build(args.work)
    refs = {name: reference(path, args.steps) for name, path in outputs.items()
            if path.is_dir() and "ONNX" not in name and "float" not in name}
    source = {f"{m} {q} → ONNX": f"{m} {q}" for m in ("dense", "moe") for q in ("GPTQ", "AWQ")}
    source.update({f"{m} GPTQ → GGUF {k}": f"{m} GPTQ" for m in ("dense", "moe") for k in ("Q4_0", "F32")})
    rows = []

    def cell(output: str, engine: str, run, exact: bool = True) -> None:
        ref = refs[source.get(output, output)]
        t0 = time.perf_counter()
        try:
            got = run(ref)
            row = {k: v for k, v in got.items() if k not in ("tokens", "logits")}
            if "tokens" in got:
                row.update(compare(ref, got["tokens"], got.get("logits")))
        except Exception as e:
            row = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:400]}"}
        row.update(output=output, engine=engine, exact_engine=exact, moe=output.startswith("moe"),
                   seconds=round(time.perf_counter() - t0, 1))
        row["result"] = verdict(row)
        rows.append(row)
        print(f"{output:44} {engine:34} {row['result']:24} {row.get('error', '')[:100]}", flush=True)

    for output in [o for o in outputs if "ONNX" in o]:
        path = outputs[output]
        cell(output, "onnxruntime-genai", lambda ref, p=path: genai_run(p, ref["ids"], args.steps))
        cell(output, "onnxruntime (--engine onnxruntime)", lambda ref, p=path: ort_run(p, ref["ids"], args.steps))
    for output in [o for o in outputs if "GGUF" in o]:
        path = outputs[output]
        cell(output, "llama.cpp", lambda ref, p=path: llamacpp_run(p, ref["ids"], args.steps), exact="F32" in output)
        cell(output, "gguf-py", lambda ref, p=path: ggufpy_run(p, ref["model"]))
        cell(output, "transformers (gguf_file=)", lambda ref, p=path: transformers_gguf_run(p, ref, args.steps))

    # GPTQModel and transformers on the checkpoints, in GPTQModel's environment
    jobs = []
    for output in [o for o in outputs if o in refs]:
        for engine in ("gptqmodel", "transformers"):
            jobs.append({"engine": engine, "output": output, "path": str(outputs[output]), "ids": refs[output]["ids"],
                         "steps": args.steps, "method": "awq" if "AWQ" in output else "gptq",
                         "weights_out": str(args.work / f"weights-{engine}-{len(jobs)}.npz")})
    # One process per job: importing gptqmodel patches transformers (its MoE "defuser"), so a transformers
    # load after a GPTQModel load in the same process is not what a transformers user gets.
    worker_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    results = []
    for k, job in enumerate(jobs):
        jobs_file, out_file = args.work / f"job-{k}.json", args.work / f"job-{k}-result.json"
        jobs_file.write_text(json.dumps([job]))
        subprocess.run([args.gptq_python, __file__, "--worker", str(jobs_file), str(out_file)], check=True,
                       env=worker_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results += json.loads(out_file.read_text())
    names = {"gptqmodel": "GPTQModel (GPTQModel.load)", "transformers": "transformers (from_pretrained)"}
    for job, got in zip(jobs, results):
        ref = refs[job["output"]]
        row = {k: v for k, v in got.items() if k not in ("tokens", "logits", "engine", "output")}
        if "error" not in got and "tokens" not in got:  # loaded, but its quantized modules hold no weights
            if "kernel_tokens" in got:
                row.update(compare(ref, got["kernel_tokens"]))
        elif "error" not in got:
            row.update(compare(ref, got["tokens"], got["logits"]))
            theirs = np.load(job["weights_out"])
            hf = {hf_name.removesuffix(".weight"): n for n, hf_name in _hf_names(ref["model"]).items()}
            diffs = [float(np.abs(theirs[k] - ref["model"].weights.get(hf[k.replace("/", ".")])).max())
                     for k in theirs.files if k.replace("/", ".") in hf]
            row["weights_compared"] = len(diffs)
            row["max_abs_weight_diff"] = max(diffs) if diffs else None
            row["weights_identical"] = bool(diffs) and max(diffs) == 0.0
            row["kernel_tokens_identical"] = compare(ref, got["kernel_tokens"])["tokens_identical"]
        row.update(output=job["output"], engine=names[job["engine"]], exact_engine=True,
                   moe=job["output"].startswith("moe"))
        row["result"] = verdict(row)
        rows.append(row)
        print(f"{job['output']:44} {names[job['engine']]:34} {row['result']:24} {row.get('error', '')[:100]}")
    save(args.save, {"prompt": PROMPT, "steps": args.steps, "tolerance": TOL, "rows": rows})


# ---------------------------------------------------------------------------------------------------------
# The graph contract's cost: bench/speed.py's timed child on an export of the old contract (run from the
# old source tree) and of the new one, interleaved round by round on one machine

OLD_TREE_RUNNER = """
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]  # not the venv's kanana_quant
tree = sys.argv.pop(1)
sys.path[:0] = [tree, tree + "/bench"]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def contract_speed(args) -> None:
    import statistics

    sys.path.insert(0, str(HERE))
    from common import cpu, save

    vocab = json.loads((args.onnx_after / "config.json").read_text())["vocab_size"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    sides = {"before": [sys.executable, "-c", OLD_TREE_RUNNER, str(args.old_tree), str(args.old_tree / "bench/speed.py")],
             "after": [sys.executable, str(HERE / "speed.py")]}
    exports = {"before": args.onnx_before, "after": args.onnx_after}
    runs: dict = {"before": [], "after": []}
    for round_ in range(args.rounds):
        for side in (("before", "after") if round_ % 2 == 0 else ("after", "before")):
            out = subprocess.run([*sides[side], "--child", "onnxruntime", str(exports[side]), str(args.threads),
                                  "128", "512", str(vocab)], env=env, check=True, capture_output=True, text=True)
            runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(side, round_, {k: round(v, 2) for k, v in runs[side][-1].items() if isinstance(v, float)}, flush=True)
    summary = {}
    for side, rs in runs.items():
        summary[side] = {key: {"best": round(max(r[key] for r in rs), 2),
                               "median": round(statistics.median(r[key] for r in rs), 2),
                               "all": [round(r[key], 2) for r in rs]}
                         for key in ("decode_tok_s", "prefill_tok_s", "peak_rss_gib", "load_s")}
        summary[side]["configuration"] = rs[0]["configuration"]
    save("onnx_contract_speed", {"model": args.label, "threads": args.threads, "cpu": cpu(),
                                 "exports": {k: str(v) for k, v in exports.items()},
                                 "old_tree": str(args.old_tree), "protocol": "bench/speed.py's child per run "
                                 "(one untimed 512-token prefill, 128 decode steps after a 32-token prompt, one "
                                 "512-token prefill), before/after alternating, rounds " + str(args.rounds),
                                 "summary": summary})


def _hf_names(model) -> dict:
    """canonical -> HF tensor name in the checkpoint's own layout."""
    from kanana_quant import names

    return names.hf_name_map(model.config, getattr(model.weights, "moe_layout", None))


if __name__ == "__main__":
    main()
