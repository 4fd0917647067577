"""README's CLI reference, generated from the typer app so it cannot drift (tests/test_readme.py compares).

    python -m kanana_quant.cli_docs          # rewrite the section between the markers in README.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

START, END = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"


def _commands(group, prefix: str):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a sub-group (typer vendors its own click, so no isinstance)
            yield from _commands(command, f"{prefix} {name}")
        else:
            yield f"{prefix} {name}", command


def _option_row(param) -> str:
    names = " / ".join([*param.opts, *param.secondary_opts])
    if param.param_type_name == "argument":
        return f"| `{param.name.upper()}` | {param.help or ''} | required |"
    if param.is_flag and param.secondary_opts:
        default = param.opts[0] if param.default else param.secondary_opts[0]
    elif param.required:
        default = "required"
    elif isinstance(param.default, bool):
        default = "on" if param.default else "off"
    else:
        default = "–" if param.default in (None, "") else str(param.default)
    return f"| `{names}` | {param.help or ''} | {default} |"


def render() -> str:
    from kanana_quant.cli import app

    root = typer.main.get_command(app)
    lines = []
    for path, command in _commands(root, "kanana-quant"):
        args = " ".join(p.name.upper() for p in command.params if p.param_type_name == "argument")
        lines += [f"#### `{path}{' ' + args if args else ''}`", "", (command.help or "").strip().split("\n")[0], "",
                  "| option | meaning | default |", "|---|---|---|"]
        lines += [_option_row(p) for p in command.params if p.name != "help"]
        lines.append("")
    return "\n".join(lines)


def update(readme: Path) -> bool:
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: no {START} ... {END} section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{render()}\n{END}{tail}"
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "README.md"
    print(f"{path}: {'updated' if update(path) else 'already current'}")
