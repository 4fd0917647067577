"""What a smaller KV cache costs in perplexity, on long real text: SmolLM2-135M-Instruct (RTN 4-bit g64) scored
in windows of --ctx tokens of held-out English and Korean, with each engine's KV-cache types side by side.

    python bench/kv_cache.py [--ctx 2048] [--windows 4] [--work DIR]

numpy: f32 and f16 on the quantized checkpoint; llama.cpp: f32, f16 and q8_0 on its Q4_0 GGUF (the same codes).
Reports perplexity and the cache's bytes at --ctx for Kanana-1.5-8B's shape, the model the issue sizes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import earlier_rows, heldout_text, save  # noqa: E402
from speed import smollm2_exports  # noqa: E402

from kanana_quant.config import ModelConfig  # noqa: E402
from kanana_quant.eval import perplexity  # noqa: E402
from kanana_quant.loader import open_model  # noqa: E402
from kanana_quant.runtimes.engines import KV_TYPES, kv_cache_bytes, open_engine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/work/scratch"))
    ap.add_argument("--engines", default="numpy,llama.cpp", help="numpy (tens of minutes per KV type on 2 cores) "
                    "and/or llama.cpp; rows of engines not run are kept from an earlier run of the same --ctx and "
                    "--windows")
    args = ap.parse_args()
    engines = args.engines.split(",")
    paths = {"numpy": args.work / "smollm2-rtn4-g64", **smollm2_exports(args.work, None)}
    eight_b = ModelConfig.preset("kanana-1.5-8b")
    rows = []
    for engine in engines:
        loaded = open_model(str(paths[engine]))
        texts = {lang: loaded.tokenizer.encode(heldout_text(lang))[: args.windows * args.ctx] for lang in ("en", "ko")}
        for kv in KV_TYPES[engine]:
            runtime = open_engine(loaded, engine, max_seq_len=args.ctx, threads=args.threads, kv_type=kv)
            t0 = time.perf_counter()
            ppl = {lang: perplexity(runtime, ids, args.ctx)["perplexity"] for lang, ids in texts.items()}
            rows.append({"engine": engine, "kv_type": kv, **ppl, "seconds": round(time.perf_counter() - t0, 1),
                         "kanana_8b_cache_gib_32k": round(kv_cache_bytes(eight_b, 32768, kv) / 2**30, 2)})
            print(rows[-1], flush=True)
            _save(args, rows)  # after every row: a run stopped early keeps what it measured


def _save(args, rows: list[dict]) -> None:
    redone = {(r["engine"], r["kv_type"]) for r in rows}
    kept = earlier_rows("kv_cache", lambda r: (r["engine"], r["kv_type"]) in redone,
                        lambda old: old.get("ctx") == args.ctx and old.get("windows") == args.windows)
    print("saved", save("kv_cache", {"model": "SmolLM2-135M-Instruct RTN 4-bit g64", "ctx": args.ctx,
                                     "windows": args.windows, "rows": kept + rows}))


if __name__ == "__main__":
    main()
