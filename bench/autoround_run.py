"""AutoRound's own GGUF export of a float Hugging Face directory, for bench/gguf_quality.py's AutoRound rows. Runs
in AutoRound's own venv (bench/common.py's bench_venv; it needs another transformers than ours), so it imports
nothing from kanana_quant.

    python bench/autoround_run.py MODEL_DIR CALIB.npy OUT.gguf --type q4_k_m [--iters 0] [--alg-ext]

CALIB.npy: the [samples, seq_len] int64 token windows our quantizers and llama-imatrix calibrate on; AutoRound
takes them as its dataloader (one window per batch), so every method sees the same tokens. --iters 0 is
AutoRound's recommended GGUF mode (its own RTN search, no sign-gradient tuning); its default is 200 iterations
per block, which it recommends for 3-bit types; --alg-ext adds its SignRoundV2 GGUF variant (`enable_alg_ext`,
tuning only), its most accurate and costliest GGUF mode. Writes OUT.gguf and OUT.gguf.json: versions, settings
and seconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from auto_round import AutoRound
from transformers import AutoModelForCausalLM, AutoTokenizer

PACKAGES = ("auto-round", "transformers", "torch", "gguf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("calib", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--type", required=True, help="AutoRound's GGUF scheme without 'gguf:', e.g. q4_k_m")
    ap.add_argument("--iters", type=int, default=0)
    ap.add_argument("--alg-ext", action="store_true", help="AutoRound's enable_alg_ext (needs --iters > 0)")
    args = ap.parse_args()
    if args.alg_ext and args.iters == 0:
        ap.error("--alg-ext tunes: give --iters > 0 (AutoRound's default is 200)")

    torch.manual_seed(0)
    ids = np.load(args.calib, allow_pickle=False)
    windows = [torch.as_tensor(w[None], dtype=torch.long) for w in ids]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    scheme = f"gguf:{args.type}"
    started = time.perf_counter()
    ar = AutoRound(model, tokenizer, scheme=scheme, iters=args.iters, nsamples=len(windows), seqlen=ids.shape[1],
                   batch_size=1, dataset=windows, device_map="cpu", enable_alg_ext=args.alg_ext)
    with tempfile.TemporaryDirectory(dir=args.out.parent) as tmp:
        ar.quantize_and_save(tmp, format=scheme)
        made = sorted(Path(tmp).rglob("*.gguf"))
        if len(made) != 1:
            raise SystemExit(f"AutoRound {scheme}: expected one .gguf in its output, found {[p.name for p in made]}")
        made[0].replace(args.out)
    seconds = time.perf_counter() - started
    report = {"versions": {p: version(p) for p in PACKAGES}, "scheme": scheme, "iters": args.iters,
              "alg_ext": args.alg_ext,
              "nsamples": len(windows), "seqlen": int(ids.shape[1]), "seconds": seconds}
    args.out.with_suffix(args.out.suffix + ".json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
