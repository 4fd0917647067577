"""Long context on Kanana-1.5-8B's shape: resident memory and decode speed with 4K, 16K and 32K tokens in the KV
cache, onnxruntime (f32 and f16 cache) side by side with llama.cpp (its q8_0 cache, and its f16 default), in one
run.

    python bench/long_context.py [--contexts 4096,16384,32768] [--decode 8] [--threads 2] [--work DIR]
                                 [--runs onnxruntime:f32,onnxruntime:f16,llama.cpp:q8_0,llama.cpp:f16]

The model: the 8B preset's shapes with random weights, RTN 4-bit group 32 symmetric without the clipping search
(minutes per 8B layer on 2 cores, and random weights only measure speed and memory), then bench/speed.py's
prepare: its ONNX export and a Q4_0 GGUF carrying the same codes. Prefilling 32K tokens of an 8B model takes hours on
2 cores, and what a decode step costs does not depend on the values the cache holds, so each engine's cache is
filled to the context synthetically: onnxruntime's buffers are written in place (every page touched, so the RSS
counts them), llama.cpp's through its own sequence-state restore (llama_state_seq_set_data) with the state of a
real 64-token prefill repeated to the cells at positions 0..N-D-2 (each run first checks that the 64-token state,
read and rewritten unchanged, gives the prefill's own next logits). Then one untimed step and D = --decode timed ones
decode one token at a time, the last at position N-1: the cache holds N tokens at the end. Each run is its own child process; RSS is its resident set
after decoding (the synthetic llama.cpp state, built in the child, is freed by then) and its peak.
The numpy runtime is left out: it dequantizes every weight on every step (seconds per 8B token at any context).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import earlier_rows, llamacpp_build, save  # noqa: E402
from speed import peak_rss_gib, prepare, status_gib  # noqa: E402

PRESET = "kanana-1.5-8b"
SEED_TOKENS = 64  # the real prefill whose llama.cpp state is repeated


# ---------------------------------------------------------------------------------------------------------
# Filling a cache to N tokens


def fill_onnx(engine, n: int, extra: int) -> None:
    """Random values in every buffer of onnxruntime's cache, sized for n + extra tokens; n of them valid."""
    import numpy as np

    block = np.random.default_rng(0).normal(size=4096).astype(np.float32)
    for buf in engine.reserve(n + extra):
        flat = buf.reshape(-1)
        flat[:] = np.resize(block, flat.size).astype(buf.dtype)  # writes (touches) every page
    engine.pos = n


class _Reader:
    def __init__(self, data: memoryview):
        self.data, self.at = data, 0

    def take(self, fmt_or_size):
        if isinstance(fmt_or_size, int):
            out = self.data[self.at:self.at + fmt_or_size]
            self.at += fmt_or_size
            return out
        out = struct.unpack_from(fmt_or_size, self.data, self.at)
        self.at += struct.calcsize(fmt_or_size)
        return out[0] if len(out) == 1 else out


def repeated_state(state: bytes, n: int) -> bytearray:
    """llama.cpp's sequence state (llama_context::state_seq_get_data: a magic and the sequence id, then
    llama_kv_cache::state_write: streams, cells' positions and sequence ids, every layer's K rows, then its V
    rows, or V by element when V is stored transposed) of one stream of c cells at positions 0..c-1, rewritten
    to n cells at positions 0..n-1 whose K and V repeat the c cells' cyclically."""
    import numpy as np

    r = _Reader(memoryview(state))
    magic, seq = r.take("<I"), r.take("<i")
    assert r.take("<I") == 1, "one KV stream expected"
    c = r.take("<I")
    meta = np.frombuffer(r.take(12 * c), np.int32).reshape(c, 3)  # pos, n_seq_id, seq_id: no cell extension
    assert (meta[:, 0] == np.arange(c)).all() and (meta[:, 1] == 1).all(), "a plain sequence 0..c-1 expected"
    v_trans, n_layer = r.take("<I"), r.take("<I")
    parts: list = [struct.pack("<IiII", magic, seq, 1, n)]
    new_meta = np.zeros((n, 3), np.int32)
    new_meta[:, 0], new_meta[:, 1], new_meta[:, 2] = np.arange(n), 1, meta[0, 2]
    parts.append(new_meta)
    parts.append(struct.pack("<II", v_trans, n_layer))
    for _ in range(n_layer):  # keys: [cells, row bytes]
        k_type, row = r.take("<i"), r.take("<Q")
        rows = np.frombuffer(r.take(c * row), np.uint8).reshape(c, row)
        parts += [struct.pack("<iQ", k_type, row), np.resize(rows, (n, row))]
    for _ in range(n_layer):
        if not v_trans:
            v_type, row = r.take("<i"), r.take("<Q")
            rows = np.frombuffer(r.take(c * row), np.uint8).reshape(c, row)
            parts += [struct.pack("<iQ", v_type, row), np.resize(rows, (n, row))]
        else:  # [embedding, cells, element bytes]
            v_type, el, width = r.take("<i"), r.take("<I"), r.take("<I")
            cols = np.frombuffer(r.take(width * c * el), np.uint8).reshape(width, c, el)
            parts += [struct.pack("<iII", v_type, el, width),
                      np.ascontiguousarray(np.tile(cols, (1, -(-n // c), 1))[:, :n])]
    assert r.at == len(state), "the state has parts this reader does not know"
    out = bytearray(sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts))
    at = 0
    for p in parts:
        b = p if isinstance(p, bytes) else p.tobytes()
        out[at:at + len(b)] = b
        at += len(b)
        del b
    return out


def fill_llamacpp(engine, n: int) -> None:
    """A real SEED_TOKENS prefill, its sequence state repeated to n cells and restored into the context. First
    the state goes through repeated_state unchanged and back, and must give the prefill's own next logits."""
    import llama_cpp
    import numpy as np

    ctx = engine.llm._ctx.ctx

    def restore(state: bytearray, cells: int) -> None:
        engine.llm._ctx.kv_cache_clear()
        arr = (ctypes.c_uint8 * len(state)).from_buffer(state)
        if llama_cpp.llama_state_seq_set_data(ctx, arr, len(state), 0) != len(state):
            raise SystemExit("llama.cpp refused the synthetic state")
        del arr
        assert llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(ctx), 0) == cells - 1
        engine.llm.n_tokens = cells  # llama-cpp-python's position (input_ids are never read back here)

    engine.reset()
    engine.forward(list(range(1000, 1000 + SEED_TOKENS)))
    size = llama_cpp.llama_state_seq_get_size(ctx, 0)
    buf = (ctypes.c_uint8 * size)()
    assert llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0) == size
    seed = bytes(buf)
    del buf
    expected = engine.forward([7])
    restore(repeated_state(seed, SEED_TOKENS), SEED_TOKENS)
    if not np.array_equal(engine.forward([7]), expected):
        raise SystemExit("the state read back by repeated_state does not reproduce the prefill")
    restore(repeated_state(seed, n), n)


# ---------------------------------------------------------------------------------------------------------
# Child: one engine, one KV type, one context


def child(engine: str, kv: str, path: str, n: int, decode: int, threads: int) -> None:
    """The cache holds n tokens when the last one is decoded: filled to n - decode - 1, then the untimed step
    and `decode` timed ones (32K is the 8B's whole native context)."""
    t0, filled = time.perf_counter(), n - decode - 1
    if engine == "onnxruntime":
        from kanana_quant.runtimes.onnx_engine import OnnxEngine, describe

        runtime = OnnxEngine(Path(path), max_seq_len=n, threads=threads, kv_type=kv)
        configuration = describe()
        fill_onnx(runtime, filled, decode + 1)
    else:
        from kanana_quant.loader import open_checkpoint
        from kanana_quant.runtimes.llamacpp_engine import LlamaCppEngine

        runtime = LlamaCppEngine(Path(path), open_checkpoint(Path(path)).config, max_seq_len=n,
                                 threads=threads, kv_type=kv)
        configuration = runtime.configuration + (", flash attention" if kv == "q8_0" else "")
        fill_llamacpp(runtime, filled)
    ready = time.perf_counter() - t0
    runtime.forward([1234])  # untimed: first-call allocations at this context
    t0 = time.perf_counter()
    for token in range(2000, 2000 + decode):
        runtime.forward([token])
    seconds = time.perf_counter() - t0
    print(json.dumps({"engine": engine, "kv_type": kv, "context": n, "decode_tokens": decode,
                      "decode_tok_s": decode / seconds, "rss_gib": status_gib("VmRSS"), "peak_rss_gib": peak_rss_gib(),
                      "setup_s": ready, "configuration": configuration}))


def run(engine: str, kv: str, path: Path, n: int, decode: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "--child", engine, kv, str(path), str(n), str(decode),
                          str(threads)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"engine": engine, "kv_type": kv, "context": n, "failed": out.returncode, "stderr": out.stderr[-1500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def rtn_checkpoint(work: Path, threads: int) -> None:
    """The preset's float model and its RTN checkpoint without the clipping search, where prepare() expects
    them (it would quantize with the search otherwise)."""
    src, out = work / PRESET, work / f"{PRESET}-rtn4-g32"
    if out.exists():
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if not src.exists():
        subprocess.run([sys.executable, "-m", "kanana_quant.cli", "synth", "--preset", PRESET, "-o", str(src)],
                       check=True, env=env)
    code = ("import sys; from kanana_quant.loader import open_model; from kanana_quant.qcheckpoint import "
            "QuantFormat; from kanana_quant.quant.driver import quantize_model; from kanana_quant.quant.options "
            "import QuantOptions; quantize_model(open_model(sys.argv[1]), sys.argv[2], QuantOptions(QuantFormat("
            "'rtn', 4, 32, True), samples=1, seq_len=16, search=False))")
    subprocess.run([sys.executable, "-c", code, str(src), str(out)], check=True, env=env)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        engine, kv, path, n, decode, threads = sys.argv[2:8]
        return child(engine, kv, path, int(n), int(decode), int(threads))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="4096,16384,32768")
    ap.add_argument("--runs", default="onnxruntime:f32,onnxruntime:f16,llama.cpp:q8_0,llama.cpp:f16")
    ap.add_argument("--decode", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/work/scratch"))
    args = ap.parse_args()
    rtn_checkpoint(args.work, args.threads)
    facts = prepare(PRESET, args.work, args.threads, "sym", None, 32)
    facts["grid"] += ", no clipping search"
    from kanana_quant.config import ModelConfig
    from kanana_quant.runtimes.engines import kv_cache_bytes

    cfg = ModelConfig.preset(PRESET)
    rows = []
    for n in map(int, args.contexts.split(",")):
        for spec in args.runs.split(","):
            engine, kv = spec.split(":")
            row = run(engine, kv, facts["paths"][engine], n, args.decode, args.threads)
            row["kv_cache_gib"] = round(kv_cache_bytes(cfg, n, kv) / 2**30, 2)
            row["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "stderr"},
                  row.get("stderr", "")[-300:], flush=True)
    # rows of contexts this run did not measure are kept from an earlier run with the same settings (each row
    # says when it was measured; one context's rows always come from one run)
    redone = {r["context"] for r in rows}
    kept = earlier_rows("long_context", lambda r: r["context"] in redone,
                        lambda old: (old.get("threads"), old.get("decode")) == (args.threads, args.decode))
    rows = sorted(kept + rows, key=lambda r: r["context"])
    print("saved", save("long_context", {"preset": PRESET, "threads": args.threads, "decode": args.decode,
                                         "files_gib": facts["files_gib"], "grid": facts["grid"],
                                         "llama_cpp_build": llamacpp_build(), "protocol": __doc__.split("\n\n")[2],
                                         "rows": rows}))


if __name__ == "__main__":
    main()
