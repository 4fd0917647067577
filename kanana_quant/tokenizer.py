"""Tokenizer: HF `tokenizers` for tokenizer.json, sandboxed chat templates, UTF-8-safe streaming decode."""

from __future__ import annotations

import json
import re
import signal
import threading
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from kanana_quant import kanana
from kanana_quant.errors import KananaQuantError, confined, read_json_object, read_text

# Files that travel with a model's weights and config: the tokenizer, its chat template, generation defaults.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
MAX_TOKENIZER_BYTES = 64 << 20
MAX_TEMPLATE_BYTES = 1 << 20
REPLACEMENT_CHAR = "\ufffd"
# A chat template comes from a stranger's model: besides the sandbox (no Python internals), its strings
# and numbers stay small, and rendering gets bounded memory and time.
MAX_TEMPLATE_ITEMS = 1 << 22  # length of any string or list a template operator builds
TEMPLATE_MEMORY_BYTES = 1 << 30
TEMPLATE_SECONDS = 10
_BIG_FORMAT = re.compile(r"\d{7,}")  # a width or precision of a million or more


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


def _too_big(what: str) -> jinja2.exceptions.SecurityError:
    return jinja2.exceptions.SecurityError(f"{what} would exceed {MAX_TEMPLATE_ITEMS} items")


def _check_format(fmt) -> None:
    if isinstance(fmt, str) and _BIG_FORMAT.search(fmt):
        raise jinja2.exceptions.SecurityError("format width or precision over a million")


def _check_size_args(name: str, args) -> None:
    if any(isinstance(a, int) and abs(a) > MAX_TEMPLATE_ITEMS for a in args):
        raise _too_big(name)


_PADDING_METHODS = {"ljust", "rjust", "center", "zfill", "expandtabs"}
_SIZED_FILTERS = {"center", "indent", "wordwrap", "truncate"}


class _ChatSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox plus size checks on the operators and methods that multiply memory: `*`, `**`,
    `+` and `%` are checked before they run (which also keeps jinja2 from folding them at compile time),
    as are str padding and format calls and the sized filters."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_TEMPLATE_ITEMS:
                    raise _too_big("repetition")
        elif operator == "**":
            if isinstance(left, (int, float)) and isinstance(right, (int, float)) and abs(right) > 1024:
                raise jinja2.exceptions.SecurityError("power with an exponent over 1024")
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)) \
                    and len(left) + len(right) > MAX_TEMPLATE_ITEMS:
                raise _too_big("concatenation")
        elif operator == "%":
            _check_format(left)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's own signature
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format in its own formatter
        owner, name = getattr(target, "__self__", None), getattr(target, "__name__", "")
        if isinstance(owner, str):
            if name in _PADDING_METHODS:
                _check_size_args(name, args)
            elif name in ("format", "format_map"):
                _check_format(owner)
        return super().call(__context, __obj, *args, **kwargs)


def _sized_filter(name: str, fn):
    def checked(*args, **kwargs):
        _check_size_args(name, list(args[1:]) + list(kwargs.values()))
        return fn(*args, **kwargs)

    return checked


def _format_filter(fn):
    def checked(value, *args, **kwargs):
        _check_format(value)
        return fn(value, *args, **kwargs)

    return checked


class _TemplateTimeout(Exception):
    pass


@contextmanager
def _bounded(seconds: float = TEMPLATE_SECONDS, memory: int = TEMPLATE_MEMORY_BYTES) -> Iterator[None]:
    """Run a block with at most `memory` more bytes of address space and `seconds` of wall time, where the
    platform allows (Linux main thread, no other timer running); elsewhere only the sandbox's size checks."""
    restore = []
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * resource.getpagesize()
        cap = used + memory
        if soft == resource.RLIM_INFINITY or soft > cap:
            resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
            restore.append(lambda: resource.setrlimit(resource.RLIMIT_AS, (soft, hard)))
    except (ImportError, OSError, ValueError):
        pass
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer") \
            and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0):
        def expired(signum, frame):
            raise _TemplateTimeout()

        previous = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        restore.append(lambda: (signal.setitimer(signal.ITIMER_REAL, 0), signal.signal(signal.SIGALRM, previous)))
    try:
        yield
    finally:
        for undo in reversed(restore):
            undo()


def chat_environment() -> ImmutableSandboxedEnvironment:
    """The sandbox chat templates run in: the same helpers transformers offers, nothing more."""
    env = _ChatSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    for name in _SIZED_FILTERS:
        env.filters[name] = _sized_filter(name, env.filters[name])
    env.filters["format"] = _format_filter(env.filters["format"])
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
        try:
            tok = HFTokenizer.from_str(read_text(confined(model_dir, path.name, str(model_dir)), MAX_TOKENIZER_BYTES))
        except KananaQuantError:
            raise
        except BaseException as e:  # tokenizers raises a bare Exception, or a PanicException, on malformed files
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise KananaQuantError(f"{path}: cannot load ({reason}); re-download it") from None
        cfg_path = model_dir / "tokenizer_config.json"
        config = {}
        if cfg_path.is_file():
            config = read_json_object(confined(model_dir, cfg_path.name, str(model_dir)), MAX_TOKENIZER_BYTES)
        template_file = model_dir / "chat_template.jinja"
        if template_file.is_file() and "chat_template" not in config:
            config["chat_template"] = read_text(confined(model_dir, template_file.name, str(model_dir)),
                                                MAX_TEMPLATE_BYTES)
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
        def reason(e: BaseException) -> str:
            return (str(e).splitlines() or [""])[0][:200] or type(e).__name__

        stage = "does not compile"
        try:
            with _bounded():
                if self._template is None:
                    self._template = chat_environment().from_string(self.chat_template)
                stage = "failed"
                return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                             bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                             **kwargs)
        except jinja2.exceptions.SecurityError as e:
            raise KananaQuantError(f"{self.source}: chat template tried an unsafe operation ({reason(e)}); "
                                   "refusing it") from None
        except _TemplateTimeout:
            raise KananaQuantError(f"{self.source}: chat template ran over {TEMPLATE_SECONDS} s; refusing it") from None
        except MemoryError:
            raise KananaQuantError(f"{self.source}: chat template needed over {TEMPLATE_MEMORY_BYTES >> 20} MiB; "
                                   "refusing it") from None
        except Exception as e:  # a template is foreign code: any failure in it is the model's, not ours
            raise KananaQuantError(f"{self.source}: chat template {stage} ({type(e).__name__}: {reason(e)})") from None

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


def side_files(model_path: Path, tokenizer: Tokenizer) -> dict[str, str]:
    """The TOKENIZER_FILES of a model as text, to write beside converted weights: copied from a model
    directory, or rebuilt from `tokenizer` for a GGUF source (which carries it in metadata). Writers read
    them up front, so a broken one fails before hours of work, not after."""
    if not model_path.is_dir():
        return tokenizer.to_files()
    files = {}
    for fname in TOKENIZER_FILES:
        path = model_path / fname
        if path.is_file():
            try:
                files[fname] = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError) as e:
                raise KananaQuantError(f"{path}: cannot be read as UTF-8 text ({type(e).__name__}); "
                                       "fix or remove it") from None
    return files
