"""README and docs/ stay a product page and true: every relative link resolves to a file in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "weights" / "README.md",
         *sorted((ROOT / "docs").glob("*.md"))]


def _relative_links(page: Path) -> list[str]:
    return [m for m in LINK.findall(page.read_text()) if "://" not in m and not m.startswith(("#", "mailto:"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    links = _relative_links(page)
    missing = [link for link in links if not (page.parent / link.split("#", 1)[0]).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_readme_is_a_product_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    # the picture and every topic page are linked from it
    links = set(_relative_links(ROOT / "README.md"))
    assert any(link.endswith(".png") for link in links)
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{doc.name}" in links, f"README does not link docs/{doc.name}"


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) [gone](nowhere.md#x) ![img](pic.png) [web](https://example.org)")
    assert [link for link in _relative_links(page) if not (tmp_path / link.split("#")[0]).exists()] == \
        ["nowhere.md#x", "pic.png"]
