"""Tokenizers in GGUF metadata (tokenizer.ggml.*), both ways, and llama.cpp's pre-tokenizers.

One table of llama.cpp's pre-tokenizer regexes serves the reader (it rebuilds a `tokenizers` tokenizer from
a GGUF's vocabulary), the writer (it names a tokenizer's pre-tokenizer by how it splits a probe text, as
llama.cpp fingerprints tokenizers) and synth (the Llama-3 split its tokenizers are trained with).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import gguf
from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from kanana_quant import kanana
from kanana_quant.config import ModelConfig
from kanana_quant.errors import KananaQuantError
from kanana_quant.gguf.header import read_gguf_header
from kanana_quant.tokenizer import Tokenizer

_UNUSED_TOKEN = re.compile(r"<\|kq_unused_\d+\|>")

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

# Pre-tokenizer regexes by tokenizer.ggml.pre, as llama.cpp's llama-vocab.cpp applies them: each regex
# splits the pieces of the one before, keeping what it does not match, i.e. tokenizers' Split "isolated".
# Llama-3's tokenizer.json writes its contractions case-insensitively, (?i:'s|'t|...); llama.cpp spells the
# cases out, which splits every text alike except around the two non-ASCII letters that fold to s and k.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_GROUPS = [
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), (_LLAMA3,)),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), (r"\p{N}", _GPT2)),
    (("gpt2", "mpt", "olmo", "jais"), (_GPT2,)),
    (("qwen2", "stablelm2", "deepseek-r1-qwen"), (_QWEN2,)),
    (("default",), (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
]
PRE_TOKENIZER_SPLITS = {name: splits for group, splits in _PRE_GROUPS for name in group}
# llama.cpp matches a whole pre-token that is in the vocabulary before merging only for these (as the
# Llama-3 tokenizer.json's "ignore_merges": true does).
IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"}


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the spelling of every byte-level BPE token."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _token_lists(meta: dict, where: str) -> tuple[list[str], list[int], list[tuple[str, str]]]:
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise KananaQuantError(f"{where}: GGUF has no tokenizer.ggml.tokens; it carries no tokenizer")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list) or not isinstance(types, list) or len(types) != len(tokens):
        raise KananaQuantError(f"{where}: byte-level BPE tokenizer without merges (or with mismatched token "
                               "types); the GGUF is incomplete")
    if not isinstance(tokens[0], str) or not isinstance(merges[0] if merges else "", str):
        raise KananaQuantError(f"{where}: tokenizer.ggml.tokens and .merges must be arrays of strings; the GGUF "
                               "is corrupt")
    pairs = [tuple(m.split(" ")) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise KananaQuantError(f"{where}: a tokenizer merge is not two tokens separated by one space; corrupt")
    return tokens, list(types), pairs


def pre_tokenizer(pre: str, where: str = "tokenizer") -> pre_tokenizers.PreTokenizer:
    """llama.cpp's pre-tokenizer `pre` as a `tokenizers` pre-tokenizer: its regex splits, then byte-level
    spelling (the Split + ByteLevel sequence of a Llama-3 tokenizer.json)."""
    splits = PRE_TOKENIZER_SPLITS.get(pre)
    if splits is None:
        raise KananaQuantError(f"{where}: pre-tokenizer {pre!r} is not supported; supported: "
                               f"{', '.join(sorted(PRE_TOKENIZER_SPLITS))}")
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])


def _post_processor(tokens: list[str], meta: dict, add_bos: bool):
    steps = [processors.ByteLevel(trim_offsets=False)]
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    add_bos = add_bos and bos is not None
    if add_bos or add_eos:
        single, pair, special = "$A", "$A $B", {}
        if add_bos:
            single, pair = f"{tokens[bos]} {single}", f"{tokens[bos]} $A {tokens[bos]} $B"
            special[tokens[bos]] = bos
        if add_eos:
            single, pair = f"{single} {tokens[eos]}", f"{pair} {tokens[eos]}"
            special[tokens[eos]] = eos
        steps.append(processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(special.items())))
    return processors.Sequence(steps)


def _build_bpe(tokens: list[str], types: list[int], pairs, pre: str, where: str) -> HFTokenizer:
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    # Added tokens are stored as plain text (llama.cpp's pre-normalized form); inside the BPE model every
    # token must be spelled in the byte alphabet, as transformers' GGUF converter does too.
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        spelled = token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(spelled, i)
    try:
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in IGNORE_MERGES,
                                     fuse_unk=False, byte_fallback=False))
    except Exception as e:  # tokenizers raises a bare Exception for merges outside the vocabulary
        raise KananaQuantError(f"{where}: tokenizer does not load ({str(e).splitlines()[0][:160]})") from None
    tok.pre_tokenizer = pre_tokenizer(pre, where)
    tok.decoder = decoders.ByteLevel()
    in_alphabet = [set(t) <= alphabet for t in tokens]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind, ok in zip(tokens, types, in_alphabet) if kind == CONTROL and ok])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind, ok in zip(tokens, types, in_alphabet) if kind == USER_DEFINED and ok])
    return tok


def gguf_tokenizer(meta: dict, where: str) -> Tokenizer:
    """The byte-level BPE tokenizer stored in a GGUF's tokenizer.ggml.* metadata, as our Tokenizer."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise KananaQuantError(f"{where}: GGUF tokenizer model {model!r} is not supported; kanana-quant builds "
                               "byte-level BPE ('gpt2') tokenizers, as Llama-3 and Kanana use")
    tokens, types, pairs = _token_lists(meta, where)
    pre = meta.get("tokenizer.ggml.pre") or "default"
    if not isinstance(pre, str):
        raise KananaQuantError(f"{where}: tokenizer.ggml.pre must be a string, got {repr(pre)[:40]}")
    bos, eos_ids = special_ids(meta, where)
    for token_id in [bos, *eos_ids]:
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise KananaQuantError(f"{where}: special token id {token_id} is outside the {len(tokens)}-token "
                                   "vocabulary")
    tok = _build_bpe(tokens, types, pairs, pre, where)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", pre in IGNORE_MERGES))
    tok.post_processor = _post_processor(tokens, meta, add_bos)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    config = {"bos_token": tokens[bos] if bos is not None else None,
              "eos_token": tokens[eos] if isinstance(eos, int) else None,
              "chat_template": meta.get("tokenizer.chat_template"),
              "add_bos_token": add_bos}
    return Tokenizer(tok, config, where, extra_eos_ids=eos_ids)


def read_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer a GGUF file carries (from its header alone: no tensors needed)."""
    return gguf_tokenizer(read_gguf_header(path).metadata, str(path))


def special_ids(meta: dict, where: str) -> tuple[int | None, list[int]]:
    """(bos, eos ids) from tokenizer.ggml.*: eos, eot and eom all end a turn."""
    def token_id(kind: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{kind}_token_id")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise KananaQuantError(f"{where}: tokenizer.ggml.{kind}_token_id must be an integer, got "
                                   f"{repr(value)[:40]}; the GGUF is corrupt")
        return value

    eos = [token_id(k) for k in ("eos", "eot", "eom")]
    return token_id("bos"), list(dict.fromkeys(i for i in eos if i is not None))


# ---------------------------------------------------------------------------------------------------------
# Writing a tokenizer

# llama.cpp's own pre-tokenizer fingerprint text (convert_hf_to_gguf.py chktxt), plus Korean.
_PRE_PROBE = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶‍🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
              "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
              "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
              "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL 카카오의 카나나는 123,456원!\r\n")
_PRE_CANDIDATES = ("llama-bpe", "smollm", "gpt2", "qwen2")


def _pre_tokenizer_name(tok, where: str) -> str:
    """tokenizer.ggml.pre by behaviour, as llama.cpp fingerprints tokenizers: the candidate whose splits
    cut the probe text exactly as this tokenizer's pre-tokenizer does."""
    ours = tok.pre_tokenizer
    if ours is None or tok.normalizer is not None:
        raise KananaQuantError(f"{where}: tokenizer has {'no pre-tokenizer' if ours is None else 'a normalizer'}; "
                               "GGUF export supports byte-level BPE tokenizers like Llama-3's")
    pieces = [p for p, _ in ours.pre_tokenize_str(_PRE_PROBE)]
    for pre in _PRE_CANDIDATES:
        if [p for p, _ in pre_tokenizer(pre).pre_tokenize_str(_PRE_PROBE)] == pieces:
            return pre
    raise KananaQuantError(f"{where}: pre-tokenizer matches none of llama.cpp's {', '.join(_PRE_CANDIDATES)}; "
                           "its GGUF would tokenize differently")


def _vocab(tok, vocab_size: int, where: str) -> tuple[list[str], list[int]]:
    """Tokens by id with llama.cpp token types; ids the tokenizer lacks are [PAD{i}] as the converter writes."""
    added = tok.get_added_tokens_decoder()
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for text, i in tok.get_vocab(with_added_tokens=True).items():
        if i >= vocab_size:
            raise KananaQuantError(f"{where}: token {text!r} has id {i}, beyond the model's {vocab_size} embeddings")
        tokens[i] = text
        if i in added:
            types[i] = int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif _UNUSED_TOKEN.fullmatch(text):
            types[i] = int(gguf.TokenType.UNUSED)
        else:
            types[i] = int(gguf.TokenType.NORMAL)
    return tokens, types


def _merges(tok, where: str) -> list[str]:
    model = json.loads(tok.to_str()).get("model", {})
    if model.get("type") != "BPE":
        raise KananaQuantError(f"{where}: tokenizer model is {model.get('type')!r}; GGUF export writes byte-level "
                               "BPE ('gpt2') tokenizers")
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def add_tokenizer(w: gguf.GGUFWriter, tokenizer: Tokenizer, cfg: ModelConfig) -> None:
    """Write `tokenizer` as tokenizer.ggml.* metadata, as convert_hf_to_gguf.py does for a Llama-3 vocabulary."""
    tok, where = tokenizer._tok, tokenizer.source
    pre = _pre_tokenizer_name(tok, where)
    tokens, types = _vocab(tok, cfg.vocab_size, where)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(_merges(tok, where))
    bos = tokenizer.bos_id
    eos = tokenizer.token_id(tokenizer.eos_token)
    if eos is None and cfg.eos_token_ids:
        eos = cfg.eos_token_ids[0]
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    for add, special in ((w.add_eot_token_id, kanana.EOT_TOKEN), (w.add_eom_token_id, kanana.EOM_TOKEN)):
        if (i := tokenizer.token_id(special)) is not None:
            add(i)
    probe = tok.encode("a", add_special_tokens=True).ids
    w.add_add_bos_token(bos is not None and probe[:1] == [bos])
    w.add_add_eos_token(eos is not None and probe[-1:] == [eos])
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)
