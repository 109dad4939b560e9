"""How fast one measure/write task writes fields to an object store: requests and latency, not CPU.

    python benchmarks/object_store.py [--fields 41] [--latency-ms 20] [--block 16]

A field's outputs are a handful of small objects (two Zarr chunks, a cells file, the fields/ commit
marker, and the arrays' zarr.json reads). On S3 each request costs tens of milliseconds of latency,
so the number of requests one task waits for in turn, not its CPU, sets how many fields a second a
measure/write task manages. This runs `finish_fields` (the pipeline's measure-and-write stage, on the
real results small.pt computed for the bundled LIVECell fields) against moto's S3 server on loopback,
behind a proxy that holds every request for --latency-ms (S3 within a region: about 10-30 ms for
small objects), and prints, per field: requests, round trips waited for one after the other, and
milliseconds, with and without the added latency (without: the CPU's share, moto's included),
for fields written one at a time and in blocks as the pipeline's tasks take them.
Every field is a new site, so its two arrays' zarr.json are read (absent) and created, as for the
first timepoint of a time-lapse. Run it in two checkouts to compare them. A diagnostic for
benchmarks only, like replay.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fields", type=int, default=41)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--block", type=int, default=16, help="fields a measure/write task takes at once "
                    "(the pipeline's blocks: a quarter of --batch-size, at least 4)")
    a = ap.parse_args()
    import logging

    from livecell_ray import offline

    offline.configure()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    import boto3
    import ray
    from moto.server import ThreadedMotoServer
    from replay import ENV, ReplaySegmenter, record
    from throughput import build_plate

    from livecell_ray import pipeline, store
    from livecell_ray.config import NormalizeConfig
    from livecell_ray.model import replica
    from livecell_ray.plate import manifest
    from tests.s3proxy import FaultyProxy

    tmp = Path(tempfile.mkdtemp(prefix="lcr-objstore-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        moto_port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port)
    server.start()
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)  # finish_field: node id
    try:
        recorded = tmp / "recorded.npz"
        record(recorded, "small")
        os.environ[ENV] = str(recorded)
        rep = ReplaySegmenter()
        plate = build_plate(a.fields, tmp / "plate")
        fields = manifest.scan(str(plate)).fields
        rows = []
        for r in fields.to_dict("records"):
            r = pipeline.read_field(r, {}, 10**9, NormalizeConfig())
            labels, cls, conf = replica.encode_instances(rep([r["image"]])[0])
            r.update(labels=labels, class_ids=cls, confidences=conf, model_node="", model_pid=0,
                     column=int(r["column"]), crop=int(r["crop"]))
            rows.append(r)
        print(f"{len(rows)} fields of 704x520 (small.pt's results replayed), one measure/write task, "
              f"moto's S3 server on loopback")
        for block in (1, a.block):
            ms: dict[float, float] = {}
            for latency in (0.0, a.latency_ms):
                proxy = FaultyProxy(moto_port, latency_s=latency / 1000)
                bucket = f"lab-{uuid.uuid4().hex[:10]}"
                boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}", aws_access_key_id="testing",
                             aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=bucket)
                opts = {"key": "testing", "secret": "testing",
                        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{proxy.port}",
                                          "region_name": "us-east-1"}}
                out = f"s3://{bucket}/out"
                store.init_plates(store.Outputs(out, opts), fields, None, {})
                pipeline.finish_field(rows[0], out, opts, None, {})  # connections and caches warm
                todo = rows[1:]
                before, t = proxy.count, time.perf_counter()
                for k in range(0, len(todo), block):
                    for res in pipeline.finish_fields(todo[k: k + block], out, opts, None, {}):
                        if res["status"] != "ok":
                            raise SystemExit(res["error"])
                ms[latency] = 1000 * (time.perf_counter() - t) / len(todo)
                requests = (proxy.count - before) / len(todo)
                proxy.stop()
                print(f"  blocks of {block:2d} fields, {latency:4.0f} ms added to each request: "
                      f"{ms[latency]:6.1f} ms a field, {requests:.1f} requests a field")
            turns = (ms[a.latency_ms] - ms[0.0]) / a.latency_ms
            print(f"  -> {turns:.2f} round trips a field waited for one after the other; at 20 ms each, one task "
                  f"writes at most {1000 / (20 * turns):.0f} fields/s to S3 whatever its CPU")
    finally:
        ray.shutdown()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
