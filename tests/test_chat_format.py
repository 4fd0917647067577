"""Kanana-1.5's tool-call format: the prompt it renders, calls parsed back out of text (whole, or arriving in
any split while streaming), and the grammar that makes a forced call parse and validate."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from kanana_quant import kanana
from kanana_quant.chat_format import (CallArguments, CallStart, Content, ToolCallParser, parse_reply, render_kanana,
                                      render_prompt, tool_grammar)
from kanana_quant.errors import KananaQuantError
from kanana_quant.loader import open_model
from kanana_quant.runtimes.engines import open_engine
from kanana_quant.runtimes.generate import Decoding
from kanana_quant.runtimes.grammar import GrammarCompiler
from kanana_quant.runtimes.sampling import SamplingParams
from kanana_quant.synth import TINY, synth_model
from kanana_quant.tokenizer import Tokenizer
from tokenizers import Tokenizer as HFTokenizer

WEATHER = {"name": "get_weather", "description": "날씨",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                          "required": ["city"], "additionalProperties": False}}


def test_render_kanana_conversation_with_a_tool_round_trip():
    messages = [{"role": "system", "content": "You are Kanana."}, {"role": "user", "content": "서울 날씨?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "서울"}'}},
                    {"id": "c2", "function": {"name": "python", "arguments": '{"code": "print(1)"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "맑음"}]
    text = render_kanana(messages, [WEATHER, {"name": "python", "description": "run code"}])
    h = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"  # noqa: E731
    assert text.startswith(kanana.BOS_TOKEN + h("system") + "Environment: ipython\n\n"
                           "You have access to the following functions:\n\n"
                           "Use the function 'get_weather' to '날씨'\n" + json.dumps(WEATHER, ensure_ascii=False))
    assert text.endswith(h("system") + "You are Kanana.<|eot_id|>" + h("user") + "서울 날씨?<|eot_id|>"
                         + h("assistant") + '<function=get_weather>{"city": "서울"}</function>'
                         + "<|python_tag|>print(1)<|eom_id|>" + h("ipython") + "맑음<|eot_id|>" + h("assistant"))


def test_render_prompt_picks_the_template(tiny_dense):
    tok = open_model(str(tiny_dense)).tokenizer
    plain = [{"role": "user", "content": "hi"}]
    assert render_prompt(tok, plain) == tok.apply_chat_template(plain)  # no tools: the model's own template
    assert render_prompt(tok, plain, [WEATHER]) == render_kanana(plain, [WEATHER])  # its template ignores tools
    takes_tools = Tokenizer(HFTokenizer.from_str(tok.to_files()["tokenizer.json"]),
                            {"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"
                                              "{{ tools | length }} tools"})
    assert render_prompt(takes_tools, plain, [WEATHER]) == "hi1 tools"  # a template that takes tools gets them


def test_parse_whole_replies():
    call = '<function=get_weather>{"city": "서울 </function>", "n": [1, {"a": "}"}]}</function>'
    content, calls = parse_reply("먼저 확인할게요. " + call + '<function=f>{}</function>')
    assert content == "먼저 확인할게요. "
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == \
           [("get_weather", {"city": "서울 </function>", "n": [1, {"a": "}"}]}), ("f", {})]
    assert parse_reply("a < b, <fun and <function") == ("a < b, <fun and <function", [])
    assert parse_reply("no calls <b>here</b>") == ("no calls <b>here</b>", [])
    assert len({c["id"] for c in calls}) == 2 and all(c["id"].startswith("call_") for c in calls)


def test_streaming_parse_equals_whole_parse_for_any_split():
    text = ('생각 중 <fun 아님> ' + '<function=get_weather>{"city": "부산\\"항", "x": [{}]}</function>' * 2
            + " 끝 <function")
    whole_content, whole_calls = parse_reply(text)
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 12)))
        parser, events = ToolCallParser(), []
        for a, b in zip([0] + cuts, cuts + [len(text)]):
            events += parser.feed(text[a:b])
        events += parser.finish()
        content = "".join(e.text for e in events if isinstance(e, Content))
        starts = [e for e in events if isinstance(e, CallStart)]
        args = {}
        for e in events:
            if isinstance(e, CallArguments):
                args[e.index] = args.get(e.index, "") + e.text
        assert content == whole_content
        assert [(s.name, args[s.index]) for s in starts] == [(c["name"], c["arguments"]) for c in whole_calls]


def test_python_tag_call_streams_json_arguments():
    parser = ToolCallParser()
    events = parser.feed("코드: ") + parser.python_tag() + parser.feed('print("안녕")\n') + parser.feed("x = 1") \
        + parser.finish()
    assert "".join(e.text for e in events if isinstance(e, Content)) == "코드: "
    assert json.loads(parser.calls[0]["arguments"]) == {"code": 'print("안녕")\nx = 1'}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = synth_model(tmp_path_factory.mktemp("fmt") / "m", {**TINY["dense"], "max_position_embeddings": 2048},
                       seed=3)
    loaded = open_model(str(path))
    tok = loaded.tokenizer
    return loaded, open_engine(loaded, "numpy"), GrammarCompiler(tok.to_files()["tokenizer.json"],
                                                                  loaded.config.vocab_size, tok.eos_ids)


@pytest.mark.parametrize("choice", ["required", "get_weather"])
def test_forced_calls_from_a_random_model_validate(tiny, choice):
    loaded, engine, compiler = tiny
    tok = loaded.tokenizer
    grammar = compiler.lark(tool_grammar([WEATHER], choice, parallel=False))
    prompt = tok.encode(render_prompt(tok, [{"role": "user", "content": "날씨"}], [WEATHER]))
    for seed in range(10):
        decoding = Decoding(engine, prompt, 150, SamplingParams(temperature=1.0, seed=seed), tok.eos_ids, 0,
                            grammar.start())
        content, calls = parse_reply(tok.decode([s.token for s in decoding]))
        assert decoding.finish_reason == "stop" and content == "" and len(calls) == 1
        assert calls[0]["name"] == "get_weather"
        jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["parameters"])


def test_auto_choice_lets_text_through_but_not_a_broken_call(tiny):
    loaded, engine, compiler = tiny
    grammar = compiler.lark(tool_grammar([WEATHER], "auto"))
    tok = loaded.tokenizer
    for text, ok in [("그냥 답장", True), ('<function=get_weather>{"city": "x"}</function>', True),
                     ("<function=nope>{}</function>", False), ('텍스트 <function=get_weather>{"c": 1}', False)]:
        constraint = grammar.start()
        accepted = True
        for token in tok.encode(text):
            if not constraint.allowed()[token]:
                accepted = False
                break
            constraint.accept(token)
        assert accepted == ok, text


def test_named_tool_must_exist():
    with pytest.raises(KananaQuantError, match="not among the tools"):
        tool_grammar([WEATHER], "nope")


def test_objects_are_closed_so_a_model_cannot_invent_keys(tiny):
    """An object schema that lists its properties but does not forbid others: the grammar closes it, so forced
    arguments carry only declared keys (and still validate against the open schema)."""
    loaded, engine, compiler = tiny
    tok = loaded.tokenizer
    open_tool = {"name": "lookup", "parameters": {"type": "object", "properties": {
        "q": {"type": "string", "maxLength": 6}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}}}
    grammar = compiler.lark(tool_grammar([open_tool], "lookup"))
    prompt = tok.encode(render_prompt(tok, [{"role": "user", "content": "찾아줘"}], [open_tool]))
    for seed in range(8):
        decoding = Decoding(engine, prompt, 150, SamplingParams(temperature=1.0, seed=seed), tok.eos_ids, 0,
                            grammar.start())
        _, calls = parse_reply(tok.decode([s.token for s in decoding]))
        arguments = json.loads(calls[0]["arguments"])
        assert decoding.finish_reason == "stop" and set(arguments) <= {"q", "n"}
        jsonschema.validate(arguments, open_tool["parameters"])


@pytest.mark.parametrize("width", [1100, 1280, 1400])
def test_masks_cover_exactly_the_logits(tiny, width):
    """Logits narrower or wider than the tokenizer (a model padded its embedding, or trimmed it): the mask
    has the logits' width and never allows a token the tokenizer does not define."""
    loaded, _, _ = tiny
    tok = loaded.tokenizer
    compiler = GrammarCompiler(tok.to_files()["tokenizer.json"], width, tok.eos_ids)
    constraint = compiler.json_schema({"type": "object", "properties": {"a": {"type": "string"}}}).start()
    for token in tok.encode('{"a": "'):
        allowed = constraint.allowed()
        assert allowed.shape == (width,) and not allowed[tok.vocab_size:].any() and allowed[token]
        constraint.accept(token)
