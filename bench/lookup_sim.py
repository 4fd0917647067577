"""How the prompt-lookup policy (runtimes/speculative.py: PromptLookup + Adaptive) would do on the task prompts,
without timing noise: plain greedy answers are decoded once, then the policy's drafting is replayed on them with
a verify cost model, a k-token verify costing 1 + b·k plain steps.

    python bench/lookup_sim.py [--model DIR] [--b 0.1,0.5]

Greedy drafting keeps exactly the drafted tokens that match the plain answer, so the replay gives the forwards
each answer would take; the ratio is plain steps over the policy's cost (decode speed-up over plain decoding,
prefill and the first token left out, as in bench/speed.py --tasks). The answers come from onnxruntime on
SmolLM2 RTN 4-bit g64 (bench/speed.py's export) unless --model names another ONNX export; the same engine's b
is measured too (median of 15 forwards of 1 and of 9 tokens after a 300-token context) and replayed with the
--b values. Beside each, the bound of lookup drafting itself: a drafter that drafted exactly the part of the
longest-match continuation (1–8-token matches, up to 32 tokens) that the answer keeps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import tasks  # noqa: E402


def verify_cost(engine, repeats: int = 15) -> float:
    """b: what each extra token of a forward costs, in single-token forwards."""
    import time

    engine.reset()
    engine.forward(list(range(1000, 1300)))
    base, seconds = engine.pos, {}
    for k in (1, 9):
        runs = []
        for _ in range(repeats):
            engine.pos = base
            t0 = time.perf_counter()
            engine.forward(list(range(2000, 2000 + k)), all_logits=True)
            runs.append(time.perf_counter() - t0)
        seconds[k] = statistics.median(runs)
    return (seconds[9] - seconds[1]) / (8 * seconds[1])


def plain_answers(model: Path, max_tokens: int) -> tuple[list[dict], float]:
    from kanana_quant.loader import open_model
    from kanana_quant.runtimes.engines import open_engine
    from kanana_quant.runtimes.generate import Decoding
    from kanana_quant.runtimes.sampling import SamplingParams

    loaded = open_model(str(model))
    engine = open_engine(loaded, "onnxruntime", max_seq_len=2048, isolated=False)
    out = []
    for task in tasks.prompts():
        ids = loaded.tokenizer.encode_chat([{"role": "user", "content": task["prompt"]}])
        engine.reset()
        answer = [s.token for s in Decoding(engine, ids, max_tokens, SamplingParams(), loaded.tokenizer.eos_ids)]
        out.append({"kind": task["kind"], "prompt": ids, "answer": answer})
    return out, verify_cost(engine)


def replay(answers: list[dict], b: float, oracle: bool = False) -> dict[str, float]:
    """Mean speed-up over plain decoding per kind of task, drafting with today's PromptLookup and Adaptive; or,
    with `oracle`, the bound of lookup drafting itself: each step drafts exactly the part of the longest-match
    continuation (1–8-token matches, up to 32 tokens) that the answer keeps, so no verification is wasted."""
    from kanana_quant.runtimes.speculative import Adaptive, PromptLookup

    lookup = PromptLookup(max_ngram=8, min_ngram=1) if oracle else PromptLookup()
    speedups: dict = {}
    for a in answers:
        answer, history = a["answer"], a["prompt"] + a["answer"][:1]
        adaptive, i, cost = Adaptive(k_max=8, k=2), 1, 0.0  # as Decoding starts it
        while i < len(answer):
            room = len(answer) - i - 1
            k = min(32, room) if oracle else min(adaptive.size(), room)
            draft = lookup.propose(history, k).tokens[:k] if k > 0 else []
            kept = 0
            while kept < len(draft) and draft[kept] == answer[i + kept]:
                kept += 1
            step = 1 + b * (kept if oracle else len(draft))
            adaptive.record(len(draft), kept, step)
            cost, history, i = cost + step, history + answer[i:i + kept + 1], i + kept + 1
        speedups.setdefault(a["kind"], []).append((len(answer) - 1) / cost if cost else 1.0)
    return {kind: round(statistics.mean(v), 2) for kind, v in speedups.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("/work/scratch/smollm2-rtn4-g64-onnx"))
    ap.add_argument("--b", default="0.1,0.5", help="verify costs per drafted token to replay, in plain steps")
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    answers, measured = plain_answers(args.model, args.max_tokens)
    print(f"measured b = {measured:.3f} (threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'default')})")
    for b in [round(measured, 3)] + [float(x) for x in args.b.split(",")]:
        print(f"b = {b}: speed-up over plain decode", replay(answers, b), "; a drafter that knew how much "
              "of each lookup holds:", replay(answers, b, oracle=True), flush=True)


if __name__ == "__main__":
    main()
