"""README and docs/ stay a product page and true: every relative link resolves to a file in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "weights" / "README.md", ROOT / "research" / "README.md",
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


def test_the_model_card_has_one_short_section_per_shipped_file_with_its_checksum():
    """A card a user reads in a minute: a section per shipped file in weights/ (its .pt models and the
    classifier's .json), about a screen each, its sha256 true."""
    card = (ROOT / "weights" / "README.md").read_text()
    sections = {s.split("`")[1]: s for s in re.split(r"\n(?=## )", card) if s.startswith("## `")}
    sums = dict(reversed(line.split()) for line in (ROOT / "weights" / "SHA256SUMS").read_text().splitlines())
    shipped = [p.name for p in (ROOT / "weights").glob("*.*") if p.suffix == ".pt" or p.name == "celltype.json"]
    assert sorted(sections) == sorted(shipped) == sorted(sums)
    for name, text in sections.items():
        assert len(text.splitlines()) <= 60, name
        assert sums[name] in text, f"{name}: the card's sha256 is not SHA256SUMS'"
        for part in ("**For**", "**Data**", "**Held out", "**Limits**", "**sha256**", "**Reproduce**"):
            assert part in text, (name, part)


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) [gone](nowhere.md#x) ![img](pic.png) [web](https://example.org)")
    assert [link for link in _relative_links(page) if not (tmp_path / link.split("#")[0]).exists()] == \
        ["nowhere.md#x", "pic.png"]


@pytest.mark.slow
def test_your_own_plates_commands_run_as_documented(tmp_path):
    """docs/plates.md's commands, run as written on the plates examples/own_plates.py makes."""
    import os
    import shlex
    import subprocess
    import sys

    import numpy as np

    from livecell_ray import store

    text = (ROOT / "docs" / "plates.md").read_text()
    block = text.split("```", 2)[1]
    commands = [ln.strip() for ln in block.splitlines() if ln.strip()]
    assert commands[0].startswith("python examples/own_plates.py") and len(commands) == 4
    env = {**os.environ, "COLUMNS": "200"}
    for cmd in commands:
        argv = shlex.split(cmd)
        if argv[0] == "python":
            argv = [sys.executable, str(ROOT / argv[1]), *argv[2:]]
        else:
            argv = [sys.executable, "-m", "livecell_ray.cli", *argv[1:], "--num-cpus", "2"]
        p = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
        assert p.returncode == 0, (cmd, p.stderr[-2000:])
    expect = {"incucyte": (4, (1040, 1408)), "imagexpress": (4, (1040, 1408)), "stitched": (1, (3000, 3000))}
    for name, (n, shape) in expect.items():
        out = store.Outputs(str(tmp_path / "out" / name))
        fields = out.read_table("fields")
        assert len(fields) == n and (fields["n_cells"] > 10).all(), name
        f = fields.iloc[0]
        assert store.read_labels(out, f.plate, f.zarr_path.split(".zarr/", 1)[1], int(f.t_index)).shape == shape
        assert out.read_run()["last_run"]["fields_scale_assumed"] == 0, name  # every scale known
        assert np.isfinite(out.read_table("cells")["area_um2"]).all(), name


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "livecell" / "unlabelled").exists(),
                    reason="../shared/data/livecell/unlabelled is absent: the worked example runs on it")
def test_the_worked_examples_in_docs_are_what_their_commands_give():
    """docs/examples.py runs each worked example's commands; the page must hold exactly their output."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_examples", ROOT / "docs" / "examples.py")
    examples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(examples)
    for name, (page, _, _needs) in examples.EXAMPLES.items():
        text = (ROOT / page).read_text()
        i, j = examples.block(text, name)
        assert text[i:j].strip(), f"{page}: example {name} is empty (run python docs/examples.py)"
        assert examples.run(name) == text[i:j], f"{page}: example {name} is stale (run python docs/examples.py)"
