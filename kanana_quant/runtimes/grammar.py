"""Grammar-constrained decoding with llguidance: a JSON schema or a Lark grammar becomes, at each step, the set
of tokens that keep the output inside the grammar; the decode loop (runtimes.generate) masks every other
token before sampling, so output that completes always parses.

Why llguidance (measured in bench/serve.py `grammar`, numbers in README "Serving"): it installs from one
abi3 wheel with no dependencies (xgrammar pulls in torch, transformers and triton; outlines-core has to
compile a whole-vocabulary index per schema before the first token), it computes a mask lazily over a token
trie in tens of microseconds, and its Lark dialect takes inline JSON schemas and special tokens, which is what
Kanana's `<function=NAME>{json}</function>` tool calls need.
"""

from __future__ import annotations

import json

import llguidance
import numpy as np
from llguidance.numpy import fill_next_token_bitmask

from kanana_quant.errors import KananaQuantError

# Compact JSON with the separators Python's json.dumps and most models use: no free whitespace, so a small
# or random model cannot spend its token budget on spaces and newlines inside a JSON value.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _token_count(tokenizer_json: str) -> int:
    """1 + the largest token id a tokenizer.json defines (its model's vocabulary and its added tokens)."""
    data = json.loads(tokenizer_json)
    vocab = data.get("model", {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]  # Unigram: a list, id = index
    ids += [t["id"] for t in data.get("added_tokens") or []]
    return max(ids, default=-1) + 1


class GrammarCompiler:
    """Compiles grammars for one model's tokenizer (building the token trie takes about a second for a
    128K vocabulary, so it is done once). `vocab_size` is the width of the model's logits; a tokenizer may
    count more tokens or fewer, and masks cover exactly the logits (tokens past the tokenizer never allowed,
    tokens past the logits never sampled)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: list[int]):
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=max(vocab_size, _token_count(tokenizer_json)),
                                                eos_token=[i for i in eos_ids if i < vocab_size])

    def json_schema(self, schema: dict, where: str = "schema") -> "Grammar":
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(closed_objects(schema), defaults=JSON_OPTIONS)
        except ValueError as e:
            raise KananaQuantError(f"{where}: {str(e).splitlines()[0][:300]}") from None
        return self._checked(text, where)

    def lark(self, grammar: str, where: str = "grammar") -> "Grammar":
        return self._checked(llguidance.LLMatcher.grammar_from_lark(grammar), where)

    def _checked(self, text: str, where: str) -> "Grammar":
        error = llguidance.LLMatcher.validate_grammar(text, self.tokenizer)
        if error:
            raise KananaQuantError(f"{where}: cannot be enforced ({error.splitlines()[0][:300]})")
        return Grammar(self, text)

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (a special token's name for special tokens)."""
        return self.tokenizer.decode_bytes([token])


class Grammar:
    """A compiled grammar; `start()` gives a fresh matcher for one generation."""

    def __init__(self, compiler: GrammarCompiler, text: str):
        self.compiler, self.text = compiler, text

    def start(self) -> "Constraint":
        return Constraint(self.compiler, self.text)


class Constraint:
    """One generation's position in a grammar, following runtimes.generate.Constraint: which tokens may come
    next, advanced by each sampled token. Not thread-safe; one per request."""

    def __init__(self, compiler: GrammarCompiler, text: str):
        self.vocab_size = compiler.vocab_size
        self.matcher = llguidance.LLMatcher(compiler.tokenizer, text, log_level=0)
        if self.matcher.is_error():
            raise KananaQuantError(f"grammar: {self.matcher.get_error().splitlines()[0][:300]}")
        self._bits = np.zeros((1, (compiler.tokenizer.vocab_size + 31) // 32), np.int32)

    def allowed(self) -> np.ndarray:
        """Boolean mask over the vocabulary: True where the token keeps the output inside the grammar."""
        fill_next_token_bitmask(self.matcher, self._bits)
        if self.matcher.is_error():
            raise RuntimeError(f"grammar matcher failed: {self.matcher.get_error()[:300]}")
        return np.unpackbits(self._bits[0].view(np.uint8), bitorder="little")[: self.vocab_size].view(bool)

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise RuntimeError(f"grammar matcher refused token {token}: {self.matcher.get_error()[:300]}")

    def done(self) -> bool:
        """True once the grammar admits nothing more than the end of the sequence."""
        return self.matcher.is_stopped()


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "dependentSchemas")


def closed_objects(schema):
    """The schema with `"additionalProperties": false` on every object that lists its properties and does not
    say otherwise. JSON Schema lets such objects carry any other key, and a grammar then lets a model invent
    keys without end; closed, every output still validates against the original (OpenAI's strict mode asks
    the same of the schemas it takes)."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: closed_objects(v) for k, v in out[key].items()}
    for key in ("items", "not", "if", "then", "else", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = closed_objects(out[key])
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out \
            and "patternProperties" not in out and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    return out


def inline_json(schema: dict) -> str:
    """A JSON schema as a Lark rule body (`%json {...}`), objects closed, with our JSON options (llguidance
    reads them from the schema's "x-guidance" key, which takes precedence over a grammar's defaults)."""
    return "%json " + json.dumps({**closed_objects(schema), "x-guidance": JSON_OPTIONS}, ensure_ascii=False)
