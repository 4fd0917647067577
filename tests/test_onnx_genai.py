"""onnxruntime-genai — the engine ONNX language models ship in on phones and edge boxes (C, C#, Java,
Objective-C APIs) — runs our exports as they are: `og.Model` + `og.Generator` on dense and MoE (Mixtral
naming) GPTQ checkpoints, single prompts and a right-padded batch, against our onnxruntime engine (same
graph, our IO binding) and the numpy runtime (proved against transformers). Also its tokenizer against ours."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime_genai as og
import pytest

from conftest import SAMPLE_TEXT
from kanana_quant.exporters.onnx import export_onnx
from kanana_quant.loader import open_model
from kanana_quant.runtimes.generate import generate
from kanana_quant.runtimes.numpy_engine import NumpyEngine
from kanana_quant.runtimes.onnx_engine import OnnxEngine
from kanana_quant.runtimes.sampling import SamplingParams

STEPS = 16
PROMPTS = ["카나나는 한국어와 영어를", "Kanana is a bilingual model. It runs offline on a laptop, even 大韓民國"]


@pytest.fixture(scope="module")
def exports(model_dirs, tmp_path_factory):
    """variant -> (quantized checkpoint, export at accuracy level 0 (exact to numpy), export with the defaults
    (int8 activations, 8-bit lm_head))."""
    from kanana_quant.qcheckpoint import QuantFormat
    from kanana_quant.quant.driver import quantize_model
    from kanana_quant.quant.options import QuantOptions

    root, made = tmp_path_factory.mktemp("genai"), {}
    for variant in ("dense-tied", "moe-mixtral"):
        opts = QuantOptions(QuantFormat("gptq", 4, 32, True), samples=4, seq_len=32)
        src = quantize_model(open_model(str(model_dirs(variant))), root / f"{variant}-gptq", opts)
        exact = export_onnx(open_model(str(src)), root / f"{variant}-exact", accuracy_level=0, lm_head="float").path
        fast = export_onnx(open_model(str(src)), root / f"{variant}-fast").path
        made[variant] = (src, exact, fast)
    return made


def genai_greedy(model: og.Model, prompts: list[list[int]], steps: int, pad: int) -> tuple[list, list]:
    """onnxruntime-genai's greedy decode of a batch (right-padded with pad, as its own encode_batch pads):
    the tokens of each row and the logits genai sampled each step from."""
    params = og.GeneratorParams(model)
    width = max(len(p) for p in prompts)
    params.set_search_options(max_length=width + steps, do_sample=False, batch_size=len(prompts))
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([p + [pad] * (width - len(p)) for p in prompts], np.int32))
    tokens, logits = [[] for _ in prompts], []
    for _ in range(steps):
        logits.append(np.array(generator.get_logits())[:, -1])
        generator.generate_next_token()
        for row, token in enumerate(generator.get_next_tokens()):
            tokens[row].append(int(token))
    return tokens, logits


def our_greedy(engine, prompt: list[int], steps: int) -> tuple[list, list]:
    """The same loop on one of our engines: the token chosen from each step's logits is fed back."""
    engine.reset()
    tokens, logits = [], []
    step = engine.forward(prompt)
    for _ in range(steps):
        logits.append(step)
        tokens.append(int(np.argmax(step)))
        step = engine.forward([tokens[-1]])
    return tokens, logits


def test_genai_config_is_what_genai_reads(exports):
    """Only keys onnxruntime-genai's schema accepts (it refuses the whole file on one unknown key); our own
    metadata lives in kanana_quant.json; MoE declares a model type genai knows."""
    for variant, (_, exact, _) in exports.items():
        config = json.loads((exact / "genai_config.json").read_text())
        assert set(config) == {"model", "search"} and config["model"]["type"] == "llama"
        assert set(config["model"]["decoder"]["inputs"]) == {"input_ids", "attention_mask", "past_key_names",
                                                             "past_value_names"}
        assert json.loads((exact / "kanana_quant.json").read_text())["version"] == 2
        og.Model(str(exact))  # parses the config and opens the session


@pytest.mark.parametrize("variant", ["dense-tied", "moe-mixtral"])
def test_genai_greedy_equals_our_engines(exports, variant):
    src, exact, fast = exports[variant]
    tok = open_model(str(src)).tokenizer
    prompt = tok.encode(PROMPTS[1], add_special_tokens=True)
    pad = json.loads((exact / "genai_config.json").read_text())["model"]["pad_token_id"]
    # accuracy level 0: genai, our onnxruntime engine and the numpy runtime on the checkpoint agree
    theirs, their_logits = genai_greedy(og.Model(str(exact)), [prompt], STEPS, pad)
    ours, our_logits = our_greedy(OnnxEngine(exact, threads=1), prompt, STEPS)
    oracle, oracle_logits = our_greedy(NumpyEngine(open_model(str(src)).weights), prompt, STEPS)
    assert theirs[0] == ours == oracle and len(set(ours)) > 1, (theirs, ours, oracle)
    assert np.abs(np.stack(their_logits)[:, 0] - np.stack(oracle_logits)).max() <= 1e-4
    assert np.abs(np.stack(our_logits) - np.stack(oracle_logits)).max() <= 1e-4
    # the default export (int8 activations, 8-bit head): genai and `--engine onnxruntime` pick the same tokens
    theirs, _ = genai_greedy(og.Model(str(fast)), [prompt], STEPS, pad)
    assert theirs[0] == list(generate(OnnxEngine(fast, threads=1), prompt, STEPS, SamplingParams(temperature=0.0)))


@pytest.mark.parametrize("variant", ["dense-tied", "moe-mixtral"])
def test_genai_batch_with_padding_equals_each_prompt_alone(exports, variant):
    """Two prompts of different lengths in one batch (the shorter right-padded, attention mask 0 there): each
    row's greedy tokens and logits equal the numpy runtime's on that prompt alone."""
    src, exact, _ = exports[variant]
    tok = open_model(str(src)).tokenizer
    prompts = [tok.encode(p, add_special_tokens=True) for p in PROMPTS]
    assert len(prompts[0]) < len(prompts[1])
    pad = json.loads((exact / "genai_config.json").read_text())["model"]["pad_token_id"]
    theirs, their_logits = genai_greedy(og.Model(str(exact)), prompts, STEPS, pad)
    oracle = NumpyEngine(open_model(str(src)).weights)
    for row, prompt in enumerate(prompts):
        tokens, logits = our_greedy(oracle, prompt, STEPS)
        assert theirs[row] == tokens
        assert np.abs(np.stack(their_logits)[:, row] - np.stack(logits)).max() <= 1e-4


def test_genai_tokenizer_equals_ours(exports):
    """genai's tokenizer (onnxruntime-extensions) reads the export's tokenizer files: without special tokens (its
    default) and with them (`add_special_tokens`, BOS first, as Kanana needs and our engine adds) it gives our
    ids, and its chat template renders what ours does."""
    src, exact, _ = exports["dense-tied"]
    ours = open_model(str(src)).tokenizer
    tokenizer = og.Tokenizer(og.Model(str(exact)))
    assert list(tokenizer.encode(SAMPLE_TEXT)) == ours.encode(SAMPLE_TEXT)
    tokenizer.update_options(add_special_tokens="true")
    with_bos = [int(i) for i in tokenizer.encode(SAMPLE_TEXT)]
    assert with_bos == ours.encode(SAMPLE_TEXT, add_special_tokens=True) and with_bos[0] == ours.bos_id
    assert json.loads((exact / "tokenizer_config.json").read_text())["add_bos_token"] is True
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "카나나를 소개해 줘"}]
    rendered = tokenizer.apply_chat_template(json.dumps(messages, ensure_ascii=False), add_generation_prompt=True)
    assert rendered == ours.apply_chat_template(messages, add_generation_prompt=True)
