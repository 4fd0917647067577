"""The command line as users and scripts meet it: stdout carries results only, errors are one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import SAMPLE_TEXT
from kanana_quant.eval import perplexity
from kanana_quant.loader import open_model
from kanana_quant.runtimes.numpy_engine import NumpyEngine


def cli(*args, input=None, env=None):
    return subprocess.run([sys.executable, "-m", "kanana_quant.cli", *map(str, args)], capture_output=True,
                          text=True, input=input, timeout=300, env=env)


def test_info(tiny_dense):
    result = cli("info", tiny_dense, "--json")
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["architecture"] == "LlamaForCausalLM" and facts["head_dim"] == 32
    assert facts["parameters"] == 2 * (2 * 96 + 96 * 128 * 2 + 96 * 64 * 2 + 3 * 96 * 192) + 1280 * 96 + 96


def test_generate_prints_only_the_greedy_continuation(tiny_dense):
    import torch
    import transformers

    prompt = "카나나 says"
    result = cli("generate", tiny_dense, "--prompt", prompt, "--max-tokens", 12, "--temperature", 0)
    assert result.returncode == 0, result.stderr
    tok = open_model(str(tiny_dense)).tokenizer
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dense, dtype=torch.float32)
    ids = tok.encode(prompt, add_special_tokens=True)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                          eos_token_id=tok.eos_ids, pad_token_id=0)[0, len(ids):].tolist()
    assert result.stdout == tok.decode(out) + "\n"
    assert "tokens/s" in result.stderr


def test_generate_with_a_draft_model_and_without_lookup_prints_the_same(tiny_dense):
    args = ["generate", tiny_dense, "--prompt", "The model reads the model", "--max-tokens", 24]
    lookup, plain = cli(*args), cli(*args, "--no-lookup")
    drafted = cli(*args, "--draft", tiny_dense)  # the model drafting for itself: every draft accepted
    assert lookup.returncode == plain.returncode == drafted.returncode == 0, drafted.stderr
    assert plain.stdout.strip() and lookup.stdout == plain.stdout == drafted.stdout
    logs = [" ".join(r.stderr.split()) for r in (lookup, plain, drafted)]
    assert "drafted tokens accepted" in logs[0] and "drafted" not in logs[1]
    assert re.search(r"(\d+) of \1 drafted tokens accepted", logs[2]), logs[2]


def test_draft_model_with_another_tokenizer_is_one_line(tiny_dense):
    from kanana_quant.smollm import smollm2_gguf

    result = cli("generate", tiny_dense, "--prompt", "hi", "--draft", smollm2_gguf())
    assert result.returncode == 2 and "its tokenizer differs" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_eval_last_line_and_json(tiny_dense, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT * 4, encoding="utf-8")
    plain = cli("eval", tiny_dense, "--text", text, "--ctx", 32)
    assert plain.returncode == 0, plain.stderr
    last = plain.stdout.strip().splitlines()[-1]
    assert last.startswith("perplexity: ")
    loaded = open_model(str(tiny_dense))
    expected = perplexity(NumpyEngine(loaded.weights), loaded.tokenizer.encode(SAMPLE_TEXT * 4), 32)["perplexity"]
    assert float(last.split()[1]) == pytest.approx(expected, rel=1e-4)
    as_json = json.loads(cli("eval", tiny_dense, "--text", text, "--ctx", 32, "--json").stdout)
    assert as_json["perplexity"] == pytest.approx(expected, rel=1e-9)


def test_chat_session_multi_turn_and_reset(tiny_dense):
    result = cli("chat", tiny_dense, "--max-tokens", 5, "--temperature", 0,
                 input="안녕하세요\nsecond turn\n/reset\nthird\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("> ") >= 4 and "history cleared" in result.stderr


def test_chat_session_reuses_cache_and_matches_fresh_prefill(tiny_dense):
    from kanana_quant.runtimes.generate import ChatSession
    from kanana_quant.runtimes.sampling import SamplingParams

    loaded = open_model(str(tiny_dense))
    engine = NumpyEngine(loaded.weights)
    params = SamplingParams(temperature=1.0, seed=7)
    session = ChatSession(engine, loaded.tokenizer, params, 6)
    first = "".join(session.reply("first question"))
    fed = []
    forward = engine.forward
    engine.forward = lambda ids, all_logits=False: fed.append(len(ids)) or forward(ids, all_logits)
    second = "".join(session.reply("두 번째 질문"))
    full = len(loaded.tokenizer.encode_chat(session.messages[:3]))
    assert first and second and len(session.messages) == 4
    assert fed[0] < full - 5  # only the new turn was prefilled; earlier turns came from the cache
    fresh = ChatSession(NumpyEngine(loaded.weights), loaded.tokenizer, params, 6)
    fresh.messages = session.messages[:2]  # same history, empty cache
    assert "".join(fresh.reply("두 번째 질문")) == second


def test_interrupted_reply_keeps_session_usable(tiny_dense):
    """Ctrl-C in `chat` closes the reply iterator: the partial reply stays in the history, the next turn works."""
    from kanana_quant.runtimes.generate import ChatSession
    from kanana_quant.runtimes.sampling import SamplingParams

    loaded = open_model(str(tiny_dense))
    session = ChatSession(NumpyEngine(loaded.weights), loaded.tokenizer, SamplingParams(temperature=1.0, seed=1), 40)
    reply = session.reply("tell me a long story")
    pieces = [next(reply), next(reply)]
    reply.close()
    streamed = "".join(pieces)
    assert streamed.strip()  # text the user saw, not whitespace the check below would accept anywhere
    assert session.messages[-1]["role"] == "assistant"
    assert session.messages[-1]["content"].startswith(streamed)
    assert session.engine.pos == len(session.cached) > 0
    assert "".join(session.reply("and then?"))
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]


def test_hub_id_offline_is_one_line(tmp_path):
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = cli("info", "kakao/kanana-nano-2.1b-instruct", env=env)
    assert result.returncode == 2
    assert "local directory" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_demo_runs(tmp_path):
    result = cli("demo", "--model", "tiny", "-o", tmp_path / "demo", "--max-tokens", 4, "--samples", 4,
                 "--seq-len", 64)
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("│")]
    engines = {line.split("│")[2].strip() for line in table[1:]}
    assert engines == {"numpy", "onnxruntime", "llama.cpp"}, result.stdout
    assert "skipped" not in result.stdout
    assert "demo outputs:" in result.stdout
    demo = tmp_path / "demo"
    assert (demo / "tiny-kanana-gptq-4bit" / "model.safetensors").is_file()
    assert (demo / "tiny-kanana-gptq-4bit.Q4_0.gguf").is_file()
    assert (demo / "tiny-kanana-gptq-4bit-onnx" / "model.onnx").is_file()
    # the same quantized weights in three engines: greedy replies agree (tiny model, 4 tokens)
    replies = [line for line in result.stdout.splitlines() if line.strip().startswith("→")]
    assert len(replies) == 2 * 4 and replies[2] == replies[4] == replies[6]


@pytest.mark.parametrize("args, message", [
    (["info", "/no/such/dir"], "no such file or directory"),
    (["generate", "{tiny}", "--prompt", "x", "--top-p", "1.5"], "--top-p"),
    (["generate", "{tiny}", "--prompt", "x", "--engine", "tensorrt"], "--engine"),
    (["generate", "{tiny}", "--prompt", "x", "--max-tokens", "0"], "--max-tokens"),
    (["generate", "{tiny}", "--prompt", "x", "--engine", "llama.cpp"], "runs .gguf files"),
    (["generate", "{tiny}", "--prompt", "x", "--engine", "onnxruntime"], "ONNX export directory"),
    (["eval", "{tiny}", "--text", "/no/such.txt"], "no such text file"),
    (["synth", "-o", "{tmp}/x"], "exactly one of"),
    (["quantize", "{tiny}", "-o", "{tmp}/q", "--shrink", "1.5"], "--shrink must be between 0"),
    (["synth", "-o", "{tmp}/x", "--preset", "kanana-99b"], "unknown model preset"),
])
def test_bad_invocations_exit_2_with_one_line(tiny_dense, tmp_path, args, message):
    args = [a.format(tiny=tiny_dense, tmp=tmp_path) for a in args]
    result = cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_runtime_path_never_imports_torch(tiny_dense, tmp_path):
    """A runtime-only install has no torch: loading a model and generating must not need it."""
    script = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from kanana_quant.cli import main
sys.argv = ["kanana-quant", "generate", {str(tiny_dense)!r}, "--prompt", "hi", "--max-tokens", "3"]
main()
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_generate_and_eval_in_llamacpp_engine(tiny_dense, tmp_path):
    """The same F32 GGUF through --engine llama.cpp and --engine numpy: same greedy text, same perplexity."""
    gguf = tmp_path / "m.gguf"
    assert cli("export", "gguf", tiny_dense, "-o", gguf, "--type", "F32").returncode == 0
    outs = {e: cli("generate", gguf, "--prompt", "카나나 says", "--max-tokens", 12, "--engine", e) for e in
            ("numpy", "llama.cpp")}
    assert all(r.returncode == 0 for r in outs.values()), [r.stderr for r in outs.values()]
    assert outs["numpy"].stdout == outs["llama.cpp"].stdout and outs["numpy"].stdout.strip()
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT * 8, encoding="utf-8")
    ppl = {e: json.loads(cli("eval", gguf, "--text", text, "--ctx", 64, "--json", "--engine", e).stdout)
           for e in ("numpy", "llama.cpp")}
    assert ppl["llama.cpp"]["engine"] == "llama.cpp"
    # llama.cpp's default F16 KV cache is the only difference from our float32 runtime here.
    assert ppl["llama.cpp"]["perplexity"] == pytest.approx(ppl["numpy"]["perplexity"], rel=1e-3)
