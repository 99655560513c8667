"""README's "## Layout" section lists every module of the pack, one line each, and only modules that exist.

A module added to trainer/, nodes/, devtools/ or microworld/ (or a new command line at the top) without its line in the
layout fails here, and so does a line left behind for a module that was moved or removed.
Empty package `__init__.py` files are not modules a reader looks for and need no line.
"""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LISTED = ("trainer", "nodes", "devtools", "microworld")
PATH = re.compile(r"`((?:[\w.-]+/)*[\w.-]+\.(?:py|js))`")


def layout_section(readme: str) -> str:
    """The text from '## Layout' to the next '## ' heading."""
    start = readme.index("\n## Layout\n")
    end = readme.find("\n## ", start + 1)
    return readme[start: end if end != -1 else None]


def modules() -> set[str]:
    """The pack's modules a reader looks for: every non-empty .py of trainer/, nodes/, devtools/, the top-level
    .py files (the entry point and the command lines) and the web extension."""
    found = {p for d in LISTED for p in (REPO / d).rglob("*.py") if "__pycache__" not in p.parts}
    found |= set(REPO.glob("*.py")) | set((REPO / "web").glob("*.js"))
    return {p.relative_to(REPO).as_posix() for p in found if p.read_text(encoding="utf-8").strip()}


def listed_lines(section: str) -> dict[str, list[str]]:
    """Each module path named in the section, with the lines that name it."""
    out: dict[str, list[str]] = {}
    for line in section.splitlines():
        for path in PATH.findall(line):
            out.setdefault(path, []).append(line)
    return out


def test_readme_layout_lists_every_module():
    section = layout_section((REPO / "README.md").read_text(encoding="utf-8"))
    listed = listed_lines(section)
    expected = modules()
    assert len(expected) > 70, f"the module walk found only {len(expected)} modules (74 when written)"
    missing = sorted(expected - set(listed))
    assert not missing, f"README.md '## Layout' lacks a line for: {missing} (add one line saying what lives there)"


def test_readme_layout_names_only_modules_that_exist_once_each():
    section = layout_section((REPO / "README.md").read_text(encoding="utf-8"))
    listed = listed_lines(section)
    gone = sorted(p for p in listed if not (REPO / p).is_file())
    assert not gone, f"README.md '## Layout' names modules that do not exist (moved or removed?): {gone}"
    repeated = {p: lines for p, lines in listed.items() if len(lines) > 1 and p in modules()}
    assert not repeated, f"README.md '## Layout' names a module on more than one line: {sorted(repeated)}"
    bare = [p for p, lines in listed.items() if p in modules() and not re.search(rf"`{re.escape(p)}`:? \S", lines[0])]
    assert not bare, f"README.md '## Layout' lines without a description: {bare}"
