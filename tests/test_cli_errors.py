"""Bad invocations, one table: every one must end with exit code 2 (bad input) or 1 (the system failed
under a correct command) and exactly one line on stderr naming the problem, and leave no output behind.

The CLI runs in-process through `main()` (the console entry point; conftest's `run`), which maps exceptions to exit
codes; test_cli.py and test_interrupts.py run it as a real subprocess.
"""

from __future__ import annotations

import errno
import json
import shutil
import struct

import pytest


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _bad_model(kind: str, tiny, tmp):
    """A model directory (or file) broken in one way a downloaded model can be."""
    d = tmp / f"bad-{kind}"
    if kind == "pickle":
        d.mkdir()
        shutil.copy(tiny / "config.json", d)
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    elif kind == "escaping-shard":
        _copy(tiny, d)
        from kanana_quant.safetensors_io import SafetensorsFile

        names = SafetensorsFile(d / "model.safetensors").tensors
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {n: "../../etc/model.safetensors" for n in names}}))
    elif kind == "symlinked-tokenizer":
        _copy(tiny, d)
        outside = tmp / "elsewhere.json"
        shutil.move(d / "tokenizer.json", outside)
        (d / "tokenizer.json").symlink_to(outside)
    elif kind == "truncated-safetensors":
        _copy(tiny, d)
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[:len(data) // 2])
    elif kind == "markup-in-tensor-name":  # the message quotes the name; rich must not read it as markup
        _copy(tiny, d)
        blob = json.dumps({"[/x]": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}).encode()
        (d / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(8))
    elif kind == "deep-config":
        _copy(tiny, d)
        (d / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "huge-layer-count":
        _copy(tiny, d)
        _edit_json(d / "config.json", num_hidden_layers=10 ** 9)
    elif kind == "string-head-dim":
        _copy(tiny, d)
        _edit_json(d / "config.json", head_dim="32")
    elif kind == "hostile-template":
        _copy(tiny, d)
        _edit_json(d / "tokenizer_config.json", chat_template="{{ cycler.__init__.__globals__.os.system('id') }}")
    elif kind == "memory-bomb-template":
        _copy(tiny, d)
        _edit_json(d / "tokenizer_config.json", chat_template="{{ 'x' * 10 ** 10 }}")
    elif kind == "garbage.gguf":
        d = tmp / "garbage.gguf"
        d.write_bytes(b"GGML" + bytes(60))
    elif kind == "weights.bin":
        d = tmp / "weights.bin"
        d.write_bytes(b"\x80\x04")
    elif kind == "not-utf8.txt":
        d = tmp / "not-utf8.txt"
        d.write_bytes(b"\xff\xfe\xfa text")
    elif kind == "a-file":
        d = tmp / "a-file"
        d.write_text("x")
    else:
        raise ValueError(kind)
    return d


# (id, argv with {tiny}/{tmp}/{bad:KIND} placeholders, exit code, the expected one-line message)
CASES = [
    # flags and arguments
    ("no-such-command", ["frobnicate"], 2, "error: No such command 'frobnicate'. (see "),
    ("unknown-option", ["quantize", "{tiny}", "-o", "{tmp}/q", "--bitz", "3"], 2,
     "error: No such option: --bitz (Possible options: --bits) (see "),
    ("missing-argument", ["export", "gguf"], 2, "error: Missing argument 'src'. (see "),
    ("not-an-integer", ["generate", "{tiny}", "--prompt", "x", "--max-tokens", "many"], 2,
     "error: Invalid value for '--max-tokens'"),
    ("bits", ["quantize", "{tiny}", "-o", "{tmp}/q", "--bits", "5"], 2,
     "error: --bits 5 is not supported; choose one of (2, 3, 4, 8)"),
    ("method", ["quantize", "{tiny}", "-o", "{tmp}/q", "--method", "squeezellm"], 2,
     "error: --method 'squeezellm' is not supported; choose one of: rtn, gptq, awq"),
    ("samples", ["quantize", "{tiny}", "-o", "{tmp}/q", "--samples", "0"], 2,
     "error: --samples must be >= 1 and --seq-len >= 8, got 0 and 512"),
    ("group-divides", ["quantize", "{tiny}", "-o", "{tmp}/q", "--group-size", "128"], 2,
     "does not divide the 96 input columns"),
    ("seq-len-past-context", ["quantize", "{tiny}", "-o", "{tmp}/q", "--group-size", "32", "--seq-len", "100000"],
     2, "error: --seq-len 100000 is longer than the model's context of 512 tokens; lower it"),
    ("calibration-ram", ["quantize", "{tiny}", "-o", "{tmp}/q", "--group-size", "32", "--samples", "300000000",
                         "--seq-len", "512"], 2, "GiB is available; lower --samples or --seq-len"),
    ("nothing-to-resume", ["quantize", "{tiny}", "-o", "{tmp}/q", "--group-size", "32", "--resume", "--method",
                           "rtn"], 2, "nothing to resume"),
    ("output-exists", ["quantize", "{tiny}", "-o", "{tiny}", "--group-size", "32", "--method", "rtn"], 2,
     "already exists; choose another output or remove it first"),
    ("gguf-type", ["export", "gguf", "{tiny}", "-o", "{tmp}/x.gguf", "--type", "Q3_X"], 2, "Q3_X"),
    ("gguf-no-folder", ["export", "gguf", "{tiny}", "-o", "{tmp}/no/such/x.gguf", "--type", "F16"], 2,
     "does not exist; create it or choose another output"),
    ("gguf-is-dir", ["export", "gguf", "{tiny}", "-o", "{tmp}", "--type", "F16"], 2, "is a directory"),
    ("max-tokens", ["generate", "{tiny}", "--prompt", "x", "--max-tokens", "0"], 2,
     "error: --max-tokens must be at least 1, got 0"),
    ("top-p", ["generate", "{tiny}", "--prompt", "x", "--top-p", "1.5"], 2, "--top-p"),
    ("engine", ["generate", "{tiny}", "--prompt", "x", "--engine", "tensorrt"], 2, "--engine"),
    ("synth-choice", ["synth", "-o", "{tmp}/x"], 2, "error: give exactly one of --preset"),
    ("synth-preset", ["synth", "-o", "{tmp}/x", "--preset", "kanana-99b"], 2, "unknown model preset 'kanana-99b'"),
    ("synth-dtype", ["synth", "-o", "{tmp}/x", "--tiny", "dense", "--dtype", "F8"], 2,
     "error: --dtype must be F32, F16 or BF16, got F8"),
    ("eval-no-text", ["eval", "{tiny}", "--text", "{tmp}/no.txt"], 2, "no such text file"),
    ("eval-not-utf8", ["eval", "{tiny}", "--text", "{bad:not-utf8.txt}"], 2, "not UTF-8 text"),
    # paths and files
    ("no-such-model", ["info", "/no/such/dir"], 2,
     "error: /no/such/dir: no such file or directory (and not a Hugging Face id like kakao/NAME)"),
    ("output-under-a-file", ["synth", "--tiny", "dense", "-o", "{bad:a-file}/sub/model"], 2, "Not a directory"),
    ("pickle-weights", ["info", "{bad:pickle}"], 2, "only pickle weights (pytorch_model.bin), which kanana-quant "
                                                   "never loads because unpickling can run code; convert them"),
    ("escaping-shard", ["info", "{bad:escaping-shard}"], 2, "is outside the model directory; refusing it"),
    ("symlinked-tokenizer", ["generate", "{bad:symlinked-tokenizer}", "--prompt", "x"], 2,
     "leads outside the model directory"),
    ("truncated-safetensors", ["info", "{bad:truncated-safetensors}"], 2, "the file is truncated or corrupt"),
    ("markup-in-message", ["info", "{bad:markup-in-tensor-name}"], 2, "corrupt entry for tensor '[/x]'"),
    ("deep-json", ["info", "{bad:deep-config}"], 2, "not valid JSON (nested too deeply)"),
    ("layer-count", ["info", "{bad:huge-layer-count}"], 2, "'num_hidden_layers' is 1000000000, over 16777216"),
    ("typed-config", ["info", "{bad:string-head-dim}"], 2, "'head_dim' must be a positive integer, got '32'"),
    ("not-gguf", ["info", "{bad:garbage.gguf}"], 2, "not a GGUF file (starts with b'GGML', not b'GGUF')"),
    ("not-gguf-suffix", ["info", "{bad:weights.bin}"], 2, "not a .gguf file"),
    ("template-escape", ["generate", "{bad:hostile-template}", "--prompt", "x", "--chat"], 2,
     "chat template tried an unsafe operation"),
    ("template-memory", ["generate", "{bad:memory-bomb-template}", "--prompt", "x", "--chat"], 2,
     "chat template tried an unsafe operation (repetition would exceed"),
]


@pytest.mark.parametrize("args, code, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_invocation(run, tiny_dense, tmp_path, args, code, message):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    bad = {}

    def fill(arg: str) -> str:
        if arg.startswith("{bad:"):
            kind = arg[5:arg.index("}")]
            if kind not in bad:
                bad[kind] = _bad_model(kind, tiny_dense, tmp_path)
            return str(bad[kind]) + arg[arg.index("}") + 1:]
        return arg.format(tiny=tiny_dense, tmp=out_dir)

    status, stdout, stderr = run(*[fill(a) for a in args])
    assert status == code, stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("error: ") and message in stderr, stderr
    assert stdout == ""
    assert list(out_dir.iterdir()) == [], "a failed command left output behind"


def test_not_enough_disk_for_output(run, tiny_dense, tmp_path, monkeypatch):
    """Checked before any work: synth, export gguf (and quantize, via its work estimate) refuse up front."""
    import shutil as shutil_module

    real = shutil_module.disk_usage
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: real(p)._replace(free=1000))
    for args in (["synth", "--tiny", "dense", "-o", tmp_path / "m"],
                 ["export", "gguf", tiny_dense, "-o", tmp_path / "m.gguf", "--type", "F16"],
                 ["quantize", tiny_dense, "-o", tmp_path / "q", "--group-size", "32", "--method", "rtn"]):
        status, _, stderr = run(*args)
        assert status == 2 and "GB is free; free some space or write elsewhere" in stderr, stderr
        assert len(stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_writing_is_one_line_exit_1(run, tmp_path, monkeypatch):
    """The disk fills up mid-write (another process took the space): exit 1, one line, nothing partial."""
    from kanana_quant import checkpoint

    real = checkpoint.write_safetensors

    def full_disk(path, specs, produce, metadata=None):
        real(path, specs, produce, metadata)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "write_safetensors", full_disk)
    status, _, stderr = run("synth", "--tiny", "dense", "-o", tmp_path / "m")
    assert status == 1, stderr
    assert stderr.startswith("error: No space left on device; free some space or write elsewhere")
    assert len(stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_one_line_exit_2(run, tiny_dense, tmp_path, monkeypatch):
    import kanana_quant.atomic as atomic

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x.gguf"))

    monkeypatch.setattr(atomic.os, "replace", denied)
    status, _, stderr = run("export", "gguf", tiny_dense, "-o", tmp_path / "x.gguf", "--type", "F16")
    assert status == 2, stderr
    assert stderr == f"error: Permission denied: '{tmp_path / 'x.gguf'}'"
    assert list(tmp_path.iterdir()) == []


def test_a_bug_still_shows_its_traceback(run, tiny_dense, monkeypatch):
    """Exit code 1 with a traceback is reserved for bugs: they must stay visible, not be swallowed."""
    from kanana_quant import loader

    monkeypatch.setattr(loader, "open_checkpoint", lambda path: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run("info", tiny_dense)


def test_help_and_no_arguments(run):
    status, stdout, _ = run("--help")
    assert status == 0 and "quantize" in stdout
    status, _, _ = run()
    assert status == 2  # no_args_is_help: the help, and the usage-error code as click gives it
