"""Every relative link in README.md and docs/ reaches a file, every `#anchor` a heading, and design.md maps app/.

The docs cite one another and the code by path (docs/development.md, "Docs"); a file moved or a
heading renamed breaks them silently. Anchors are GitHub's: the heading in lower case, punctuation
dropped, spaces turned to hyphens, a repeated heading numbered `-1`, `-2`.
"""

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from app.storage.engine import PROJECT_ROOT

ROOT = Path(PROJECT_ROOT)
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`+[^`\n]*`+")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:


def prose(text: str) -> str:
    """The text without code blocks, where a `[x](y)` is code, not a link."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in HEADING.findall(prose(page.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    text = CODE_SPAN.sub("", prose(page.read_text(encoding="utf-8")))
    return [target for target in LINK.findall(text) if not EXTERNAL.match(target)]


def broken(page: Path) -> list[str]:
    problems = []
    for target in links(page):
        path_part, _, anchor = target.partition("#")
        path_part = unquote(path_part)
        if not path_part:
            resolved = page
        elif path_part.startswith("/"):  # GitHub resolves a leading slash from the repository's root
            resolved = ROOT / path_part.lstrip("/")
        else:
            resolved = (page.parent / path_part).resolve()
        if not resolved.exists():
            problems.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    return problems


def test_the_pages_are_found() -> None:
    assert ROOT / "docs" / "README.md" in PAGES
    assert any(page.parent.name == "decisions" for page in PAGES)


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken(page) == []


def test_the_index_lists_every_page() -> None:
    index = ROOT / "docs" / "README.md"
    listed = {(index.parent / unquote(target.partition("#")[0])).resolve() for target in links(index)}
    pages = {page.resolve() for page in (ROOT / "docs").glob("*.md") if page != index}
    assert pages - listed == set()
    assert (ROOT / "docs" / "decisions" / "README.md").resolve() in listed


def test_the_decision_index_lists_every_record() -> None:
    index = ROOT / "docs" / "decisions" / "README.md"
    listed = {(index.parent / unquote(target.partition("#")[0])).resolve() for target in links(index)}
    records = {page.resolve() for page in index.parent.glob("[0-9][0-9][0-9][0-9]-*.md")}
    assert records, "no decision records found"
    assert records - listed == set()


def design_map() -> tuple[set[Path], set[Path]]:
    """The files and the folders the map at the top of docs/design.md names under app/."""
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    block = text.split("## The map", 1)[1].split("```", 2)[1]
    files: set[Path] = set()
    folders: set[Path] = set()
    stack: list[str] = []
    for line in block.splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        stack = [*stack[:depth], name.rstrip("/")]
        if stack[0] != "app":
            continue
        path = ROOT.joinpath(*stack)
        (folders if name.endswith("/") else files).add(path)
    return files, folders


def test_the_design_map_names_every_module() -> None:
    files, folders = design_map()
    modules = {path for path in (ROOT / "app").rglob("*.py") if path.name != "__init__.py"}
    # A folder listed without its files (middleware/, docs/) speaks for everything in it.
    leaves = {folder for folder in folders if not any(f.parent == folder for f in files | folders - {folder})}
    unnamed = {path for path in modules - files if not any(leaf in path.parents for leaf in leaves)}
    assert sorted(str(path.relative_to(ROOT)) for path in unnamed) == []
