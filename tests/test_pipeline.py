"""End to end on a real local Ray runtime: a plate of real LIVECell fields -> Zarr + Parquet."""

from __future__ import annotations

import dataclasses
import json
import shutil

import duckdb
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from livecell_ray import pipeline, store
from livecell_ray.config import DEFAULT_CONF, InferenceConfig, SegmentConfig

from .conftest import EXAMPLES

pytestmark = pytest.mark.slow  # starts Ray (local runtimes, clusters) or a browser

A172 = EXAMPLES / "A172_Phase_A7_1_00d00h00m_1.tif"
MCF7 = EXAMPLES / "MCF7_Phase_E4_1_02d16h00m_1.tif"


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    """10 real examples + a 16-bit field with two timepoints + an RGB field."""
    d = tmp_path_factory.mktemp("plate")
    for p in EXAMPLES.glob("*.tif"):
        shutil.copy(p, d / p.name)
    g = tifffile.imread(A172)
    tifffile.imwrite(d / "A172_Phase_H1_1_00d00h00m_1.tif", g.astype(np.uint16) * 200 + 1000)
    tifffile.imwrite(d / "A172_Phase_H1_1_00d04h00m_1.tif", tifffile.imread(MCF7).astype(np.uint16) * 200)
    Image.fromarray(np.repeat(g[..., None], 3, 2)).save(d / "A172_Phase_H2_1_00d00h00m_1.png")
    return d


@pytest.fixture(scope="module")
def result(plate, tmp_path_factory, ray_module):
    out = tmp_path_factory.mktemp("out") / "run"
    # I/O workers are replaced every 3 fields here, so the run also shows that replacing them loses nothing.
    cfg = SegmentConfig(source=str(plate), out=str(out), batch_size=3, pixel_size=0.5, io_worker_max_fields=3)
    seen = []
    summary = pipeline.run(cfg, lambda res, done, total: seen.append((res["field_id"], done, total,
                                                                      res["measure_pid"])))
    return cfg, summary, out, seen


def _raw(path: str) -> np.ndarray:
    if path.endswith(".png"):
        a = np.asarray(Image.open(path)).astype(np.float32)
        return a[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    return tifffile.imread(path).astype(np.float32)


def test_every_field_once(result):
    cfg, summary, out, seen = result
    assert summary.fields_total == 13 and summary.fields_done == 13 and summary.fields_failed == 0
    assert len(seen) == 13 and seen[-1][1:3] == (13, 13)
    assert len({pid for *_, pid in seen}) >= 13 // 3, "measure/write workers were not replaced"
    fields = store.Outputs(str(out)).read_table("fields")
    assert len(fields) == 13 and fields["field_id"].is_unique
    assert set(fields["status"]) == {"ok"}
    assert (fields["n_cells"] > 0).all(), fields[["path", "n_cells"]]
    h1 = fields[fields["well"] == "H1"].sort_values("timepoint")
    assert list(h1["t_index"]) == [0, 1] and list(h1["timepoint"]) == [0.0, 4.0]


def test_labels_and_cells_match_exactly_and_stats_recompute(result):
    cfg, summary, out, _ = result
    outputs = store.Outputs(str(out))
    fields = outputs.read_table("fields")
    cells = outputs.read_table("cells")
    assert summary.cells == len(cells)
    assert not cells.duplicated(["field_id", "label"]).any()
    for f in fields.itertuples():
        zpath = f.zarr_path.split(".zarr/", 1)[1]
        lab = store.read_labels(outputs, f.plate, zpath, f.t_index)
        c = cells[cells["field_id"] == f.field_id].sort_values("label")
        present = np.unique(lab)
        present = present[present > 0]
        assert np.array_equal(present, c["label"].to_numpy()), f.path
        assert f.n_cells == len(c)
        assert f.confluence == pytest.approx((lab > 0).mean())
        area = np.bincount(lab.ravel())[1:]
        assert np.array_equal(area, c["area_px"].to_numpy())
        np.testing.assert_allclose(c["area_um2"], area * 0.25)
        raw = _raw(f.path)
        sums = np.bincount(lab.ravel(), weights=raw.ravel())[1:]
        np.testing.assert_allclose(c["mean_intensity"], sums / area, rtol=1e-4)
        ys, xs = np.indices(lab.shape)
        np.testing.assert_allclose(c["centroid_y"], np.bincount(lab.ravel(), ys.ravel())[1:] / area, rtol=1e-6)
        np.testing.assert_allclose(c["centroid_x"], np.bincount(lab.ravel(), xs.ravel())[1:] / area, rtol=1e-6)
        assert (c["confidence"] >= (cfg.inference.conf or DEFAULT_CONF)).all()
        assert np.all(np.diff(c["confidence"].to_numpy()) <= 1e-6)  # label order = confidence order
        assert (c["solidity"] <= 1 + 1e-9).all() and (c["eccentricity"].between(0, 1)).all()


def test_large_batches_go_through_in_shards_with_the_same_results(result, ray_local, tmp_path):
    """Batch 16 over 13 fields: shards of 4 at the start and the end (pipeline.cut_shards), each a task that
    reads, has the model segment and measures its fields; batch 3: shards of 3. Same outputs."""
    cfg, _, out, _ = result
    big = dataclasses.replace(cfg, out=str(tmp_path / "b16"), batch_size=16, io_worker_max_fields=4)
    pids = []
    s = pipeline.run(big, lambda res, done, total: pids.append(res["measure_pid"]))
    assert s.fields_done == 13 and s.fields_failed == 0 and s.cells == result[1].cells
    # Shard workers are replaced after 4 fields: one shard each, so the shards had 4 fields or fewer.
    assert len(set(pids)) >= 13 // 4 and max(pids.count(p) for p in set(pids)) <= 4
    key = ["field_id", "label"]
    cols = ["field_id", "label", "area_px", "mean_intensity", "confidence", "perimeter_px", "solidity"]
    a = store.Outputs(str(out)).read_table("cells")[cols].sort_values(key).reset_index(drop=True)
    b = store.Outputs(big.out).read_table("cells")[cols].sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5)


def test_uint16_and_rgb_inputs_segment_like_uint8(result):
    _, _, out, _ = result
    f = store.Outputs(str(out)).read_table("fields").set_index("path")
    base = f[f.index.str.contains("A172_Phase_A7")].iloc[0]
    h1 = f[f.index.str.contains("A172_Phase_H1_1_00d00h00m")].iloc[0]
    rgb = f[f.index.str.contains("A172_Phase_H2")].iloc[0]
    assert abs(int(h1["n_cells"]) - int(base["n_cells"])) <= max(2, 0.05 * base["n_cells"])
    assert abs(int(rgb["n_cells"]) - int(base["n_cells"])) <= max(2, 0.05 * base["n_cells"])


def test_duckdb_query_from_readme(result):
    _, _, out, _ = result
    rows = duckdb.sql(f"SELECT well, count(*) AS n FROM read_parquet('{out}/cells/**/*.parquet', "
                      f"hive_partitioning=true) GROUP BY well ORDER BY well").fetchall()
    cells = store.Outputs(str(out)).read_table("cells")
    assert dict(rows) == cells.groupby("well").size().to_dict()


def test_ome_zarr_reader_opens_plate_wells_fields_labels(result):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Plate, Reader, Well

    _, _, out, _ = result
    plate = out / "masks" / "A172.zarr"
    nodes = list(Reader(parse_url(str(plate)))())
    assert any(isinstance(s, Plate) for s in nodes[0].specs)
    meta = json.loads((plate / "zarr.json").read_text())["attributes"]["ome"]
    assert meta["version"] == "0.5"
    assert sorted(w["path"] for w in meta["plate"]["wells"]) == ["A/7", "H/1", "H/2"]
    well = list(Reader(parse_url(str(plate / "H" / "1")))())
    assert any(isinstance(s, Well) for s in well[0].specs)
    image = list(Reader(parse_url(str(plate / "H" / "1" / "0")))())
    assert any(isinstance(s, Multiscales) for s in image[0].specs)
    assert image[0].data[0].shape == (2, 520, 704)
    label_nodes = [n for n in image if any(isinstance(s, Label) for s in n.specs)]
    assert len(label_nodes) == 1 and label_nodes[0].zarr.path.endswith("labels/cells")
    lab = np.asarray(label_nodes[0].data[0][1])
    assert lab.dtype == np.uint32 and lab.max() > 0


def test_run_json_provenance(result):
    cfg, summary, out, _ = result
    run = json.loads((out / "run.json").read_text())
    assert run["fields_done"] == 13 and run["last_run"]["cells"] == summary.cells
    # Where the time went: every stage ran for every field, and the first field came before the end.
    stages = run["last_run"]["stage_seconds"]
    assert set(stages) == {"read", "model", "finish"} and min(stages.values()) > 0
    assert stages == {k: round(v, 3) for k, v in summary.stage_seconds.items()}
    assert 0 < run["last_run"]["time_to_first_field"] < run["last_run"]["seconds"]
    assert "model replicas busy" in summary.stage_report()
    after_first = (summary.fields_done - 1) / (summary.seconds - summary.time_to_first_field)
    assert summary.steady_fields_per_second == pytest.approx(after_first) and after_first > 0
    sha = run["provenance"]["models"]["*"]["sha256"]
    from livecell_ray.model.models import known_checksums

    assert sha == known_checksums()["small.pt"]
    # The input size the network ran at (the model's own, from weights/models.json), so that a change of it
    # is another run's parameters, not a resume.
    assert run["provenance"]["models"]["*"]["imgsz"] == 832 and cfg.inference.imgsz is None
    moved = json.loads(json.dumps(run["provenance"]))
    moved["models"]["*"]["imgsz"] = 704
    assert not pipeline.same_provenance(moved, run["provenance"])
    assert pipeline.same_provenance(json.loads(json.dumps(run["provenance"])), run["provenance"])


def test_rerun_resumes_without_duplicates(result, ray_local):
    cfg, summary, out, _ = result
    o = store.Outputs(str(out))
    before = o.read_table("cells")
    # A done field whose old failures/ row outlived it (removing it failed): the next run removes it.
    stale = sorted(o.done_field_ids())[0]
    pipeline.write_failure(o, stale, "x.tif", stale, "P", "A1", "write", "x.tif: cannot write outputs")
    assert stale in o.failure_keys()
    replicas_before = _replicas_alive()
    again = pipeline.run(cfg)  # Ray is up: its replicas start before the plan, and find nothing to do
    assert stale not in o.failure_keys()
    assert again.fields_skipped == 13 and again.fields_done == 0
    assert _replicas_alive() == replicas_before == 0
    after = store.Outputs(str(out)).read_table("cells")
    pd.testing.assert_frame_equal(before.sort_values(["field_id", "label"]).reset_index(drop=True),
                                  after.sort_values(["field_id", "label"]).reset_index(drop=True))


def _replicas_alive(wait_s: float = 10.0) -> int:
    """Model replicas (SegmentActor) alive in the local Ray, once those being killed are gone."""
    import time

    import ray._private.state as state

    deadline = time.time() + wait_s
    while True:
        n = sum(a.get("ActorClassName") == "SegmentActor" and a["State"] != "DEAD" for a in state.actors().values())
        if n == 0 or time.time() > deadline:
            return n
        time.sleep(0.2)


def test_a_run_whose_plan_fails_leaves_no_replica_behind(ray_local, tmp_path):
    """With Ray up, replicas start before the plan; a plate the plan refuses stops them again."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    from livecell_ray.plate.manifest import ManifestError

    with pytest.raises(ManifestError, match="no images found"):
        pipeline.run(SegmentConfig(source=str(empty), out=str(tmp_path / "out")))
    assert _replicas_alive() == 0
    assert not (tmp_path / "out").exists()  # nothing written


def test_other_parameters_refuse_without_overwrite(result, tmp_path):
    cfg, _, out, _ = result
    other = SegmentConfig(source=cfg.source, out=cfg.out, inference=InferenceConfig(conf=0.5))
    with pytest.raises(pipeline.RunError, match="another model or other parameters"):
        pipeline.run(other)


def test_a_plate_imaged_between_runs_grows_in_place(ray_local, tmp_path):
    """A time-lapse processed as it is acquired: each rerun brings new timepoints (and here a field that
    sorts before the first one). Written planes stay where they are, new ones go to new t indices and
    new sites, the arrays' time axis grows; a rerun over a folder holding only the newest images too."""
    plate = tmp_path / "plate"
    plate.mkdir()
    for t in ("00d00h00m", "00d04h00m"):
        shutil.copy(A172, plate / f"A172_Phase_A7_2_{t}_1.tif")
    out = tmp_path / "out"
    cfg = SegmentConfig(source=str(plate), out=str(out), batch_size=2)
    assert pipeline.run(cfg).fields_done == 2
    outputs = store.Outputs(str(out))
    first = [store.read_labels(outputs, "A172", "A/7/0", t) for t in (0, 1)]
    assert all(p.max() > 0 for p in first)

    shutil.copy(MCF7, plate / "A172_Phase_A7_2_00d08h00m_1.tif")
    shutil.copy(MCF7, plate / "A172_Phase_A7_1_00d08h00m_1.tif")  # field 1 sorts before field 2
    again = pipeline.run(cfg)
    assert (again.fields_skipped, again.fields_done, again.fields_failed) == (2, 2, 0), again.failures

    # The third run sees only the newest image: it must not renumber the time axis from its own files.
    newest = tmp_path / "newest"
    newest.mkdir()
    shutil.copy(A172, newest / "A172_Phase_A7_2_00d12h00m_1.tif")
    third = pipeline.run(dataclasses.replace(cfg, source=str(newest)))
    assert (third.fields_done, third.fields_failed) == (1, 0), third.failures

    # Each run compacted the well: one part a table, the last one replacing the one before.
    for table in ("cells", "fields"):
        names = [p.name for p in (out / table / "plate=A172" / "well=A7").iterdir()]
        assert len(names) == 1 and names[0].startswith(store.PART_PREFIX), names
    assert json.loads((out / "run.json").read_text())["last_run"]["compaction"]["wells_compacted"] == 1
    fields = outputs.read_table("fields").sort_values(["field", "timepoint"])
    assert list(zip(fields["field"], fields["timepoint"], fields["t_index"], fields["site"])) == [
        ("1", 8.0, 2, "1"), ("2", 0.0, 0, "0"), ("2", 4.0, 1, "0"), ("2", 8.0, 2, "0"), ("2", 12.0, 3, "0")]
    for t, plane in enumerate(first):  # untouched by three runs
        np.testing.assert_array_equal(store.read_labels(outputs, "A172", "A/7/0", t), plane)
    np.testing.assert_array_equal(store.read_labels(outputs, "A172", "A/7/0", 3), first[0])  # same image
    assert store.read_labels(outputs, "A172", "A/7/0", 2).max() > 0
    site1 = [store.read_labels(outputs, "A172", "A/7/1", t) for t in range(4)]
    assert [int(p.max() > 0) for p in site1] == [0, 0, 1, 0]
    root = out / "masks" / "A172.zarr"
    assert [i["path"] for i in json.loads((root / "A" / "7" / "zarr.json").read_text())["attributes"]["ome"][
        "well"]["images"]] == ["0", "1"]
    labels_meta = json.loads((root / "A" / "7" / "0" / "labels" / "cells" / "0" / "zarr.json").read_text())
    assert labels_meta["shape"] == [4, 520, 704]


@pytest.mark.parametrize("n,batch,ramp", [(400, 64, 2), (13, 16, 2), (10, 4, 3), (1, 64, 2), (0, 8, 2),
                                         (2000, 256, 17)])
def test_shards_cover_every_field_once_in_order_with_small_ones_first_and_last(n, batch, ramp):
    shards = pipeline.cut_shards(list(range(n)), batch, ramp)
    assert [f for s in shards for f in s] == list(range(n))
    small = min(batch, max(4, batch // 4))
    assert all(0 < len(s) <= batch for s in shards)
    assert all(len(s) <= small for s in shards[:ramp])  # the first fields come out soon
    if n >= batch * 2 * ramp:  # and the run ends on small shards, not one full one
        assert all(len(s) <= small for s in shards[-ramp:])


def test_shards_in_flight_follow_the_cpus_and_stay_within_the_memory_budget(ray_local):
    base = SegmentConfig(source="unused", out="unused", batch_size=64)
    assert pipeline.in_flight(base, replicas=1) == 2  # the local Ray's 2 CPUs
    many = dataclasses.replace(base, io_tasks=40)
    assert pipeline.in_flight(many, replicas=1) == 2048 * 2**20 // (64 * 704 * 520 * 4) == 22
    tight = dataclasses.replace(many, object_store_budget_mb=64)
    assert pipeline.in_flight(tight, replicas=3) == 4  # never fewer than a shard a replica and one more


def test_a_local_ray_started_by_the_pipeline_keeps_its_workers_offline(tmp_path):
    """init_ray starts a local Ray with no job runtime_env (so its prestarted worker can be the replica's):
    the offline settings must reach the workers through the inherited environment instead."""
    import os
    import subprocess
    import sys

    code = (
        "import json, os, ray\n"
        "from livecell_ray import pipeline\n"
        "from livecell_ray.config import SegmentConfig\n"
        "pipeline.init_ray(SegmentConfig(source='unused', out='unused', num_cpus=1))\n"
        "env = ray.remote(num_cpus=0.25)(lambda: {k: os.environ.get(k) for k in "
        "('YOLO_OFFLINE', 'YOLO_AUTOINSTALL', 'RAY_USAGE_STATS_ENABLED', 'YOLO_CONFIG_DIR')})\n"
        "print(json.dumps(ray.get(env.remote())))\n"
        "ray.shutdown()\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "RAY_"))}
    clean["YOLO_CONFIG_DIR"] = str(tmp_path / "yolo")
    done = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "RAY_USAGE_STATS_ENABLED": "0",
                    "YOLO_CONFIG_DIR": str(tmp_path / "yolo")}
