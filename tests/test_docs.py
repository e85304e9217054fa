"""The documentation: every relative link of README.md and docs/ lands on a file (and heading), every
page is in the mkdocs.yml navigation, every included results table exists, and the README stays short.

The site build itself (``mkdocs build --strict``) runs in .ci/run, which installs the docs group; these
checks need no mkdocs, so they run with the tests everywhere.
"""

import re
import unicodedata
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
SNIPPET = re.compile(r'^\s*--8<-- "([^"]+)"', re.M)
FENCE = re.compile(r"^([ \t]*)```[^\n]*\n.*?^\1```[ \t]*$", re.M | re.S)
README_TEST_COMMAND = "bash .ci/setup test && .venv/bin/python -m pytest -q"


def prose(text: str) -> str:
    """The markdown without fenced code blocks, inline code and HTML comments."""
    text = FENCE.sub("", text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """A heading's anchor, as Python-Markdown's toc extension (mkdocs) makes it."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#{1,6} (.+?)\s*$", FENCE.sub("", page.read_text()), re.M)}


def relative_links(page: Path) -> list[str]:
    targets = LINK.findall(prose(page.read_text()))
    return [t for t in targets if "://" not in t and not t.startswith("mailto:")]


def test_every_relative_link_resolves_to_a_file_and_heading():
    broken = []
    for page in [ROOT / "README.md", *PAGES]:
        for target in relative_links(page):
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.is_file():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_link_checker_sees_broken_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n```bash\n# not a heading\n```\n\n## A part\n\n[ok](page.md#a-part) [gone](missing.md)"
        " `[code](nope.md)`\n\n```\n[in code](nope.md)\n```\n\n## Last\n"
    )
    assert relative_links(page) == ["page.md#a-part", "missing.md"]
    assert anchors(page) == {"title", "a-part", "last"}
    heading = "Per-block merge (`model.merge_mode: per_block`)"
    assert slug(heading) == "per-block-merge-modelmerge_mode-per_block"


def nav_pages(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [p for value in node.values() for p in nav_pages(value)]
    if isinstance(node, list):
        return [p for item in node for p in nav_pages(item)]
    return []


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = nav_pages(config["nav"])
    pages = {p.relative_to(DOCS).as_posix() for p in PAGES}
    assert sorted(pages - set(nav)) == [], "pages missing from mkdocs.yml nav"
    assert sorted(set(nav) - pages) == [], "nav entries without a page"
    assert len(nav) == len(set(nav)), "a page is in the nav twice"


def test_every_included_table_exists():
    missing = []
    for page in PAGES:
        for target in SNIPPET.findall(page.read_text()):
            path, _, section = target.partition(":")
            file = ROOT / path
            if not file.is_file():
                missing.append(f"{page.relative_to(DOCS)}: {path}")
            elif section and f"--8<-- [start:{section}]" not in file.read_text():
                missing.append(f"{page.relative_to(DOCS)}: {target} (no such section)")
    assert not missing, "\n".join(missing)
    assert any(SNIPPET.findall(p.read_text()) for p in (DOCS / "benchmarks").glob("*.md"))


def test_readme_is_a_newcomers_page_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "bash .ci/setup && .venv/bin/python train.py fit\n" in readme
    assert README_TEST_COMMAND in readme
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith(README_TEST_COMMAND)
