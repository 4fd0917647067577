"""Task mode of bench/speed.py: decode speed on input-grounded prompts (summarise a passage, answer from a
quoted document, edit a given function) and open-ended chat, with plain decoding, prompt lookup and a draft
model, side by side with llama.cpp's plain decode and its `llama-lookup` example, in one run.

    python bench/speed.py --tasks [--task-models smollm2,kanana-1.5-2.1b] [--engines onnxruntime,llama.cpp]
                          [--modes plain,lookup] [--draft PRESET=DIR] [--max-tokens 128] [--llama-lookup BIN]

Prompts: bench/data/tasks.json (English and Korean, written for this project), each a user turn in the
model's chat template, greedy. Models: SmolLM2-135M-Instruct (real weights: its answers really copy their
context) RTN 4-bit g64, and Kanana shapes with random weights (their text copies nothing; they show what
verification costs). Each engine × mode runs in its own process over every prompt; decode tokens/s counts the
tokens after the first one over the time after it, so prefill is left out (it is reported on its own).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

TASKS = Path(__file__).parent / "data" / "tasks.json"


def prompts() -> list[dict]:
    return json.loads(TASKS.read_text(encoding="utf-8"))["tasks"]


def child(engine: str, path: str, mode: str, threads: int, max_tokens: int, draft: str | None) -> None:
    """One engine in one mode over every prompt: a JSON line per prompt."""
    from kanana_quant.loader import open_model
    from kanana_quant.runtimes.engines import open_engine
    from kanana_quant.runtimes.generate import Decoding
    from kanana_quant.runtimes.sampling import Sampler, SamplingParams
    from kanana_quant.runtimes.speculative import DraftModel, PromptLookup

    loaded = open_model(path)
    runtime = open_engine(loaded, engine, max_seq_len=2048, threads=threads, isolated=False)
    params = SamplingParams()
    drafter = None
    if mode == "lookup":
        drafter = PromptLookup()
    elif mode == "draft":
        draft_loaded = open_model(draft)
        drafter = DraftModel(open_engine(draft_loaded, engine, max_seq_len=2048, threads=threads, isolated=False),
                             Sampler(params))
    tok = loaded.tokenizer
    for i, task in enumerate(prompts()):
        ids = tok.encode_chat([{"role": "user", "content": task["prompt"]}])
        runtime.reset()
        # "margins": plain decoding again, untimed, keeping each step's two best log-probabilities, so a drafted
        # answer that parts from plain greedy's can be shown to part at a near-tie (see identical())
        decoding = Decoding(runtime, ids, max_tokens, params, tok.eos_ids, drafter=drafter,
                            logprobs=2 if mode == "margins" else None)
        t0 = time.perf_counter()
        first, tokens, margins = None, [], []
        for step in decoding:
            if first is None:
                first = time.perf_counter()
            tokens.append(step.token)
            if step.top:
                margins.append(round(step.top[0][1] - step.top[1][1], 4))
        end = time.perf_counter()
        print(json.dumps({"task": i, "kind": task["kind"], "lang": task["lang"], "prompt_tokens": len(ids),
                          "tokens": len(tokens), "prefill_s": first - t0,
                          "decode_tok_s": (len(tokens) - 1) / max(end - first, 1e-9),
                          "proposed": decoding.adaptive.proposed, "accepted": decoding.adaptive.accepted,
                          "forwards": decoding.forwards, "text": tok.decode(tokens)[:200], "token_ids": tokens,
                          **({"margins": margins} if margins else {}),
                          # greedy drafting must not change a token: compared with plain decode's by the parent
                          "tokens_sha1": hashlib.sha1(json.dumps(tokens).encode()).hexdigest()},
                         ensure_ascii=False), flush=True)


def run_child(engine: str, path: Path, mode: str, threads: int, max_tokens: int, draft: Path | None) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "--child", engine, str(path), mode, str(threads),
                          str(max_tokens), str(draft or "")], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return [{"crashed": out.returncode, "stderr": out.stderr[-1500:]}]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def llama_lookup(binary: Path, gguf: Path, threads: int, max_tokens: int, tokenizer) -> list[dict]:
    """llama.cpp's own prompt-lookup example on every prompt (its draft size and n-gram settings as shipped);
    decode speed from its timing report."""
    rows = []
    for i, task in enumerate(prompts()):
        text = tokenizer.apply_chat_template([{"role": "user", "content": task["prompt"]}])
        out = subprocess.run([str(binary), "-m", str(gguf), "-p", text, "-n", str(max_tokens), "-t", str(threads),
                              "--temp", "0", "-c", "2048"], capture_output=True, text=True,
                             errors="replace")  # a token may end inside a UTF-8 character
        log = out.stdout + out.stderr
        speed = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s", log)
        accept = re.search(r"accept\s*=\s*([\d.]+)%", log)
        rows.append({"task": i, "kind": task["kind"], "lang": task["lang"], "returncode": out.returncode,
                     "decode_tok_s": float(speed.group(3)) if speed else None,
                     "tokens": int(speed.group(1)) if speed else None,
                     "accept_pct": float(accept.group(1)) if accept else None,
                     **({} if speed else {"log_tail": log[-800:]})})
    return rows


def identical(rows: list[dict], plain: list[dict], margins: list[dict] | None = None) -> dict:
    """How many answers are token for token plain greedy decoding's, and where the others part from it: the
    first differing position and, with a margins run (plain greedy again, with log-probabilities), plain's
    gap between its two best tokens there in nats (a near-tie, when the engine computes a several-token
    forward's logits a little differently from a one-token forward's)."""
    same, parted = 0, []
    for i, (r, p) in enumerate(zip(rows, plain)):
        if r.get("tokens_sha1") is not None and r.get("tokens_sha1") == p.get("tokens_sha1"):
            same += 1
            continue
        a, b = r.get("token_ids") or [], p.get("token_ids") or []
        at = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        entry = {"task": i, "position": at}
        gaps = (margins[i].get("margins") if margins and i < len(margins) else None) or []
        if margins and margins[i].get("token_ids") == b and at < len(gaps):
            entry["plain_top2_gap"] = gaps[at]
        parted.append(entry)
    return {"identical": f"{same}/{len(plain)}", "parted": parted}


def summarise(rows: list[dict]) -> dict:
    """Mean decode tokens/s per kind of task, and acceptance over the kind's drafts."""
    kinds: dict = {}
    for r in rows:
        if r.get("decode_tok_s") is None:
            continue
        k = kinds.setdefault(r["kind"], {"tok_s": [], "proposed": 0, "accepted": 0})
        k["tok_s"].append(r["decode_tok_s"])
        k["proposed"] += r.get("proposed", 0)
        k["accepted"] += r.get("accepted", 0)
    return {kind: {"decode_tok_s": round(sum(v["tok_s"]) / len(v["tok_s"]), 2),
                   "acceptance": round(v["accepted"] / v["proposed"], 3) if v["proposed"] else None}
            for kind, v in kinds.items()}


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--child":
    engine_, path_, mode_, threads_, max_tokens_, draft_ = sys.argv[2:8]
    child(engine_, path_, mode_, int(threads_), int(max_tokens_), draft_ or None)
