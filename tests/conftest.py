"""Shared fixtures: a real local Ray runtime (2 CPUs), the bundled example plate, shared data paths."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "livecell_plate"
SHARED = ROOT.parent / "shared" / "data"
USIIGACI = SHARED / "usiigaci" / "train"
LIVECELL_EXAMPLES = SHARED / "livecell_examples"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("YOLO_OFFLINE", "1")


def needs_shared(path: Path):
    """Skip (with the reason) when ../shared/data is absent, e.g. on a user's machine."""
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is absent (../shared/data not available)")


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray runtime for the session; small CPU count like a laptop."""
    import ray

    from livecell_ray import offline

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": offline.worker_env()})
    yield ray
    ray.shutdown()


@pytest.fixture()
def example_plate(tmp_path: Path) -> Path:
    """A copy of the bundled example plate (10 real LIVECell fields)."""
    dst = tmp_path / "plate"
    shutil.copytree(EXAMPLES, dst, ignore=shutil.ignore_patterns("*.md"))
    return dst
