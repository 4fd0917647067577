"""Does README's install line keep AMX out of llama.cpp on an Intel Xeon with AMX (llama.cpp #20824)? Checked
from any x86-64 Linux machine: the installed llama-cpp-python version is built twice through pip from its
sdist, as README's install line builds it, with a compiler wrapper that turns ggml's `-march=native` into
`-march=sapphirerapids` (what native means on those Xeons): once with README's CFLAGS/CXXFLAGS, once without.
Each wheel's libraries are disassembled and their AMX and AVX-512 instructions counted.

    python bench/amx_build.py          # two wheel builds, ~10 min each on 2 cores
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import llamacpp_python_source, save  # noqa: E402

from kanana_quant.runtimes.llamacpp_engine import NO_AMX_FLAGS  # noqa: E402

AMX = re.compile(r"\t(ldtilecfg|sttilecfg|tileloadd|tilestored|tilerelease|tilezero|tdpb|tdpf)")
AVX512 = re.compile(r"%zmm")
# The compiler as it runs on an Intel Xeon with AMX; every -march=native it replaces is counted in a log.
WRAPPER = """#!{python}
import os, sys
args = ["-march=sapphirerapids" if a == "-march=native" else a for a in sys.argv[1:]]
if args != sys.argv[1:]:
    with open(os.environ["AMX_BUILD_LOG"], "a") as log:
        log.write(" ".join(args) + "\\n")
os.execvp("{compiler}", ["{compiler}", *args])
"""


def build(src: Path, work: Path, flags: str | None) -> dict:
    """One pip wheel build of `src` as on an AMX Xeon, with CFLAGS=CXXFLAGS=`flags` (None: unset)."""
    name = "readme" if flags else "plain"
    log, out = work / f"{name}.native.log", work / name
    env = {k: v for k, v in os.environ.items() if k not in ("CFLAGS", "CXXFLAGS", "CMAKE_ARGS")}
    for var, compiler in (("CC", "gcc"), ("CXX", "g++")):
        wrapper = work / f"{compiler}-sapphirerapids"
        wrapper.write_text(WRAPPER.format(python=sys.executable, compiler=compiler))
        wrapper.chmod(0o755)
        env[var] = str(wrapper)
    env["AMX_BUILD_LOG"] = str(log)
    if flags:
        env["CFLAGS"] = env["CXXFLAGS"] = flags
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-w", str(out),
                           str(src)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"pip wheel failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    native = log.read_text().splitlines() if log.is_file() else []
    libraries, seen = {}, set()
    with zipfile.ZipFile(next(out.glob("*.whl"))) as wheel:
        for member in wheel.namelist():
            if ".so" not in Path(member).name:
                continue
            digest = hashlib.sha256(wheel.read(member)).hexdigest()
            if digest in seen:  # the wheel stores symlinks as copies
                continue
            seen.add(digest)
            path = Path(wheel.extract(member, work / f"{name}-unpacked"))
            asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(path)], capture_output=True,
                                 text=True, check=True).stdout
            libraries[Path(member).name] = {"amx": len(AMX.findall(asm)), "avx512": len(AVX512.findall(asm))}
    return {"cflags": flags or "", "native_compiles": len(native),
            "native_flags_with_amx_off": sum(all(f in line for f in NO_AMX_FLAGS.split()) for line in native),
            "libraries": libraries, "seconds": round(time.time() - start)}


def main() -> None:
    src = llamacpp_python_source()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [build(src, Path(tmp), flags) for flags in (NO_AMX_FLAGS, None)]
    for row in rows:
        amx = {lib: v["amx"] for lib, v in row["libraries"].items() if v["amx"]}
        avx512 = sum(v["avx512"] for v in row["libraries"].values())
        print(f"CFLAGS={row['cflags']!r}: {row['native_compiles']} native compiles, AMX instructions "
              f"{amx or 0}, AVX-512 register uses {avx512} ({row['seconds']} s)")
    print(f"saved {save('amx_build', {'source': src.name, 'rows': rows})}")


if __name__ == "__main__":
    main()
