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


def _ensure_local_ray():
    """A real local Ray runtime (2 CPUs, like a laptop), started once and reused; tests that need another
    topology (multi-node, a separate head) shut it down and the next user starts it again."""
    import ray

    from livecell_ray import offline

    if not ray.is_initialized():
        offline.configure()  # inherited by the workers, as livecell_ray.pipeline.init_ray does
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture()
def ray_local():
    return _ensure_local_ray()


@pytest.fixture(scope="module")
def ray_module():
    """Module-scoped variant for module-scoped fixtures that run the pipeline."""
    return _ensure_local_ray()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def example_plate(tmp_path: Path) -> Path:
    """A copy of the bundled example plate (10 real LIVECell fields)."""
    dst = tmp_path / "plate"
    shutil.copytree(EXAMPLES, dst, ignore=shutil.ignore_patterns("*.md"))
    return dst


def s3_options(port: int) -> dict:
    """fsspec options for moto's S3 server on loopback (few retries: faults show up quickly)."""
    return {"key": "testing", "secret": "testing",
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"},
            "config_kwargs": {"retries": {"max_attempts": 3, "mode": "standard"}}}


@pytest.fixture()
def moto():
    """moto's S3 server on a loopback port, with a fresh bucket: {"server", "port", "bucket"}."""
    import uuid

    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    bucket = f"lab-{uuid.uuid4().hex[:10]}"  # moto keeps buckets per process: one fresh bucket per test
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=bucket)
    box = {"server": server, "port": port, "bucket": bucket}
    yield box
    box["server"].stop()
