"""Tokenizer: HF `tokenizers` for tokenizer.json, sandboxed chat templates, UTF-8-safe streaming decode."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from kanana_quant import kanana
from kanana_quant.errors import KananaQuantError, read_json_object

MAX_TOKENIZER_BYTES = 64 << 20
REPLACEMENT_CHAR = "\ufffd"


def _token_text(value) -> str | None:
    # tokenizer_config.json writes special tokens either as strings or as AddedToken dicts.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace() without underscore attributes, so templates cannot reach Python internals."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat template sets underscore attribute {name!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja2's own tojson escapes HTML characters; chat templates (and transformers) expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def chat_environment() -> ImmutableSandboxedEnvironment:
    """The sandbox chat templates run in: the same helpers transformers offers, nothing more."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _Namespace
    return env


class Tokenizer:
    """A model's tokenizer.json + tokenizer_config.json (special tokens, chat template)."""

    def __init__(self, tokenizer: HFTokenizer, config: dict | None = None, source: str = "tokenizer",
                 extra_eos_ids: Sequence[int] = ()):
        self._tok = tokenizer
        self.source = source
        config = config or {}
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_id = self.token_id(self.bos_token)
        eos = {self.token_id(self.eos_token), self.token_id(kanana.EOT_TOKEN), self.token_id(kanana.EOM_TOKEN)}
        self.eos_ids = sorted(i for i in eos | set(extra_eos_ids) if i is not None)
        self.chat_template = self._pick_template(config.get("chat_template")) or kanana.CHAT_TEMPLATE
        self._template = None

    @classmethod
    def from_dir(cls, model_dir: str | Path, extra_eos_ids: Sequence[int] = ()) -> "Tokenizer":
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise KananaQuantError(f"{model_dir}: no tokenizer.json; kanana-quant needs the fast tokenizer file")
        if path.stat().st_size > MAX_TOKENIZER_BYTES:
            raise KananaQuantError(f"{path}: over {MAX_TOKENIZER_BYTES >> 20} MiB; refusing to parse it")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise KananaQuantError(f"{path}: cannot load ({str(e).splitlines()[0][:200]}); re-download it") from None
        cfg_path = model_dir / "tokenizer_config.json"
        config = read_json_object(cfg_path, MAX_TOKENIZER_BYTES) if cfg_path.is_file() else {}
        template_file = model_dir / "chat_template.jinja"
        if template_file.is_file() and "chat_template" not in config:
            config["chat_template"] = template_file.read_text(encoding="utf-8")
        return cls(tok, config, str(path), extra_eos_ids)

    def to_files(self) -> dict[str, str]:
        """tokenizer.json and tokenizer_config.json that reproduce this tokenizer (for GGUF sources)."""
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "clean_up_tokenization_spaces": False,
                  "chat_template": self.chat_template}
        return {"tokenizer.json": self._tok.to_str(),
                "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False)}

    @staticmethod
    def _pick_template(value) -> str | None:
        if isinstance(value, list):  # [{name, template}, ...]: transformers uses the "default" one
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            value = named.get("default")
        return value if isinstance(value, str) else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if self._template is None:
            try:
                self._template = chat_environment().from_string(self.chat_template)
            except jinja2.TemplateError as e:
                raise KananaQuantError(f"{self.source}: chat template does not compile ({e})") from None
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        except jinja2.exceptions.SecurityError as e:
            raise KananaQuantError(f"{self.source}: chat template tried an unsafe operation ({e}); "
                                   "refusing it") from None
        except jinja2.TemplateError as e:
            raise KananaQuantError(f"{self.source}: chat template failed ({e})") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The template writes <|begin_of_text|> itself, so nothing more is added here.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns generated ids into text pieces, never emitting half of a multi-byte UTF-8 character.

    Byte-level BPE splits a Korean syllable (3 bytes) across tokens; decoding such a prefix gives U+FFFD.
    We re-decode a short window of recent tokens and hold text back while it ends in U+FFFD (the scheme
    used by text-generation-inference and vLLM).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window re-decoded each step
        self.read = 0  # ids up to here have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        emitted = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if len(text) > len(emitted) and not text.endswith(REPLACEMENT_CHAR):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(emitted):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end of generation (a truly broken tail shows as U+FFFD)."""
        emitted = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(emitted):]
