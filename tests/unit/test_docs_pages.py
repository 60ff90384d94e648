"""The docs are a set: README is the front page (short, linking every page), links resolve, and the repo
names no package-index host (the MicroPython client is vendored; pip uses the user's configured index)."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_readme_is_a_front_page_that_links_every_docs_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    assert PAGES, "docs/ holds no pages"
    unlinked = [p.name for p in PAGES if f"(docs/{p.name})" not in text]
    assert not unlinked, "docs pages the README does not link: " + ", ".join(unlinked)


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = [
        target
        for target in LINK.findall(page.read_text(encoding="utf-8"))
        if "://" not in target and not target.startswith("mailto:") and not (page.parent / target).exists()
    ]
    assert not broken, f"{page.name} links to missing files: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_each_page_says_what_it_is_for_in_its_first_line(page):
    first = page.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# ")
    assert ":" in first, f"{page.name}: the title says what the page is for after a colon"


def test_no_package_index_host_is_named_in_the_repository():
    hosts = ("pypi.org", "pythonhosted.org", "pypi.python.org", "micropython.org/pi")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    named = [
        f
        for f in files
        if (ROOT / f).is_file()
        and f != "tests/unit/test_docs_pages.py"
        and any(h in (ROOT / f).read_text(encoding="utf-8", errors="replace") for h in hosts)
    ]
    assert not named, f"files naming a package index host: {named}"
