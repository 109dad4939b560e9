"""Keys, secrets and tokens never reach a job's entrypoint, run.json, Parquet metadata or a log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from livecell_ray.pipeline import credentials

from .conftest import EXAMPLES, s3_options

CLI = [sys.executable, "-m", "livecell_ray.cli"]
KEY, SECRET = "AKIAQUIETLYEXAMPLE42", "wJalrXUtnFEMI-K7MDENG-bPxRfiCYsecret42"


def test_secret_options_are_found_and_references_are_not():
    opts = {"key": KEY, "secret": SECRET, "profile": "lab", "anon": False,
            "client_kwargs": {"endpoint_url": "http://x", "aws_session_token": "tok", "region_name": "eu"},
            "config_kwargs": {"retries": {"max_attempts": 3}}}
    assert sorted(credentials.find_secrets(opts)) == [
        "storage_options.client_kwargs.aws_session_token", "storage_options.key", "storage_options.secret"]
    for token in ("google_default", "anon", "cloud", "/etc/lab/gcs-service-account.json"):
        assert credentials.find_secrets({"token": token}) == []  # they name where credentials are
    assert credentials.find_secrets({"token": {"client_email": "x", "private_key": "y"}}) == [
        "storage_options.token.private_key"]
    assert credentials.find_secrets({"account_key": "abc"}) == ["storage_options.account_key"]
    assert credentials.spec_secrets({"source": "https://u:pw@host/plate", "output": "/o"}) == ["source"]
    assert credentials.redact_url("https://u:pw@host/plate") == "https://u:***@host/plate"


def test_submit_refuses_a_spec_holding_a_secret_before_anything_leaves(tmp_path):
    spec = tmp_path / "plate.yaml"
    spec.write_text(yaml.safe_dump({"source": "s3://lab/plate1", "output": "s3://lab/results/plate1",
                                    "storage_options": {"key": KEY, "secret": SECRET, "client_kwargs": {
                                        "endpoint_url": "http://127.0.0.1:9"}}}))
    # The address is a closed port: had the spec been sent, the error would be a connection error.
    p = subprocess.run([*CLI, "submit", str(spec), "--address", "http://127.0.0.1:9", "--no-follow"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip()
    assert err.startswith("error:") and "Traceback" not in err
    assert "storage_options.key" in err and "storage_options.secret" in err
    assert "AWS_SECRET_ACCESS_KEY" in err and "profile" in err  # says how to give credentials instead
    assert SECRET not in p.stderr + p.stdout and KEY not in p.stderr + p.stdout


def test_a_url_with_a_password_is_refused_without_echoing_it(tmp_path):
    p = subprocess.run([*CLI, "segment", f"https://alice:{SECRET}@127.0.0.1:9/plate", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error:"), p.stderr
    assert "password" in p.stderr and SECRET not in p.stderr + p.stdout
    assert not (tmp_path / "out").exists()


def test_credentials_given_on_the_command_line_are_stored_nowhere(moto, tmp_path):
    """A local run on S3 with the key and secret in --storage-options: every object it wrote (Parquet
    footers, zarr.json attributes, run.json), its output, and its Ray session's logs are free of both."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options(moto["port"]))
    for p in sorted(EXAMPLES.glob("*.tif"))[:2]:
        fs.put(str(p), f"{moto['bucket']}/plate/{p.name}")
    opts = {**s3_options(moto["port"]), "key": KEY, "secret": SECRET}  # moto accepts any key pair
    out = f"s3://{moto['bucket']}/results"
    env = {**os.environ, "COLUMNS": "200"}
    p = subprocess.run([*CLI, "segment", f"s3://{moto['bucket']}/plate", out, "--num-cpus", "1",
                        "--storage-options", json.dumps(opts)], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert SECRET not in p.stdout + p.stderr and KEY not in p.stdout + p.stderr
    files = fs.find(f"{moto['bucket']}/results")
    assert any(f.endswith(".parquet") for f in files) and any(f.endswith("run.json") for f in files)
    for f in files:
        data = fs.cat_file(f)
        assert SECRET.encode() not in data and KEY.encode() not in data, f
    assert json.loads(fs.cat_file(f"{moto['bucket']}/results/run.json"))["fields_done"] == 2
    logs = Path("/tmp/ray/session_latest/logs")  # Ray's default temp dir: where this run's workers logged
    assert logs.is_dir()
    for f in logs.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert SECRET.encode() not in data and KEY.encode() not in data, f
