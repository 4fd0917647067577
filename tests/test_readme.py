"""README stays true: its CLI reference is what the typer app says, its first lines are the two commands."""

from __future__ import annotations

import re
from pathlib import Path

from kanana_quant.cli_docs import END, START, render

README = Path(__file__).resolve().parent.parent / "README.md"


def test_cli_reference_matches_the_typer_app():
    text = README.read_text(encoding="utf-8")
    section = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert section == render().strip(), "README's CLI reference is stale: run `python -m kanana_quant.cli_docs`"


def test_every_command_is_documented():
    text = README.read_text(encoding="utf-8")
    for command in ("info", "synth", "generate", "eval", "quantize", "chat", "serve", "demo", "export gguf"):
        assert f"#### `kanana-quant {command}" in text


def test_readme_opens_with_the_two_commands():
    lines = [line for line in README.read_text(encoding="utf-8").splitlines() if line.strip()]
    demo, test = lines.index("<!-- demo-command -->"), lines.index("<!-- test-command -->")
    assert demo < test < 8
    assert "kanana-quant demo" in lines[demo + 1] and "pytest" in lines[test + 1]


def test_architecture_table_covers_every_module():
    text = README.read_text(encoding="utf-8")
    section = text.split("## Architecture\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    listed = {name for cell in rows for name in re.findall(r"`([\w/]+\.py)`", cell)}
    package = README.parent / "kanana_quant"
    modules = {str(p.relative_to(package)) for p in package.rglob("*.py") if p.name != "__init__.py"}
    assert sorted(modules - listed) == [], "modules missing from README's Architecture table"
    assert sorted(listed - modules) == [], "README's Architecture table lists modules that do not exist"
