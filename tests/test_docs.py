"""The method pages in docs/methods: present, indexed, naming every component, and what docstrings cite.

Docstrings point at sections of these pages (``docs/methods/extractors.md#cs-core``), so the pages
must keep those sections and the docstrings must not point at files outside the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from grnx_core.components import Kind
from grnx_core.registry import default_registry

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
METHODS = DOCS / "methods"

#: the page that documents each kind of component
PAGES: dict[Kind, str] = {
    Kind.DATA: "data.md",
    Kind.PREPROCESSOR: "preprocessing.md",
    Kind.SAMPLER: "samplers.md",
    Kind.TOKENIZER: "tokenizers.md",
    Kind.MODEL: "models.md",
    Kind.EXTRACTOR: "extractors.md",
    Kind.EVALUATOR: "evaluators.md",
}

#: built-in plugins register under entry-point names "grnx.<kind folder>"
BUILTIN_PLUGIN_PREFIX = "grnx."

#: files outside the repository that code must not send readers to
OUTSIDE_POINTERS = re.compile(r"ALGORITHMS\.md|shared/specs|DESIGN\.md|STYLE\.md")
METHOD_POINTER = re.compile(r"docs/methods/([\w.-]+\.md)(?:#([\w-]+))?")
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCED_BLOCK = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def source_files() -> list[Path]:
    return sorted([*(REPO / "plugins").rglob("*.py"), *(REPO / "grnx_core").rglob("*.py")])


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    found = set()
    for line in FENCED_BLOCK.sub("", markdown.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if not match:
            continue
        anchor = github_anchor(match.group(1))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def relative_links(markdown: Path) -> list[str]:
    """Link targets of a markdown file outside code blocks and inline code, web links left out."""
    text = INLINE_CODE.sub("", FENCED_BLOCK.sub("", markdown.read_text()))
    targets = MARKDOWN_LINK.findall(text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_every_method_page_exists_and_is_linked_from_the_index():
    assert set(PAGES) == set(Kind), "a kind of component has no method page in PAGES"
    index = METHODS / "README.md"
    assert index.is_file(), "docs/methods/README.md, the index of the method pages, is missing"
    linked = {target.split("#")[0] for target in relative_links(index)}
    pages = set(PAGES.values()) | {p.name for p in METHODS.glob("*.md") if p.name != "README.md"}
    for page in sorted(pages):
        assert (METHODS / page).is_file(), f"docs/methods/{page} is missing"
        assert page in linked, f"docs/methods/README.md does not link {page}"


@pytest.mark.parametrize("kind", list(PAGES), ids=lambda kind: kind.value)
def test_every_builtin_component_is_named_with_its_reference_on_its_page(kind):
    page = METHODS / PAGES[kind]
    text = page.read_text()
    entries = {
        name: entry
        for name, entry in default_registry().entries[kind].items()
        if entry.plugin.startswith(BUILTIN_PLUGIN_PREFIX)
    }
    assert entries, f"no built-in {kind.value} is registered"
    for name, entry in sorted(entries.items()):
        assert f"`{name}`" in text, f"{kind.value} `{name}` is not named on docs/methods/{page.name}"
        reference = entry.load().reference
        assert reference in text, (
            f"{kind.value} `{name}` cites {reference} but docs/methods/{page.name} does not"
        )


def test_no_source_points_at_files_outside_the_repository():
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in source_files()
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if OUTSIDE_POINTERS.search(line)
    ]
    assert not found, "point at docs/methods/<page>.md#<section> instead:\n" + "\n".join(found)


def test_pointers_to_method_pages_name_existing_sections():
    pointers = [
        (path, page, anchor)
        for path in source_files()
        for page, anchor in METHOD_POINTER.findall(path.read_text())
    ]
    assert pointers, "no docstring points at docs/methods; the pattern or the pointers changed"
    for path, page, anchor in pointers:
        where = path.relative_to(REPO)
        assert (METHODS / page).is_file(), f"{where} points at docs/methods/{page}, which does not exist"
        if anchor:
            assert anchor in anchors(METHODS / page), (
                f"{where} points at docs/methods/{page}#{anchor}; that page has no such section"
            )


@pytest.mark.parametrize(
    "markdown",
    sorted([*DOCS.glob("*.md"), *METHODS.glob("*.md")]),
    ids=lambda path: str(path.relative_to(DOCS)),
)
def test_relative_links_in_docs_resolve(markdown):
    for target in relative_links(markdown):
        path_part, _, anchor = target.partition("#")
        destination = (markdown.parent / path_part).resolve() if path_part else markdown
        assert destination.exists(), f"{markdown.relative_to(REPO)} links {target}, which does not exist"
        if anchor and destination.suffix == ".md":
            assert anchor in anchors(destination), (
                f"{markdown.relative_to(REPO)} links {target}, but {destination.name} has no such section"
            )


def test_the_link_checks_catch_a_broken_link_and_a_missing_section(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## CS-CORE\n\n## `wds`: WDS, as defined\n\n"
        "[ok](page.md#cs-core) [web](https://example.org/x) `[code](nowhere.md)`\n"
        "```\n[fenced](nowhere.md)\n```\n[broken](missing.md)\n"
    )
    assert relative_links(page) == ["page.md#cs-core", "missing.md"]
    assert anchors(page) == {"title", "cs-core", "wds-wds-as-defined"}
