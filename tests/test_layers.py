"""The rules the package tree keeps, read off every module's imports (those inside functions too).

plate -> pipeline -> model -> measure -> store -> answers, training beside them: each stage folder's
``__init__`` says what it may import; these tests fail when a module breaks that.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "livecell_ray"
NETWORK = {"torch", "torchvision", "ultralytics", "onnxruntime"}


def imports(path: Path) -> set[str]:
    """Every module a file imports, absolute, wherever in the file the import is."""
    tree = ast.parse(path.read_text(), str(path))
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
            # "from livecell_ray import store" names the module livecell_ray.store
            if node.module == "livecell_ray" or node.module.startswith("livecell_ray."):
                mods |= {f"{node.module}.{a.name}" for a in node.names}
    return mods


def files(*where: str) -> list[Path]:
    out = []
    for w in where:
        p = PACKAGE / w
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p.with_suffix(".py")]
    assert out and all(f.exists() for f in out), where
    return out


def broken(where: tuple[str, ...], forbidden: set[str]) -> list[str]:
    """'file: module' for each import of a forbidden module (or anything under it)."""
    bad = []
    for f in files(*where):
        for m in imports(f):
            if any(m == x or m.startswith(x + ".") for x in forbidden):
                bad.append(f"{f.relative_to(PACKAGE.parent)}: {m}")
    return bad


def test_the_import_reader_sees_imports_inside_functions(tmp_path):
    """The checks below would pass vacuously if the reader missed lazy imports."""
    p = tmp_path / "m.py"
    p.write_text("import os\ndef f():\n    from livecell_ray import store\n    import ray.util\n")
    assert imports(p) >= {"os", "livecell_ray", "livecell_ray.store", "ray.util"}


def test_measure_and_store_know_no_network_and_no_ray():
    assert broken(("measure", "store"), NETWORK | {"ray", "livecell_ray.model", "livecell_ray.pipeline",
                                                   "livecell_ray.training", "livecell_ray.cli"}) == []


def test_reading_a_plate_needs_no_ray_and_no_network():
    assert broken(("plate",), NETWORK | {"ray", "livecell_ray.model", "livecell_ray.pipeline",
                                         "livecell_ray.training", "livecell_ray.cli", "livecell_ray.answers"}) == []


def test_the_model_side_knows_no_cli_no_driver_and_no_store():
    assert broken(("model",), {"typer", "rich", "livecell_ray.cli", "livecell_ray.pipeline", "livecell_ray.store",
                               "livecell_ray.training", "livecell_ray.answers"}) == []


def test_answers_need_neither_ray_nor_the_network():
    assert broken(("answers",), NETWORK | {"ray", "livecell_ray.model", "livecell_ray.pipeline",
                                           "livecell_ray.training", "livecell_ray.cli"}) == []


def test_no_part_of_a_segmentation_run_imports_training():
    run_side = ("plate", "pipeline", "model", "measure", "store", "config", "offline", "retry", "cli/run")
    assert broken(run_side, {"livecell_ray.training", "livecell_ray.answers"}) == []


def test_the_package_has_a_dozen_entries_and_no_module_over_400_lines():
    entries = sorted(p.name for p in PACKAGE.iterdir() if p.name != "__pycache__" and not p.name.startswith("."))
    assert len(entries) <= 12, entries
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


@pytest.mark.parametrize("module, absent", [
    # What a shard worker and a model replica import: no training, answers, pandas or CLI.
    ("livecell_ray.pipeline.shard", ("livecell_ray.training", "livecell_ray.answers", "pandas", "typer")),
    ("livecell_ray.model.replica", ("livecell_ray.training", "livecell_ray.answers", "pandas", "livecell_ray.store")),
    # The driver and the command a user types to segment: no training.
    ("livecell_ray.pipeline.driver", ("livecell_ray.training", "livecell_ray.answers")),
    ("livecell_ray.cli", ("livecell_ray.training", "ray", "torch")),
    # Answers on a laptop: neither Ray nor torch.
    ("livecell_ray.answers.query", ("ray", "torch", "ultralytics")),
    ("livecell_ray.answers.report", ("ray", "torch", "ultralytics")),
])
def test_what_a_module_pulls_in_when_imported_in_a_fresh_process(module, absent):
    code = (f"import sys, {module}\n"
            f"print(','.join(m for m in {absent!r} if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "", f"{module} imports {p.stdout.strip()}"


def test_old_module_paths_still_work_with_a_deprecation_warning():
    code = ("import warnings\n"
            "warnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    import livecell_ray.query as old\n"
            "    from livecell_ray import manifest\n"
            "import livecell_ray.answers.query as new, livecell_ray.plate.manifest as m\n"
            "assert old is new and manifest is m, (old, new)\n"
            "print(sorted({str(x.message).split()[0] for x in w if x.category is DeprecationWarning}))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "['livecell_ray.manifest', 'livecell_ray.query']"
