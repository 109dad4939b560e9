"""Nothing lost: bad input, killed actors, removed nodes, object-store outages, atomic writes.

Each test runs the real pipeline on a real local Ray runtime (or a real multi-node
ray.cluster_utils.Cluster) over real files, and checks the promise: every field ends up either
segmented exactly once or listed in failures/ with its reason.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from livecell_ray import pipeline, store
from livecell_ray.config import SegmentConfig

from .conftest import EXAMPLES, s3_options
from .s3proxy import FaultyProxy

pytestmark = pytest.mark.slow  # starts Ray (local runtimes, clusters) or a browser

GOOD = sorted(EXAMPLES.glob("*.tif"))
A172 = EXAMPLES / "A172_Phase_A7_1_00d00h00m_1.tif"


def _name(well: str, ext: str = "tif") -> str:
    return f"BAD_Phase_{well}_1_00d00h00m_1.{ext}"


def _check_exactly_once(out: Path, expect_ok: set[str], expect_failed: set[str]) -> None:
    o = store.Outputs(str(out))
    fields = o.read_table("fields")
    failures = o.read_table("failures")
    names = [Path(p).name for p in fields["path"]]
    assert sorted(names) == sorted(expect_ok), "each good field exactly once"
    assert fields["field_id"].is_unique
    fnames = [Path(p).name for p in failures["path"]] if len(failures) else []
    assert sorted(fnames) == sorted(expect_failed)
    cells = o.read_table("cells")
    assert not cells.duplicated(["field_id", "label"]).any()
    assert set(cells["field_id"]) <= set(fields["field_id"])


@pytest.fixture()
def bad_plate(tmp_path) -> tuple[Path, dict[str, str]]:
    """3 good real fields, a 16-bit and an RGB copy (must segment), and every kind of bad file."""
    d = tmp_path / "plate"
    d.mkdir()
    for p in GOOD[:3]:
        shutil.copy(p, d / p.name)
    g = tifffile.imread(A172)
    tifffile.imwrite(d / _name("H1"), g.astype(np.uint16) * 250)
    Image.fromarray(np.repeat(g[..., None], 3, 2)).save(d / _name("H2", "png"))
    expected = {}
    (d / _name("B1")).write_bytes(b"")
    expected[_name("B1")] = "empty file"
    raw = (d / GOOD[0].name).read_bytes()
    (d / _name("B2")).write_bytes(raw[: len(raw) // 3])
    expected[_name("B2")] = "cannot decode"
    buf = io.BytesIO()
    Image.fromarray(g).save(buf, format="PNG")
    (d / _name("B3")).write_bytes(buf.getvalue())  # a PNG renamed .tif: decodes by content, must segment
    (d / _name("B4")).write_text("this is a lab notebook entry, not an image\n")
    expected[_name("B4")] = "cannot decode"
    tifffile.imwrite(d / _name("B5"), np.stack([g, g, g, g, g]))
    expected[_name("B5")] = "holds 5 planes"  # a stack among single fields fails alone, never averaged
    tifffile.imwrite(d / _name("B6"), np.zeros((520, 704), np.uint8))
    expected[_name("B6")] = "blank image"
    tifffile.imwrite(d / _name("B7"), np.ones((1, 1), np.uint8))
    expected[_name("B7")] = "too small"
    tifffile.imwrite(d / _name("B8"), np.tile(g, (4, 4)))  # 2080 x 2816 = 5.9 MP
    expected[_name("B8")] = "exceeds the limit"
    unreadable = d / _name("B9")
    if os.geteuid() == 0:
        # root reads through permission bits; a dangling link is the unreadable file root can have.
        unreadable.symlink_to(d / "gone-away.tif")
        expected[_name("B9")] = "not found"
    else:
        shutil.copy(A172, unreadable)
        unreadable.chmod(0)
        expected[_name("B9")] = "permission denied"
    return d, expected


def test_bad_files_fail_alone_and_the_rest_completes(bad_plate, tmp_path):
    plate, expected = bad_plate
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "livecell_ray.cli", "segment", str(plate), str(out), "--max-pixels", "4000000",
           "--num-cpus", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "250"})
    assert p.returncode == 0, p.stderr
    assert "failed" in p.stdout and f"│ {len(expected)} " in p.stdout.replace("  ", " ")
    ok = {x.name for x in GOOD[:3]} | {_name("H1"), _name("H2", "png"), _name("B3")}
    _check_exactly_once(out, ok, set(expected))
    failures = store.Outputs(str(out)).read_table("failures").set_index("key")
    for row in failures.itertuples():
        name = Path(row.path).name
        assert row.stage == "read"
        assert expected[name] in row.error and name in row.error, (name, row.error)
    strict = subprocess.run([*cmd, "--strict"], capture_output=True, text=True, timeout=600)
    assert strict.returncode == 1  # failures retried, still failing: --strict says so


def _run_in_thread(cfg: SegmentConfig, on_result):
    box: dict = {}

    def target():
        try:
            box["summary"] = pipeline.run(cfg, on_result)
        except BaseException as exc:  # surfaced by the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def test_model_actor_killed_mid_run(tmp_path, example_plate, ray_local):
    plate = example_plate
    killed, after = [], []

    def on_result(res, done, total):
        if killed:
            after.append(int(res["model_pid"]))
        elif res["model_pid"]:
            os.kill(int(res["model_pid"]), 9)  # the model replica's process dies mid-run
            killed.append(int(res["model_pid"]))

    cfg = SegmentConfig(source=str(plate), out=str(tmp_path / "out"), batch_size=1)
    t, box = _run_in_thread(cfg, on_result)
    t.join(600)
    assert not t.is_alive() and "error" not in box, box.get("error")
    assert killed
    # the fault took effect and was survived: a new replica process served fields after the kill
    assert any(pid not in (0, killed[0]) for pid in after), (killed, after)
    assert box["summary"].fields_done == len(GOOD)
    _check_exactly_once(tmp_path / "out", {p.name for p in GOOD}, set())


def test_frozen_replica_stall_is_started_again(tmp_path, example_plate, ray_local):
    """A model replica that freezes without dying (a hung GPU call; SIGSTOP here) leaves its shards
    waiting for good. With stall_restarts=0 the run stops with a clear error and keeps what finished;
    the rerun freezes again, throws that execution away after stall_timeout_s, starts it again over
    the fields left and finishes the plate: every field exactly once."""
    out = tmp_path / "out"
    frozen: list[int] = []

    def freeze_first_replica(res, done, total):
        if len(frozen) < attempt[0] and res["model_pid"]:
            os.kill(int(res["model_pid"]), signal.SIGSTOP)
            frozen.append(int(res["model_pid"]))

    def run(restarts: int) -> dict:
        # 30 s: long enough for a fresh execution (driver actor, model replica) to finish its first field
        # on a busy 2-core CI machine, so that only the frozen replica counts as a stall.
        cfg = SegmentConfig(source=str(example_plate), out=str(out), batch_size=1, stall_timeout_s=30,
                            stall_restarts=restarts)
        t, box = _run_in_thread(cfg, freeze_first_replica)
        t.join(600)
        assert not t.is_alive(), "the watchdog did not end the stalled execution"
        return box

    attempt = [1]
    try:
        box = run(restarts=0)
        assert isinstance(box.get("error"), pipeline.RunError), box
        msg = str(box["error"])
        assert str(out) in msg and "stopped making progress 1 time (last: no field finished for 30 s)" in msg
        first = store.Outputs(str(out)).done_field_ids()
        assert 1 <= len(first) < len(GOOD)  # what finished before the freeze is kept
        attempt[0] = 2
        box = run(restarts=1)
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass  # killed with its execution, as it should be
    assert "error" not in box, box.get("error")
    summary = box["summary"]
    assert len(frozen) == 2 and frozen[0] != frozen[1]
    assert summary.fields_skipped == len(first)
    assert summary.fields_done == len(GOOD) - len(first)
    assert len(summary.restarts) == 1 and summary.restarts[0].startswith("no field finished for 30 s")
    assert json.loads((out / "run.json").read_text())["last_run"]["restarts"] == summary.restarts
    _check_exactly_once(out, {p.name for p in GOOD}, set())


def test_a_replica_that_cannot_load_stops_the_run_with_its_reason(tmp_path, example_plate, monkeypatch):
    """A replica whose model fails to load (a CUDA out-of-memory, here raised by its constructor) fails
    every batch sent to it: the run stops with one error naming the cause, records no field as failed,
    and the same command resumes once the cause is gone."""
    import ray

    from livecell_ray import offline

    if ray.is_initialized():
        ray.shutdown()  # a fresh Ray: the replica class is exported with the fault below
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": offline.worker_env()})
    out = tmp_path / "out"
    cfg = SegmentConfig(source=str(example_plate), out=str(out), batch_size=4)
    try:
        def cannot_load(self, *args, **kwargs):
            raise RuntimeError("CUDA out of memory (test)")

        monkeypatch.setattr(pipeline.SegmentActor, "__init__", cannot_load)
        with pytest.raises(pipeline.RunError, match=r"a model replica stopped for good \(RuntimeError: CUDA out "
                                                    r"of memory \(test\)\).*run the same command again"):
            pipeline.run(cfg)
        o = store.Outputs(str(out))
        assert o.read_table("failures").empty and o.done_field_ids() == set()
    finally:
        ray.shutdown()  # the next user starts Ray again, with the class as it is
    monkeypatch.undo()
    summary = pipeline.run(cfg)
    assert summary.fields_done == len(GOOD) and summary.fields_failed == 0
    _check_exactly_once(out, {p.name for p in GOOD}, set())


def test_node_removed_mid_run(tmp_path, example_plate):
    import ray
    from ray.cluster_utils import Cluster

    from livecell_ray import offline

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        nodes = [cluster.add_node(num_cpus=2, resources={"gpu_standin": 1}) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env={"env_vars": offline.worker_env()}, log_to_driver=False)
        plate = example_plate
        removed, after = [], []

        def on_result(res, done, total):
            if removed:
                after.append(res["model_node"])
            else:
                victim = next(n for n in nodes if n.node_id == res["model_node"])
                cluster.remove_node(victim)  # the node running the model replica disappears
                removed.append(victim.node_id)

        # Should a lost node ever leave the execution hanging, the stall watchdog starts it again.
        cfg = SegmentConfig(source=str(plate), out=str(tmp_path / "out"), batch_size=1,
                            replica_resources={"gpu_standin": 1}, address=cluster.address, stall_timeout_s=60)
        t, box = _run_in_thread(cfg, on_result)
        t.join(600)
        assert not t.is_alive() and "error" not in box, box.get("error")
        assert removed
        # the surviving node's replica segmented the fields after the removal
        survivor = next(n.node_id for n in nodes if n.node_id != removed[0])
        assert after and survivor in after and removed[0] not in after[-3:], (removed, after)
        _check_exactly_once(tmp_path / "out", {p.name for p in GOOD}, set())
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_writer_killed_between_write_and_rename(tmp_path):
    out = tmp_path / "out"
    code = ("import sys, pyarrow as pa; from livecell_ray import store; "
            "o = store.Outputs(sys.argv[1]); "
            "o.write_table(o.table_path('fields', 'P', 'A1', 'abc'), pa.table({'field_id': ['abc']}))")
    env = {**os.environ, "LIVECELL_RAY_CRASH_BEFORE_RENAME": "1"}
    p = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, timeout=120)
    assert p.returncode == -9  # killed between the two steps
    leftovers = list((out / "fields").rglob("*"))
    assert any(x.name.endswith(".tmp") for x in leftovers)
    assert not any(x.name.endswith(".parquet") for x in leftovers)
    o = store.Outputs(str(out))
    assert o.read_table("fields").empty and o.done_field_ids() == set()
    import duckdb

    n = duckdb.sql(f"SELECT count(*) FROM glob('{out}/fields/**/*.parquet')").fetchall()[0][0]
    assert n == 0
    assert o.clean_temporary() == 1
    p = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, timeout=120)
    assert p.returncode == 0 and o.done_field_ids() == {"abc"}


# --------------------------------------------------------------------------- object-store faults
def _upload(moto: dict, files) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options(moto["port"]))
    for p in files:
        fs.put(str(p), f"{moto['bucket']}/plate/{p.name}")


def test_s3_server_restarted_mid_run(moto, tmp_path, ray_local):
    from moto.server import ThreadedMotoServer

    _upload(moto, GOOD)
    restarted = []

    def on_result(res, done, total):
        if not restarted:
            moto["server"].stop()  # the object store goes away...
            time.sleep(1.5)
            moto["server"] = ThreadedMotoServer(ip_address="127.0.0.1", port=moto["port"])
            moto["server"].start()  # ...and comes back (moto keeps its buckets in this process)
            restarted.append(done)

    # Through a proxy in front of moto, which logs every request the stopped server could not answer.
    proxy = FaultyProxy(moto["port"])
    cfg = SegmentConfig(source=f"s3://{moto['bucket']}/plate", out=f"s3://{moto['bucket']}/out",
                        storage_options=s3_options(proxy.port),
                        batch_size=1)
    try:
        t, box = _run_in_thread(cfg, on_result)
        t.join(600)
    finally:
        proxy.stop()
    assert not t.is_alive() and "error" not in box, box.get("error")
    assert restarted
    assert proxy.upstream_failures, "no request met the outage: the fault did not take effect"
    o = store.Outputs(f"s3://{moto['bucket']}/out", s3_options(moto["port"]))
    fields, failures = o.read_table("fields"), o.read_table("failures")
    # The promise: each field segmented exactly once or recorded as failed, and a rerun finishes the job.
    assert len(fields) + len(failures) == len(GOOD) and fields["field_id"].is_unique
    again = pipeline.run(dataclasses.replace(cfg, storage_options=s3_options(moto["port"])))
    assert again.fields_failed == 0
    fields = o.read_table("fields")
    assert len(fields) == len(GOOD) and fields["field_id"].is_unique and o.read_table("failures").empty


def test_s3_throttling_and_5xx_are_retried(moto, tmp_path, ray_local):
    _upload(moto, GOOD[:3])
    proxy = FaultyProxy(moto["port"], throttle_every=5)
    try:
        cfg = SegmentConfig(source=f"s3://{moto['bucket']}/plate", out=f"s3://{moto['bucket']}/out",
                            storage_options=s3_options(proxy.port))
        summary = pipeline.run(cfg)
        assert proxy.injected >= 3, "the proxy must actually have injected faults"
        assert summary.fields_done == 3 and summary.fields_failed == 0
    finally:
        proxy.stop()
    o = store.Outputs(f"s3://{moto['bucket']}/out", s3_options(moto["port"]))
    assert len(o.read_table("fields")) == 3 and o.read_table("failures").empty


def test_s3_commit_marker_comes_last_and_requests_are_few(moto, tmp_path, ray_local):
    """On an object store every request is tens of ms of latency: a field's masks and cells go as one
    concurrent batch, then its fields/ commit marker, which must arrive after all of them (else a
    crash could leave a field marked done without its outputs). A field that never failed sends
    nothing under failures/."""
    _upload(moto, GOOD[:3])
    proxy = FaultyProxy(moto["port"])
    out = f"s3://{moto['bucket']}/out"
    try:
        summary = pipeline.run(SegmentConfig(source=f"s3://{moto['bucket']}/plate", out=out,
                                             storage_options=s3_options(proxy.port)))
        assert summary.fields_done == 3 and summary.fields_failed == 0
    finally:
        proxy.stop()
    log = proxy.log
    assert not [p for _, p in log if "/out/failures/" in p]
    fields = store.Outputs(out, s3_options(moto["port"])).read_table("fields")
    for fid, zpath in zip(fields["field_id"], fields["zarr_path"]):
        puts = [(i, p) for i, (m, p) in enumerate(log) if m == "PUT"]
        marker = [i for i, p in puts if "/out/fields/" in p and p.endswith(f"/{fid}.parquet")]
        outputs = [i for i, p in puts if ("/out/cells/" in p and p.endswith(f"/{fid}.parquet"))
                   or (f"/out/{zpath}/" in p and "/c/" in p)]
        assert len(marker) == 1 and len(outputs) == 3  # the cells file and the image and labels chunks
        assert max(outputs) < marker[0]
        # Its two array documents are read once each, by a GET (s3fs would add a HEAD and a LIST each).
        docs = (f"/out/{zpath}/0/zarr.json", f"/out/{zpath}/labels/cells/0/zarr.json")
        reads = [(m, p) for m, p in log if m != "PUT" and any(d[1:] in p for d in docs)]  # LISTs too
        assert sorted(reads) == sorted(("GET", f"/{moto['bucket']}{d}") for d in docs), reads


def test_field_whose_writes_keep_failing_goes_to_failures(moto, tmp_path, ray_local):
    _upload(moto, GOOD[:3])
    bad_well = GOOD[0].name.split("_")[2]
    proxy = FaultyProxy(moto["port"], fail_put=f"well%3D{bad_well}/")
    try:
        cfg = SegmentConfig(source=f"s3://{moto['bucket']}/plate", out=f"s3://{moto['bucket']}/out",
                            storage_options=s3_options(proxy.port))
        summary = pipeline.run(cfg)
        assert summary.fields_done == 2 and summary.fields_failed == 1
    finally:
        proxy.stop()
    o = store.Outputs(f"s3://{moto['bucket']}/out", s3_options(moto["port"]))
    fields, failures = o.read_table("fields"), o.read_table("failures")
    assert bad_well not in set(fields["well"].astype(str))
    assert len(failures) == 1 and failures["stage"].iloc[0] == "write" and GOOD[0].name in failures["path"].iloc[0]
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options(moto["port"]))
    assert not fs.glob(f"{moto['bucket']}/out/cells/**/well={bad_well}/*")  # never half-written
