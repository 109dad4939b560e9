"""One writer at a time per OUT: the lease, and two runs bringing different timepoints into one plate."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from livecell_ray import store

from .conftest import EXAMPLES, s3_options


def _outputs(kind: str, tmp_path, moto) -> store.Outputs:
    if kind == "local":
        return store.Outputs(str(tmp_path / "out"))
    return store.Outputs(f"s3://{moto['bucket']}/out", s3_options(moto["port"]))


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    if request.param == "local":
        return store.Outputs(str(tmp_path / "out"))
    return _outputs("s3", tmp_path, request.getfixturevalue("moto"))


def test_a_second_writer_is_refused_then_takes_the_next_token(where):
    first = store.acquire(where, ttl_s=30)
    with pytest.raises(store.LeaseBusy) as err:
        store.acquire(where, ttl_s=30)
    assert first.owner in str(err.value) and "--wait" in str(err.value)
    first.release()
    second = store.acquire(where, ttl_s=30)
    assert second.token == first.token + 1
    second.check()
    second.release()


def test_racing_writers_get_one_token_each(where):
    """Eight writers reach for the lease at once: exactly one holds it; the conditional create decides."""
    got, busy, errors = [], [], []

    def grab() -> None:
        try:
            got.append(store.acquire(where, ttl_s=30))
        except store.LeaseBusy:
            busy.append(1)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(got) == 1 and len(busy) == 7
    got[0].release()


def test_a_dead_writers_lease_expires_and_the_stalled_writer_learns_it_lost(where):
    stalled = store.acquire(where, ttl_s=1.5)
    stalled._stop.set()  # it stops renewing, as a frozen or killed run would
    with pytest.raises(store.LeaseBusy):
        store.acquire(where, ttl_s=30)
    time.sleep(2.0)
    taker = store.acquire(where, ttl_s=30)
    assert taker.token == stalled.token + 1
    with pytest.raises(store.LeaseLost, match="took OUT over"):
        stalled.check()
    taker.release()


def test_a_killed_writer_on_this_host_frees_its_lease_at_once(tmp_path):
    """A run SIGKILLed on this machine: its process is gone, so the same command run again takes over
    without waiting out the lease (on another host only the expiry can tell)."""
    import json
    import socket

    out = store.Outputs(str(tmp_path / "out"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lease_dir = tmp_path / "out" / ".lease"
    lease_dir.mkdir(parents=True)
    rec = {"owner": f"{socket.gethostname()}:{dead.pid}:dead", "host": socket.gethostname(), "pid": dead.pid,
           "token": 4, "expires": time.time() + 600}
    (lease_dir / "000000000004.json").write_text(json.dumps(rec))
    taken = store.acquire(out, ttl_s=30)
    assert taken.token == 5
    taken.release()
    alive = {**rec, "pid": __import__("os").getpid(), "token": 6}  # a live process still holds it
    (lease_dir / "000000000006.json").write_text(json.dumps(alive))
    with pytest.raises(store.LeaseBusy):
        store.acquire(out, ttl_s=30)


def test_a_waiting_writer_starts_when_the_holder_releases(where):
    holder = store.acquire(where, ttl_s=30)
    said, got = [], []
    t = threading.Thread(target=lambda: got.append(store.acquire(where, ttl_s=30, wait=True, poll_s=0.1,
                                                                  on_wait=said.append)))
    t.start()
    time.sleep(0.8)
    assert not got and said and holder.owner in said[0]
    holder.release()
    t.join(timeout=30)
    assert got and got[0].token == holder.token + 1
    got[0].release()


def _series(dst, hours: int) -> str:
    dst.mkdir(parents=True)
    for p in sorted(EXAMPLES.glob("BT474_*.tif")) + sorted(EXAMPLES.glob("MCF7_*.tif")):
        cell, _, well, field, _, crop = p.stem.split("_")
        shutil.copy(p, dst / f"BT474_Phase_{well}_{field}_00d{hours:02d}h00m_{crop}.tif")
    return str(dst)


def _planes(out: store.Outputs) -> dict[str, np.ndarray]:
    fields = out.read_table("fields")
    return {r.field_id: store.read_labels(out, r.plate, r.zarr_path.split(".zarr/", 1)[1], int(r.t_index))
            for r in fields.itertuples()}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_two_runs_bringing_different_timepoints_into_one_plate(kind, tmp_path, request):
    """Two `segment` commands into one OUT at once, each with other timepoints of the same wells: the
    second waits for the first (--wait), and every label plane is the one its own run wrote (equal to
    a lone run's for that field); without --wait the second stops with a message naming the first."""
    moto = request.getfixturevalue("moto") if kind == "s3" else None
    early, late = _series(tmp_path / "t0", 0), _series(tmp_path / "t4", 4)
    out = _outputs(kind, tmp_path, moto)
    opts = ["--storage-options", __import__("json").dumps(s3_options(moto["port"]))] if moto else []
    base = [sys.executable, "-m", "livecell_ray.cli", "segment"]
    runs = [subprocess.Popen([*base, src, out.url, "--wait", "--num-cpus", "1", *opts], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for src in (early, late)]
    results = [p.communicate(timeout=900) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], [r[1][-2000:] for r in results]
    assert any("waiting for run" in err for _, err in results)  # one of them did wait
    fields = out.read_table("fields")
    assert len(fields) == 6 and sorted(fields["t_index"]) == [0, 0, 0, 1, 1, 1]
    assert fields.groupby(["well", "site", "t_index"]).size().max() == 1
    # every plane is its own run's: equal to a lone run over the same file
    lone = store.Outputs(str(tmp_path / "lone"))
    for src in (early, late):
        p = subprocess.run([*base, src, lone.url, "--num-cpus", "1"], capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-2000:]
    mine, ref = _planes(out), _planes(lone)
    assert mine.keys() == ref.keys() and len(mine) == 6
    for fid in ref:
        np.testing.assert_array_equal(mine[fid], ref[fid], err_msg=fid)
    # a run that does not wait is told who holds OUT, and writes nothing
    holder = store.acquire(out, ttl_s=60)
    try:
        p = subprocess.run([*base, early, out.url, "--num-cpus", "1", *opts], capture_output=True, text=True,
                           timeout=600)
    finally:
        holder.release()
    assert p.returncode == 2 and "is being written by run" in p.stderr and holder.owner in p.stderr
