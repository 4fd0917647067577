"""Tokenizer, chat template and streaming decode, with transformers as the oracle."""

from __future__ import annotations

import json

import pytest
import transformers

from conftest import SAMPLE_TEXT
from kanana_quant import kanana
from kanana_quant.errors import KananaQuantError
from kanana_quant.tokenizer import REPLACEMENT_CHAR, Tokenizer

TEXTS = [
    SAMPLE_TEXT,
    "안녕하세요! 오늘 서울 날씨는 맑고 기온은 18도입니다.",
    "Emoji mix: 🚀🇰🇷👩‍👩‍👧 and 한글 ㄱㄴㄷ ㅏㅑ, Hanja 漢字, math ∑x², tabs\tand\nnewlines\n\n",
    "   leading spaces, trailing   ",
    "<|eot_id|> is text here",
]
CHAT = [
    {"role": "system", "content": kanana.DEFAULT_SYSTEM_PROMPT},
    {"role": "user", "content": "  카나나, 자기소개 해줘.  "},
    {"role": "assistant", "content": "안녕하세요, 저는 카나나입니다. Nice to meet you!"},
    {"role": "user", "content": "Write one line of Python."},
]


@pytest.fixture(scope="module")
def toks(tiny_dense):
    return Tokenizer.from_dir(tiny_dense), transformers.AutoTokenizer.from_pretrained(tiny_dense)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_ids_match_transformers(toks, text):
    ours, hf = toks
    ids = ours.encode(text)
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ours.encode(text, add_special_tokens=True) == hf.encode(text)
    assert ours.encode(text, add_special_tokens=True)[0] == ours.bos_id


def test_special_tokens_follow_llama3_layout(toks):
    ours, _ = toks
    first = ours.token_id(kanana.BOS_TOKEN)
    assert ours.token_id(kanana.EOS_TOKEN) == first + 1
    assert ours.token_id(kanana.EOT_TOKEN) == first + 9
    assert ours.vocab_size == first + kanana.NUM_SPECIAL_TOKENS
    assert ours.token_id(kanana.EOT_TOKEN) in ours.eos_ids


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_identical_to_transformers(toks, add_generation_prompt):
    ours, hf = toks
    text = ours.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt)
    assert text == hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text.startswith(kanana.BOS_TOKEN + "<|start_header_id|>system<|end_header_id|>\n\n")
    hf_ids = hf.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=add_generation_prompt)
    hf_ids = hf_ids["input_ids"] if hasattr(hf_ids, "keys") else hf_ids
    assert ours.encode_chat(CHAT, add_generation_prompt) == list(hf_ids)


def test_fallback_template_is_kanana_format(tiny_dense, tmp_path):
    for name in ("tokenizer.json",):
        (tmp_path / name).write_bytes((tiny_dense / name).read_bytes())
    config = json.loads((tiny_dense / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tiny_dense)
    assert tok.apply_chat_template(CHAT) == hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('echo pwned') }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}x",
    "{{ messages.append(1) }}",
])
def test_hostile_chat_template_fails_cleanly(tiny_dense, template):
    tok = Tokenizer.from_dir(tiny_dense)
    tok.chat_template = template
    with pytest.raises(KananaQuantError, match="chat template"):
        tok.apply_chat_template(CHAT)


def test_stream_decoder_never_emits_broken_utf8(toks):
    ours, _ = toks
    text = "카카오 카나나 모델은 한국어 문장을 천천히 생성합니다. 漢字와 이모지 🚀🇰🇷도 섞여 있어요."
    ids = ours.encode(text)
    # The test only means something if some tokens end mid-character.
    assert any(REPLACEMENT_CHAR in ours.decode(ids[:i]) for i in range(1, len(ids)))
    stream = ours.stream()
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert all(REPLACEMENT_CHAR not in p for p in pieces)
    assert "".join(pieces) == text


def test_missing_and_corrupt_tokenizer(tmp_path):
    with pytest.raises(KananaQuantError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(KananaQuantError, match="cannot load"):
        Tokenizer.from_dir(tmp_path)
