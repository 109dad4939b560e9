"""How long a per-well query takes over a plate's tables, per-field files against compacted parts.

    python benchmarks/query.py [--fields 10000] [--s3-fields 500] [--latency-ms 20]

`livecell-ray segment` commits each field-timepoint with its own cells/ and fields/ file; a plate of 96
wells x 9 fields x 48 timepoints makes 83,000 of each. This segments the bundled example plate once
(small.pt, compaction off), copies its real cells and fields files to N field-timepoints spread over 96
wells (each copy with its own field_id), and times, side by side in this process, opening the results
and computing the default per-well table (`livecell-ray query OUT`) before and after `livecell-ray
compact`, which it also times; the answers must be equal. Then the same on S3: moto's server on
loopback behind a proxy that holds each request --latency-ms, as an object store within a region does,
each time with the tables read in place by DuckDB and copied first (open_results' default).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WELLS = [f"{r}{c}" for r in "ABCDEFGH" for c in range(1, 13)]


def example_tables(tmp: Path) -> tuple[list[bytes], list[bytes]]:
    """Real cells and fields files of the bundled plate's 10 fields (one segment run, not compacted)."""
    import ray

    from livecell_ray import offline, pipeline
    from livecell_ray.config import SegmentConfig

    offline.configure()
    out = tmp / "example"
    cfg = SegmentConfig(source=str(ROOT / "examples" / "livecell_plate"), out=str(out), num_cpus=2, compact=False)
    pipeline.run(cfg)
    ray.shutdown()
    files = {t: sorted((out / t).rglob("*.parquet")) for t in ("cells", "fields")}
    return [p.read_bytes() for p in files["cells"]], [p.read_bytes() for p in files["fields"]]


def plate_files(n: int, cells: list[bytes], fields: list[bytes]) -> dict[str, bytes]:
    """n field-timepoints over 96 wells of one plate, each a copy of a real field with its own id."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from livecell_ray import store

    def renamed(doc: bytes, fid: str) -> bytes:
        t = pq.read_table(io.BytesIO(doc))
        t = t.set_column(t.schema.get_field_index("field_id"), "field_id", pa.array([fid] * t.num_rows))
        return store.parquet_bytes(t)

    out = {}
    for i in range(n):
        well, fid, k = WELLS[i % len(WELLS)], f"{i:016x}", i % len(cells)
        out[f"cells/plate=P1/well={well}/{fid}.parquet"] = renamed(cells[k], fid)
        out[f"fields/plate=P1/well={well}/{fid}.parquet"] = renamed(fields[k], fid)
    return out


def timed_query(out: str, opts: dict | None = None, copy_limit_mb: float = 1024):
    from livecell_ray.answers import query

    t = time.perf_counter()
    wells = query.open_results(out, opts, copy_limit_mb=copy_limit_mb).wells()
    return time.perf_counter() - t, wells


def compare(label: str, out: str, opts: dict | None, n: int, count=None) -> None:
    """Query times before and after compaction; on an object store also with the tables read in place
    (copy_limit_mb=0) against the default local copy."""
    import pandas as pd

    from livecell_ray.store import compact

    ways = {"": 1024} if count is None else {", read in place": 0, ", local copy": 1024}
    times: dict[str, float] = {}
    answers = []

    def run(stage: str) -> None:
        for way, limit in ways.items():
            r0 = count() if count else 0
            t, w = timed_query(out, opts, limit)
            answers.append(w)
            times[stage + way] = t
            req = f"  ({count() - r0} requests)" if count else ""
            print(f"  query over {stage + way:34s} {t:8.2f} s{req}")

    print(f"{label}: {n} field-timepoints over 96 wells")
    run("per-field files")
    t = time.perf_counter()
    s = compact.compact(out, opts)
    t_compact = time.perf_counter() - t
    if s.errors:
        raise SystemExit(f"compaction failed: {s.errors[:3]}")
    print(f"  compact {'':34s}    {t_compact:8.2f} s  ({s.files_before} -> {s.files_after} table files)")
    run("compacted parts")
    for w in answers[1:]:
        pd.testing.assert_frame_equal(answers[0], w)
    first, last = list(times)[0], list(times)[-1]
    print(f"  {first} -> {last}: {times[first] / times[last]:.1f}x faster, same answers "
          f"({int(answers[0]['cells'].sum())} cells)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fields", type=int, default=10000, help="field-timepoints on a local disk")
    ap.add_argument("--s3-fields", type=int, default=500, help="field-timepoints on S3 (0: skip)")
    ap.add_argument("--latency-ms", type=float, default=20.0)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lcr-query-"))
    try:
        cells, fields = example_tables(tmp)
        local = tmp / "local"
        for k, v in plate_files(a.fields, cells, fields).items():
            p = local / k
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(v)
        compare("local disk", str(local), None, a.fields)
        if a.s3_fields:
            s3(a, cells, fields)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def s3(a: argparse.Namespace, cells: list[bytes], fields: list[bytes]) -> None:
    import socket

    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    from tests.s3proxy import FaultyProxy

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    proxy = FaultyProxy(port, latency_s=a.latency_ms / 1000)
    try:
        bucket = f"lab-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=bucket)
        direct = s3fs.S3FileSystem(key="testing", secret="testing",
                                   client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}",
                                                  "region_name": "us-east-1"})
        direct.pipe({f"{bucket}/out/{k}": v for k, v in plate_files(a.s3_fields, cells, fields).items()})
        opts = {"key": "testing", "secret": "testing", "skip_instance_cache": True,
                "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{proxy.port}", "region_name": "us-east-1"}}
        compare(f"S3 (moto, {a.latency_ms:g} ms a request)", f"s3://{bucket}/out", opts, a.s3_fields,
                count=lambda: proxy.count)
    finally:
        proxy.stop()
        server.stop()


if __name__ == "__main__":
    main()
