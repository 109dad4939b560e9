"""Compaction: a well's per-field Parquet files merged into parts, with every row readable exactly once
whatever point a compaction is stopped at (real Parquet on disk, a real killed process, real S3)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from livecell_ray import store
from livecell_ray.answers import query
from livecell_ray.store import compact

WELLS = [("P1", "A1"), ("P1", "A2"), ("P2", "B3")]


def write_field(o: store.Outputs, plate: str, well: str, fid: str, n: int, t: float = 0.0,
                commit: bool = True) -> None:
    """One field's files as the pipeline writes them: its cells, then its fields/ commit marker."""
    cells = store.table_from_columns({"field_id": [fid] * n, "label": np.arange(1, n + 1, dtype=np.uint32),
                                      "area_px": np.arange(n, dtype=np.int64) * 10 + 50,
                                      "eccentricity": np.linspace(0, 0.9, n), "solidity": np.full(n, 0.8),
                                      "mean_intensity": np.full(n, 100.0 + n), "timepoint": np.full(n, t),
                                      "cell_type": ["A172"] * n})
    o.write_bytes(o.table_path("cells", plate, well, fid), store.parquet_bytes(cells))
    if commit:
        row = store.table_from_columns({"field_id": [fid], "n_cells": [n], "timepoint": [t],
                                        "confluence": [0.1 * n], "cell_type": ["A172"], "path": [f"{fid}.tif"],
                                        "status": ["ok"]})
        o.write_bytes(o.table_path("fields", plate, well, fid), store.parquet_bytes(row))


def plate_out(out: str, opts: dict | None = None, per_well: int = 4, t: float = 0.0) -> store.Outputs:
    o = store.Outputs(out, opts)
    for w, (plate, well) in enumerate(WELLS):
        for f in range(per_well):
            write_field(o, plate, well, f"{w:02d}{f:02d}{int(t):04d}aaaaaaaa", n=3 + f + w, t=t)
    return o


def snapshot(o: store.Outputs) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, set[str]]:
    """What a reader sees: fields and cells rows (sorted), DuckDB's per-well answers, the done set."""
    fields = o.read_table("fields").sort_values("field_id").reset_index(drop=True)
    cells = o.read_table("cells").sort_values(["field_id", "label"]).reset_index(drop=True)
    wells = query.open_results(o.url, o.storage_options).wells()
    return fields[sorted(fields.columns)], cells[sorted(cells.columns)], wells, o.done_field_ids()


def assert_same(a, b) -> None:
    for x, y in zip(a[:3], b[:3]):
        pd.testing.assert_frame_equal(x, y, check_dtype=False)
    assert a[3] == b[3]


def files(o: store.Outputs, table: str) -> list[str]:
    return sorted(p.rsplit("/", 1)[-1] for p in o.fs.find(store.join(o.root, table)) if p.endswith(".parquet"))


def test_compaction_merges_each_well_and_readers_see_the_same_rows(tmp_path):
    o = plate_out(str(tmp_path / "out"))
    write_field(o, "P1", "A1", "ffffffffffffffff", n=7, commit=False)  # cells written, never committed
    before = snapshot(o)
    assert len(before[0]) == 12 and "ffffffffffffffff" not in set(before[1]["field_id"])
    s = compact.compact(o.url)
    assert (s.wells, s.wells_compacted, s.fields, s.errors) == (3, 3, 12, [])
    assert_same(snapshot(o), before)
    # One part a table a well, plus the uncommitted field's cells file, which stays for its rerun.
    assert [f for f in files(o, "fields") if not f.startswith("part-")] == []
    assert len(files(o, "fields")) == 3 and len(files(o, "cells")) == 4
    assert "ffffffffffffffff.parquet" in files(o, "cells")
    # Compacting again changes nothing: one part alone is already compact.
    again = compact.compact(o.url)
    assert again.wells_compacted == 0 and len(files(o, "fields")) == 3
    assert_same(snapshot(o), before)


def test_new_fields_after_a_compaction_join_a_new_part_that_replaces_the_old(tmp_path):
    """A time-lapse compacted after every run: the well keeps one part, holding every timepoint."""
    o = plate_out(str(tmp_path / "out"))
    compact.compact(o.url)
    old_parts = set(files(o, "fields"))
    plate_out(o.url, t=4.0)  # the next timepoint's fields
    mid = snapshot(o)
    assert len(mid[0]) == 24 and len(mid[1]) == 2 * 66  # 66 cells a timepoint (plate_out's n)
    s = compact.compact(o.url)
    assert (s.wells_compacted, s.fields) == (3, 24)
    assert_same(snapshot(o), mid)
    parts = set(files(o, "fields"))
    assert len(parts) == 3 and not parts & old_parts


@pytest.mark.slow
@pytest.mark.parametrize("step", ["cells_part", "fields_part"])
def test_a_compaction_killed_at_any_step_loses_and_duplicates_nothing(tmp_path, step):
    """The process is really killed (SIGKILL) after writing the new cells part, or after committing the
    fields part but before any clean-up; readers must see every row once, and the next compaction
    finishes the job. A second round does it over a well that already had a part."""
    out = str(tmp_path / "out")
    o = plate_out(out)
    for round_ in range(2):
        before = snapshot(o)
        code = f"from livecell_ray import compact; compact.compact({out!r}, threads=1)"
        p = subprocess.run([sys.executable, "-c", code], env={**os.environ,
                           "LIVECELL_RAY_CRASH_IN_COMPACT": step}, capture_output=True, text=True, timeout=120)
        assert p.returncode == -9, p.stderr
        assert_same(snapshot(o), before)  # mid-way: nothing lost, nothing twice
        if step == "fields_part":  # committed, clean-up cut off part-way: half the old files gone
            c = o.committed("P1", "A1")
            assert c.stale and len(c.parts) == 1
            for path in c.stale[: len(c.stale) // 2]:
                o.remove(path)
            assert_same(snapshot(o), before)
        s = compact.compact(out)
        assert s.errors == []
        assert_same(snapshot(o), before)
        # Stale files gone; a cut-off compaction's cells part stays while young (it could be another
        # compaction's, still at work), ignored by every reader, and goes once old enough.
        orphans = 1 if step == "cells_part" else 0  # the process died at its first well
        assert len(files(o, "fields")) == 3 and len(files(o, "cells")) == 3 + orphans
        compact.compact(out, orphan_age_s=0)
        assert len(files(o, "cells")) == 3
        assert_same(snapshot(o), before)
        plate_out(out, t=4.0 * (round_ + 1))  # next round: wells that already hold a part


def test_a_well_that_cannot_be_read_is_reported_by_file_and_left_as_it_was(tmp_path):
    o = plate_out(str(tmp_path / "out"))
    bad = o.table_path("fields", "P2", "B3", "0200" + "0000aaaaaaaa")
    Path(bad).write_bytes(b"PAR1 not really parquet PAR1")
    s = compact.compact(o.url)
    assert s.wells_compacted == 2 and len(s.errors) == 1
    assert "well B3" in s.errors[0] and f"{bad}: not a readable Parquet file" in s.errors[0], s.errors
    assert len([f for f in files(o, "fields") if not f.startswith("part-")]) == 4  # B3 untouched


def test_a_field_whose_cells_file_was_removed_is_named_and_its_well_left(tmp_path):
    o = plate_out(str(tmp_path / "out"))
    gone = o.table_path("cells", "P1", "A2", "01020000aaaaaaaa")
    os.remove(gone)
    s = compact.compact(o.url)
    assert s.wells_compacted == 2 and len(s.errors) == 1
    assert o.table_path("fields", "P1", "A2", "01020000aaaaaaaa") + ": its cells file is missing" in s.errors[0]


def test_compaction_on_s3(moto):
    """Through s3fs against a real S3 server: listings, concurrent reads, commit order, clean-up."""
    from .conftest import s3_options

    opts = s3_options(moto["port"])
    out = f"s3://{moto['bucket']}/out"
    o = plate_out(out, opts)
    before = snapshot(o)
    s = compact.compact(out, opts)
    assert (s.wells_compacted, s.errors) == (3, [])
    assert_same(snapshot(o), before)
    assert all(f.startswith("part-") for f in files(o, "fields") + files(o, "cells"))
    assert len(files(o, "fields")) == 3


def test_table_of_parts_keeps_every_column_when_fields_differ(tmp_path):
    """Files written by different versions may differ in columns: the part keeps the union."""
    o = store.Outputs(str(tmp_path / "out"))
    write_field(o, "P1", "A1", "1" * 16, n=2)
    row = store.table_from_columns({"field_id": ["2" * 16], "n_cells": [1], "timepoint": [0.0],
                                    "confluence": [0.5], "cell_type": ["A172"], "path": ["x.tif"],
                                    "status": ["ok"], "area_um2_mean": [3.5]})
    write_field(o, "P1", "A1", "2" * 16, n=1, commit=False)
    o.write_bytes(o.table_path("fields", "P1", "A1", "2" * 16), store.parquet_bytes(row))
    compact.compact(o.url)
    fields = o.read_table("fields").sort_values("field_id")
    assert list(fields["area_um2_mean"].isna()) == [True, False] and len(files(o, "fields")) == 1


def test_done_fields_stay_visible_while_compactions_run(tmp_path):
    """A rerun's resume reads the done set while a compaction may be replacing parts: every field
    committed before the read began must be in it (else it would be segmented again)."""
    import threading

    out = str(tmp_path / "out")
    o = plate_out(out)
    ids = lambda t: {f"{w:02d}{f:02d}{int(t):04d}aaaaaaaa" for w in range(len(WELLS)) for f in range(4)}  # noqa: E731
    expected = set(ids(0))
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            for t in range(1, 41):
                plate_out(out, t=float(t))
                expected.update(ids(t))
                assert compact.compact(out, threads=2).errors == []
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    worker = threading.Thread(target=churn)
    worker.start()
    reads = 0
    while worker.is_alive():
        before = set(expected)
        got = store.Outputs(out).done_field_ids()
        assert before <= got, f"missing {sorted(before - got)[:3]}"
        reads += 1
    worker.join()
    assert not errors and reads > 5
    assert o.done_field_ids() == expected and len(files(o, "fields")) == 3


def test_two_compactions_at_once_leave_every_row_once(tmp_path):
    """Two compactions of the same OUT (say a rerun's and a user's) racing, while new fields arrive: at
    every moment a reader sees each committed field once, with its cells once."""
    import threading

    out = str(tmp_path / "out")
    o = plate_out(out)
    ids = lambda t: {f"{w:02d}{f:02d}{int(t):04d}aaaaaaaa" for w in range(len(WELLS)) for f in range(4)}  # noqa: E731
    expected = set(ids(0))
    done = threading.Event()
    errors: list[BaseException] = []
    runs = [0, 0]

    def compactor(k: int) -> None:
        try:
            while not done.is_set():
                compact.compact(out, threads=3)  # a well may fail when the other removed its input: fine
                runs[k] += 1
        except BaseException as exc:  # noqa: BLE001 - a crashed racer must fail the test, not vanish
            errors.append(exc)

    racers = [threading.Thread(target=compactor, args=(k,)) for k in range(2)]
    for r in racers:
        r.start()
    try:
        for t in range(1, 25):
            plate_out(out, t=float(t))
            expected.update(ids(t))
            before = set(expected)
            fields = o.read_table("fields")
            assert fields["field_id"].is_unique and before <= set(fields["field_id"])
            cells = o.read_table("cells")
            per_field = cells.groupby("field_id").size().reindex(fields["field_id"], fill_value=0)
            assert list(per_field) == list(fields["n_cells"])  # every field's cells, once
    finally:
        done.set()
        for r in racers:
            r.join()
    assert not errors, errors
    assert min(runs) >= 2, f"the compactors did not race: {runs} runs"
    assert compact.compact(out).errors == []
    assert o.done_field_ids() == expected and len(files(o, "fields")) == 3
    assert len(o.read_table("cells")) == 25 * 66


def test_s3_queries_read_a_local_copy_with_the_same_answers(moto, tmp_path):
    """On S3, open_results copies the tables' files at once when small, else DuckDB reads them in place:
    both give the answers the same files give on a local disk."""
    from .conftest import s3_options

    opts = s3_options(moto["port"])
    out = f"s3://{moto['bucket']}/out"
    plate_out(out, opts)
    compact.compact(out, opts, only=[("P1", "A1")])  # one well in a part, the others per field
    local = plate_out(str(tmp_path / "local"))
    compact.compact(local.url, only=[("P1", "A1")])
    want = query.open_results(local.url).wells()
    copied = query.open_results(out, opts)
    in_place = query.open_results(out, opts, copy_limit_mb=0)
    assert copied.copied == 2 + 2 * 8 and in_place.copied == 0  # A1's two parts, 8 fields' two files
    pd.testing.assert_frame_equal(copied.wells(), want)
    pd.testing.assert_frame_equal(in_place.wells(), want)


def test_a_query_opened_before_a_compaction_answers_after_it(tmp_path):
    """Views made before a compaction point at files it removes: the query lists again, same answers."""
    o = plate_out(str(tmp_path / "out"))
    res = query.open_results(o.url)
    want_wells = res.wells()
    want_cells = res.df("SELECT field_id, label, area_px FROM cells ORDER BY field_id, label")
    assert compact.compact(o.url).wells_compacted == 3
    assert not [f for f in files(o, "cells") if not f.startswith("part-")]  # the viewed files are gone
    pd.testing.assert_frame_equal(res.wells(), want_wells)
    pd.testing.assert_frame_equal(res.df("SELECT field_id, label, area_px FROM cells ORDER BY field_id, label"),
                                  want_cells)
    with pytest.raises(Exception, match="Binder Error"):  # other errors still reach the caller
        res.df("SELECT no_such_column FROM cells")
