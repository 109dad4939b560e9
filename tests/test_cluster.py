"""Cluster-scale behaviour on one machine: cluster.yaml, multi-node placement, Ray Jobs, S3, resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from livecell_ray import pipeline, store
from livecell_ray.config import SegmentConfig
from livecell_ray.plate import manifest

from .conftest import EXAMPLES, ROOT, free_port, s3_options

pytestmark = pytest.mark.slow  # starts Ray (local runtimes, clusters) or a browser

FEW = sorted(EXAMPLES.glob("*.tif"))[:4]


def _small_plate(dst: Path, files=FEW) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for p in files:
        shutil.copy(p, dst / p.name)
    return dst


def _snapshot(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, np.ndarray]]:
    """Rows of cells and fields (sorted, run-independent columns) and every stored label image."""
    o = store.Outputs(str(out))
    cells = o.read_table("cells").sort_values(["field_id", "label"]).reset_index(drop=True)
    fields = o.read_table("fields").sort_values("field_id").reset_index(drop=True)
    masks = {}
    for f in fields.itertuples():
        zpath = f.zarr_path.split(".zarr/", 1)[1]
        masks[f.field_id] = store.read_labels(o, f.plate, zpath, f.t_index)
    return cells, fields, masks


def _assert_same(a, b) -> None:
    pd.testing.assert_frame_equal(a[0], b[0])
    pd.testing.assert_frame_equal(a[1], b[1])
    assert a[2].keys() == b[2].keys()
    for k in a[2]:
        assert np.array_equal(a[2][k], b[2][k]), k


# --------------------------------------------------------------------------- cluster.yaml
def test_cluster_yaml_is_valid_for_the_cluster_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg = prepare_config(raw)  # fills defaults the way `ray up` does; no cloud calls
    validate_config(cfg)
    types = cfg["available_node_types"]
    gpu = types["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["node_config"]["InstanceType"].startswith(("g5.", "g6."))
    head_cmds = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds
    assert any("pip install" in c and "livecell-ray" in c for c in cfg["setup_commands"])
    assert "/home/ubuntu/livecell-ray" in cfg["file_mounts"]


# --------------------------------------------------------------------------- multi-node placement
def test_model_replicas_on_gpu_node_measuring_elsewhere(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from livecell_ray import offline

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        gpu_node = cluster.add_node(num_cpus=1, resources={"gpu_standin": 1})
        cpu_node = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env={"env_vars": offline.worker_env()}, log_to_driver=False)
        plate = _small_plate(tmp_path / "plate")
        seen = []
        # The replica takes the stand-in GPU and the node's only CPU: nothing else fits there.
        cfg = SegmentConfig(source=str(plate), out=str(tmp_path / "out"), replica_resources={"gpu_standin": 1},
                            cpus_per_replica=1, address=cluster.address)
        summary = pipeline.run(cfg, lambda res, d, t: seen.append(res))
        assert summary.fields_done == len(FEW)
        assert {r["model_node"] for r in seen} == {gpu_node.node_id}
        assert all(r["measure_node"] != gpu_node.node_id for r in seen)
        assert {r["measure_node"] for r in seen} <= {cluster.head_node.node_id, cpu_node.node_id}
    finally:
        ray.shutdown()
        cluster.shutdown()


# --------------------------------------------------------------------------- Ray Jobs end to end
@pytest.fixture()
def ray_head(tmp_path):
    """A separate local Ray head (`ray start --head --block`) with its job server on loopback."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    port, dash = free_port(), free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    ray_bin = Path(sys.executable).with_name("ray")
    proc = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    from livecell_ray.pipeline import jobs

    deadline = time.time() + 120
    while True:
        try:
            jobs.client(address).list_jobs()
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError("the Ray head's job server did not come up") from None
            time.sleep(1)
    yield address
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_ray_job_submit_end_to_end(ray_head, tmp_path):
    plate = _small_plate(tmp_path / "plate")
    out = tmp_path / "out"
    spec = tmp_path / "spec.yaml"
    wells = sorted({manifest.parse_name(p.name)["well"] for p in FEW})
    pd.DataFrame({"well": wells, "compound": "DMSO", "cell_line": "MCF-7"}).to_csv(tmp_path / "map.csv", index=False)
    spec.write_text(yaml.safe_dump({"source": str(plate), "output": str(out), "batch_size": 2,
                                    "platemap": str(tmp_path / "map.csv")}))
    cli = [sys.executable, "-m", "livecell_ray.cli"]
    p = subprocess.run([*cli, "submit", str(spec), "--address", ray_head, "--python", sys.executable],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    job_id = next(line.split(": ", 1)[1] for line in p.stdout.splitlines() if line.startswith("job id: "))
    assert '"fields_done": 4' in p.stdout
    st = subprocess.run([*cli, "status", job_id, "--address", ray_head], capture_output=True, text=True, timeout=60)
    assert st.stdout.strip() == "SUCCEEDED"
    lg = subprocess.run([*cli, "logs", job_id, "--address", ray_head], capture_output=True, text=True, timeout=60)
    assert '"fields_total": 4' in lg.stdout
    assert len(store.Outputs(str(out)).read_table("fields")) == 4
    # the spec's plate map, as `segment --platemap` keeps it: beside the results, its source in run.json
    kept = pd.read_parquet(out / "platemap.parquet")
    assert sorted(kept["well"]) == wells and set(kept["cell_line"]) == {"MCF-7"}
    assert json.loads((out / "run.json").read_text())["platemap"]["source"] == str(tmp_path / "map.csv")


def test_submit_rejects_malformed_spec(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("source: [unclosed\n")
    p = subprocess.run([sys.executable, "-m", "livecell_ray.cli", "submit", str(spec)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode != 0 and p.stderr.startswith("error:") and "not valid YAML" in p.stderr
    spec.write_text("source: x\noutput: y\nreplicas: many\n")
    p = subprocess.run([sys.executable, "-m", "livecell_ray.cli", "submit", str(spec)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode != 0 and "replicas" in p.stderr and "Traceback" not in p.stderr


def test_example_spec_parses_and_io_tasks_is_checked():
    from livecell_ray.config import SpecError, segment_config_from_spec

    spec = yaml.safe_load((ROOT / "jobs" / "example_spec.yaml").read_text())
    cfg = segment_config_from_spec(spec)
    assert cfg.io_tasks is None and cfg.source == "examples/livecell_plate"
    assert segment_config_from_spec({**spec, "io_tasks": 3}).io_tasks == 3
    with pytest.raises(SpecError, match="io_tasks and io_worker_max_fields must be at least 1"):
        segment_config_from_spec({**spec, "io_tasks": 0})
    with pytest.raises(SpecError, match="must be at least 1"):
        segment_config_from_spec({**spec, "io_worker_max_fields": 0})
    assert segment_config_from_spec({**spec, "io_worker_max_fields": None}).io_worker_max_fields is None
    with pytest.raises(SpecError, match="'io_tasks' should be"):
        segment_config_from_spec({**spec, "io_tasks": "many"})
    # The stall watchdog: seconds, or null to wait forever; never zero or negative.
    assert cfg.stall_timeout_s == 1800 and cfg.stall_restarts == 2
    assert segment_config_from_spec({**spec, "stall_timeout_s": None}).stall_timeout_s is None
    with pytest.raises(SpecError, match="stall_timeout_s must be positive"):
        segment_config_from_spec({**spec, "stall_timeout_s": 0})
    with pytest.raises(SpecError, match="stall_restarts must be 0 or more"):
        segment_config_from_spec({**spec, "stall_restarts": -1})
    # A plate map is the job's, not the config's: a path or URL, read when the job runs.
    assert segment_config_from_spec({**spec, "platemap": "s3://lab/maps/p1.csv"}) == cfg
    with pytest.raises(SpecError, match="'platemap' should be a path or URL"):
        segment_config_from_spec({**spec, "platemap": 5})
    # Inference keys are checked the same way, and the backend can be chosen per job.
    assert not cfg.inference.tta and segment_config_from_spec({**spec, "tta": True}).inference.tta
    assert segment_config_from_spec({**spec, "backend": "onnx"}).inference.backend == "onnx"
    with pytest.raises(SpecError, match="unknown backend 'tpu'"):
        segment_config_from_spec({**spec, "backend": "tpu"})
    with pytest.raises(SpecError, match="'tta' should be bool"):
        segment_config_from_spec({**spec, "tta": "yes"})
    with pytest.raises(SpecError, match="'conf' should be float"):
        segment_config_from_spec({**spec, "conf": "high"})


# --------------------------------------------------------------------------- S3 through moto's server
@pytest.fixture()
def s3(moto):
    """(s3fs filesystem, storage options, bucket) on conftest's moto server."""
    import s3fs

    opts = s3_options(moto["port"])
    return s3fs.S3FileSystem(**opts), opts, moto["bucket"]


def test_s3_in_and_out(s3, tmp_path, ray_local):
    from livecell_ray import open_results

    fs, opts, b = s3
    for p in FEW:
        fs.put(str(p), f"{b}/exp1/{p.name}")
    cfg = SegmentConfig(source=f"s3://{b}/exp1", out=f"s3://{b}/results/exp1", storage_options=opts)
    summary = pipeline.run(cfg)
    assert summary.fields_done == len(FEW) and summary.fields_failed == 0
    o = store.Outputs(f"s3://{b}/results/exp1", opts)
    fields = o.read_table("fields")
    assert len(fields) == len(FEW) and all(p.startswith(f"s3://{b}/exp1/") for p in fields["path"])
    cells = o.read_table("cells")
    for f in fields.itertuples():
        lab = store.read_labels(o, f.plate, f.zarr_path.split(".zarr/", 1)[1], f.t_index)
        assert lab.shape == (520, 704) and int(lab.max()) == f.n_cells
        assert (cells["field_id"] == f.field_id).sum() == f.n_cells
    res = open_results(f"s3://{b}/results/exp1", opts)
    assert res.sql("SELECT count(*) FROM cells").fetchall()[0][0] == len(cells)
    assert fs.exists(f"{b}/results/exp1/run.json")
    # Rerun resumes: nothing to do, nothing duplicated.
    again = pipeline.run(cfg)
    assert again.fields_skipped == len(FEW) and again.fields_done == 0
    assert len(o.read_table("cells")) == len(cells)
    # The plate is imaged again: the new timepoint grows the arrays on the object store in place.
    first = fields.sort_values("path").iloc[0]
    zpath = first.zarr_path.split(".zarr/", 1)[1]
    before = store.read_labels(o, first.plate, zpath, 0)
    later = re.sub(r"_\d+d\d+h\d+m_", "_09d00h00m_", first.path.rsplit("/", 1)[-1])
    fs.copy(first.path.removeprefix("s3://"), f"{b}/exp1/{later}")
    grown = pipeline.run(cfg)
    assert (grown.fields_done, grown.fields_failed) == (1, 0), grown.failures
    np.testing.assert_array_equal(store.read_labels(o, first.plate, zpath, 0), before)
    np.testing.assert_array_equal(store.read_labels(o, first.plate, zpath, 1), before)  # the same image


# --------------------------------------------------------------------------- interrupted job resumes
def test_killed_driver_resumes_to_identical_outputs(tmp_path, ray_local):
    plate = _small_plate(tmp_path / "plate", sorted(EXAMPLES.glob("*.tif")))
    ref = tmp_path / "ref"
    pipeline.run(SegmentConfig(source=str(plate), out=str(ref), batch_size=1))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "livecell_ray.cli", "segment", str(plate), str(out), "--batch-size", "1",
           "--num-cpus", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    fields_dir = out / "fields"
    deadline = time.time() + 300
    while time.time() < deadline:
        done = list(fields_dir.rglob("*.parquet")) if fields_dir.exists() else []
        if len(done) >= 3 or proc.poll() is not None:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Ray workers that outlive the driver for a moment may still commit a field: wait until quiet.
    n_before, quiet_since = -1, time.time()
    while time.time() - quiet_since < 3:
        n = len(list(fields_dir.rglob("*.parquet")))
        if n != n_before:
            n_before, quiet_since = n, time.time()
        time.sleep(0.2)
    assert 3 <= n_before < 10, "the driver must be killed mid-run"
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert len(list(fields_dir.rglob("*.parquet"))) == 10
    run = __import__("json").loads((out / "run.json").read_text())
    assert run["last_run"]["fields_skipped"] == n_before
    _assert_same(_snapshot(out), _snapshot(ref))
