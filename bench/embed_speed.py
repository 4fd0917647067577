"""Embedding speed on a kanana-nano-2.1b-embedding-shaped model (random weights, the real shapes): embeddings
per second for 128-token passages at batch 1 and 16, onnxruntime on our ONNX export vs the numpy runtime on
the quantized checkpoint it came from, and each run's peak RSS.

    python bench/embed_speed.py [--work DIR] [--threads 2] [--rounds 3]

The model is synthesised (`synth --preset kanana-nano-2.1b-embedding`, BF16), quantized with RTN 4-bit g128
(no clipping search) and exported to ONNX (default export: MatMulNBits at accuracy level 4, int8 activations); both are cached in
--work. Each (engine, batch) runs in its own process: load, one untimed passage as warm-up, then `rounds` timed
batches of 128-token passages cut from our held-out text (BOS + 127 tokens, all pooled); peak RSS is the
process's (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import CACHE, save  # noqa: E402

PRESET = "kanana-nano-2.1b-embedding"
TOKENS = 128
BATCHES = (1, 16)


def prepare(work: Path) -> dict[str, Path]:
    """The synthesised float model, its RTN 4-bit g128 checkpoint and that checkpoint's ONNX export (cached)."""
    from kanana_quant.exporters.onnx import export_onnx
    from kanana_quant.loader import open_model
    from kanana_quant.qcheckpoint import QuantFormat
    from kanana_quant.quant.driver import quantize_model
    from kanana_quant.quant.options import QuantOptions
    from kanana_quant.synth import preset_config, synth_model

    paths = {"float": work / "float", "rtn": work / "rtn-4-g128", "onnx": work / "onnx"}
    steps = {}
    if not paths["float"].exists():
        t0 = time.perf_counter()
        synth_model(paths["float"], preset_config(PRESET), dtype="BF16")
        steps["synth_seconds"] = time.perf_counter() - t0
    if not paths["rtn"].exists():
        t0 = time.perf_counter()
        # plain min/max rounding: random weights' values do not matter for speed, and the clipping search
        # would take most of the preparation
        quantize_model(open_model(str(paths["float"])), paths["rtn"],
                       QuantOptions(QuantFormat("rtn", 4, 128, True), search=False))
        steps["quantize_seconds"] = time.perf_counter() - t0
    if not paths["onnx"].exists():
        t0 = time.perf_counter()
        export_onnx(open_model(str(paths["rtn"])), paths["onnx"])
        steps["export_seconds"] = time.perf_counter() - t0
    print(json.dumps({k: round(v, 1) for k, v in steps.items()}), flush=True)
    return paths


def passages(tokenizer, count: int) -> list[list[int]]:
    text = "\n".join(resources.files("kanana_quant").joinpath(f"data/heldout_{lang}.txt").read_text(encoding="utf-8")
                     for lang in ("en", "ko"))
    ids = tokenizer.encode(text)
    step = len(ids) // count
    return [[tokenizer.bos_id] + ids[i * step:i * step + TOKENS - 1] for i in range(count)]


def child(engine: str, path: str, batch: int, rounds: int, threads: int) -> None:
    """One engine, one batch size: prints {"embeddings_per_s", "seconds", "peak_rss_bytes", ...} as JSON."""
    from kanana_quant.embed import Encoded, batch_arrays, pad_token_id
    from kanana_quant.loader import open_model
    from kanana_quant.runtimes.engines import open_encoder

    t0 = time.perf_counter()
    loaded = open_model(path)
    encoder = open_encoder(loaded, engine, threads=threads, isolated=False)  # this process: its peak RSS
    load = time.perf_counter() - t0
    rows = passages(loaded.tokenizer, batch * (rounds + 1))
    arrays = [batch_arrays([Encoded(r, 0) for r in rows[i * batch:(i + 1) * batch]], pad_token_id(loaded.config))
              for i in range(rounds + 1)]
    assert all(a[0].shape == (batch, TOKENS) for a in arrays)
    encoder.encode(*(a[:1] for a in arrays[0]))  # warm-up: one passage pages the weights in
    times = []
    for a in arrays[1:]:
        t0 = time.perf_counter()
        encoder.encode(*a)
        times.append(time.perf_counter() - t0)
    best, median = min(times), sorted(times)[len(times) // 2]
    print(json.dumps({"engine": engine, "batch": batch, "rounds": rounds, "load_seconds": round(load, 2),
                      "batch_seconds": [round(t, 3) for t in times],
                      "embeddings_per_s_best": batch / best, "embeddings_per_s_median": batch / median,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=CACHE / "bench-embed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--numpy-rounds", type=int, default=1, help="timed batches in the numpy runtime (slow)")
    parser.add_argument("--numpy-batches", default="1,16", help="batch sizes to time in the numpy runtime")
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument("--child", nargs=4, metavar=("ENGINE", "PATH", "BATCH", "ROUNDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        engine, path, batch, rounds = args.child
        return child(engine, path, int(batch), int(rounds), args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    paths = prepare(args.work)
    if args.prepare_only:
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OPENBLAS_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    runs = []
    load_before = os.getloadavg()  # other work on the machine shows here: the runs below share its cores
    numpy_batches = {int(b) for b in args.numpy_batches.split(",")}
    for batch in BATCHES:
        for engine, model, rounds in (("onnxruntime", paths["onnx"], args.rounds),
                                      ("numpy", paths["rtn"], args.numpy_rounds)):
            if engine == "numpy" and batch not in numpy_batches:
                continue
            cmd = [sys.executable, __file__, "--threads", str(args.threads), "--child", engine, str(model),
                   str(batch), str(rounds)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    sizes = {k: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for k, p in paths.items()}
    path = save("embed_speed", {
        "model": f"{PRESET} shape, random weights, RTN 4-bit g128 (ONNX: MatMulNBits, accuracy level 4)",
        "tokens_per_passage": TOKENS, "threads": args.threads, "file_bytes": sizes, "runs": runs,
        "load_average_1_5_15": {"before": [round(x, 2) for x in load_before],
                                "after": [round(x, 2) for x in os.getloadavg()]},
        "command": " ".join(["embed_speed.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d")})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
