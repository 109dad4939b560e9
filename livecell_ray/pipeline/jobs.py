"""Submitting plates to a Ray cluster as Ray Jobs (the Jobs SDK), and following them."""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from livecell_ray import offline
from livecell_ray.config import segment_config_from_spec
from livecell_ray.pipeline import credentials

ROOT = Path(__file__).resolve().parents[2]
#: Never uploaded with the job: environments, training runs, data sets, results.
EXCLUDES = [".venv", ".git", "runs", "datasets", "out", "*.egg-info", "__pycache__", ".pytest_cache",
            ".ruff_cache", ".whl", "benchmarks", "tests"]


def read_spec(path: str) -> dict[str, Any]:
    """Load and validate a YAML job spec; raises SpecError naming the file and key."""
    from livecell_ray.config import SpecError

    try:
        with open(path, encoding="utf-8") as f:
            spec = yaml.safe_load(f)
    except FileNotFoundError as exc:
        raise SpecError(f"{path}: job spec not found") from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    segment_config_from_spec(spec, path)
    found = credentials.spec_secrets(spec)
    if found:
        raise SpecError(f"{path}: {', '.join(found)} holds a credential, and a submitted spec travels in clear in "
                        f"the Ray job's entrypoint (anyone who can list the cluster's jobs reads it); remove it and "
                        f"{credentials.HOW}")
    return spec


def entrypoint(spec: dict[str, Any], python: str = "python") -> str:
    """The job's shell command: the spec travels base64-encoded, so no value ever meets a shell."""
    b64 = base64.urlsafe_b64encode(json.dumps(spec).encode()).decode()
    return f"{python} jobs/segment_plate.py --spec-b64 {b64}"


def auth_headers() -> dict[str, str]:
    """Bearer token for Ray's token auth, found where Ray keeps it (env, token path, ~/.ray/auth_token)."""
    import os

    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not token and path.exists():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str):
    """Jobs SDK client; sends the cluster's token when one is configured (Ray's token auth)."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=auth_headers() or None)


def submit(spec_path: str, address: str, python: str = "python", working_dir: str | None = None) -> str:
    """Submit one plate; the package, jobs/ and weights/ travel in the working_dir."""
    spec = read_spec(spec_path)
    runtime_env = {"working_dir": str(working_dir or ROOT), "excludes": EXCLUDES,
                   "env_vars": offline.worker_env()}
    jobs = client(address)
    for wait in (1, 2, 4, 8, 15, 0):
        try:
            return jobs.submit_job(entrypoint=entrypoint(spec, python), runtime_env=runtime_env,
                                   metadata={"livecell_ray": "segment", "spec": Path(spec_path).name})
        except RuntimeError as exc:
            # A head that has just started answers 500 until its job agent is up, and says to try again;
            # no job was made, so trying again cannot duplicate one.
            if "No available agent" not in str(exc) or not wait:
                raise
            time.sleep(wait)
    raise AssertionError("unreachable")


def status(job_id: str, address: str) -> str:
    return str(client(address).get_job_status(job_id).value)


def logs(job_id: str, address: str) -> str:
    return client(address).get_job_logs(job_id)


def follow(job_id: str, address: str) -> Iterator[str]:
    """Stream the job's log lines until it ends."""
    import asyncio

    async def _tail(out: list[str]) -> None:
        async for chunk in client(address).tail_job_logs(job_id):
            out.append(chunk)

    lines: list[str] = []
    asyncio.run(_tail(lines))
    yield from lines


def default_python() -> str:
    """The interpreter that runs this CLI: right for a local head started from the same environment."""
    return sys.executable
