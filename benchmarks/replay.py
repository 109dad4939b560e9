"""What the pipeline around the model sustains: `livecell-ray segment` with the network's answers replayed.

    python benchmarks/replay.py --fields 400 [--batch 64] [--io-tasks N]

On a GPU node the network is nearly free (forward-only fp16: thousands of fields/s); what is left is
reading, decoding, moving fields through Ray's object store, measuring and writing. This runs exactly
that part of `livecell-ray segment` on this machine's CPUs: every Ray worker gets a setup hook that
swaps the Segmenter for one returning the real results that small.pt computed beforehand for each of
the bundled LIVECell fields (same labels, classes, confidences). Nothing else differs, so fields/s
here is the ceiling the CPUs put on a GPU node of this many cores, and its per-field time splits into
the stage costs printed first (each measured alone, in this process). The CPU use of this process
after the first field (it watches the execution and walks the summaries; Ray Data's executor runs in
the pipeline's StreamDriver actor) is printed last.

A diagnostic for benchmarks only: the product never runs without its model.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

ENV = "LIVECELL_RAY_REPLAY"


def _key(image: np.ndarray) -> str:
    """Which recorded field this is: a hash of every 16th pixel (the whole field cost the actor 0.8 ms)."""
    return hashlib.blake2b(np.ascontiguousarray(image[::16, ::16]).tobytes(), digest_size=16).hexdigest()


class ReplaySegmenter:
    """Stands in for segment.Segmenter in the Ray workers: the recorded results, looked up by image."""

    def __init__(self, weights=None, inference=None, device=None):
        from livecell_ray.segment import Instances

        with np.load(os.environ[ENV]) as z:
            keys = [str(k) for k in z["keys"]]
            self.results = {k: Instances(z[f"labels{i}"], z[f"cls{i}"], z[f"conf{i}"]) for i, k in enumerate(keys)}
        self.device = "replay"

    def __call__(self, images, cell_types=None, pixel_sizes=None):
        return [self.results[_key(im)] for im in images]


def install() -> None:
    """Ray worker setup hook: model replicas replay instead of running the network.

    Only the actor's constructor is patched; nothing is imported beyond what the pipeline's own tasks
    import (importing segment here would load torch into every I/O worker, which the product never does).
    """
    from livecell_ray import pipeline

    def replaying_init(self, weights, inference, classifier=None, route="none"):
        import ray

        self.segmenter = ReplaySegmenter()
        self.classifier, self.route = None, route  # the field classifier is a network too: not replayed
        self.node_id = ray.get_runtime_context().get_node_id()

    pipeline.SegmentActor.__init__ = replaying_init


def record(path: Path, model: str) -> int:
    """Run the real model once over the bundled fields and store its results; returns the mean cell count."""
    from throughput import example_fields

    from livecell_ray import models
    from livecell_ray.segment import Segmenter

    images = example_fields()
    res = Segmenter({models.DEFAULT_KEY: models.resolve(model, trust=True)})(images)
    arrays = {"keys": np.array([_key(im) for im in images])}
    for i, r in enumerate(res):
        arrays.update({f"labels{i}": r.labels, f"cls{i}": r.class_ids, f"conf{i}": r.confidences})
    np.savez(path, **arrays)
    return int(np.mean([r.labels.max() for r in res]))


def stage_costs(plate: Path, recorded: Path, out: Path, repeats: int = 20) -> dict[str, float]:
    """Milliseconds per field of each CPU stage, alone in this process (no Ray scheduling)."""
    import ray

    from livecell_ray import manifest, pipeline, store
    from livecell_ray.config import NormalizeConfig

    os.environ[ENV] = str(recorded)
    rep = ReplaySegmenter()
    rows = manifest.scan(str(plate)).fields.head(repeats).to_dict("records")
    t = time.perf_counter()
    read = [pipeline.read_field(r, {}, 10**9, NormalizeConfig()) for r in rows]
    costs = {"read + decode + normalise": (time.perf_counter() - t) / len(rows)}
    for r in read:
        labels, cls, conf = pipeline.encode_instances(rep([r["image"]])[0])
        r.update(labels=labels, class_ids=cls, confidences=conf, model_node="", model_pid=0,
                 column=int(r["column"]), crop=int(r["crop"]))
    outputs = store.Outputs(str(out))
    store.init_plates(outputs, manifest.scan(str(plate)).fields, None, {})
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)  # finish_field: node id
    try:
        t = time.perf_counter()
        for r in read:
            pipeline.finish_field(r, str(out), {}, None, {})
        costs["measure + write (zarr, parquet)"] = (time.perf_counter() - t) / len(rows)
    finally:
        ray.shutdown()
    return {k: 1000 * v for k, v in costs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fields", type=int, default=400)
    ap.add_argument("--model", default="small")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--io-tasks", type=int, default=None)
    a = ap.parse_args()
    from livecell_ray import offline

    offline.configure()
    import ray
    from throughput import build_plate

    from livecell_ray import pipeline
    from livecell_ray.config import SegmentConfig

    tmp = Path(tempfile.mkdtemp(prefix="lcr-replay-"))
    try:
        recorded = tmp / "recorded.npz"
        cells = record(recorded, a.model)
        plate = build_plate(a.fields, tmp / "plate")
        cpus = os.cpu_count() or 2
        print(f"{a.fields} fields of 704x520, {cells} cells a field on average ({a.model} results replayed), "
              f"{cpus} CPUs")
        costs = stage_costs(plate, recorded, tmp / "alone")
        for k, v in costs.items():
            print(f"  {k:34s} {v:6.1f} ms a field")
        total = sum(costs.values())
        print(f"  {'sum':34s} {total:6.1f} ms a field -> at most {1000 * cpus / total:.0f} fields/s on {cpus} CPUs")
        env = dict(offline.worker_env(), **{ENV: str(recorded),
                                            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])})
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env, "worker_process_setup_hook": "replay.install"})
        cfg = SegmentConfig(source=str(plate), out=str(tmp / "out"), batch_size=a.batch, io_tasks=a.io_tasks,
                            cpus_per_replica=0.5)
        first: list[float] = []  # the driver's CPU time when the first field came out

        def on_field(res, done, total):
            if not first:
                first.append(time.process_time())

        t0, c0 = time.perf_counter(), time.process_time()
        s = pipeline.run(cfg, progress=on_field)
        t, c1 = time.perf_counter() - t0, time.process_time()
        if s.fields_failed:
            raise SystemExit(f"{s.fields_failed} fields failed: {s.failures[:3]}")
        steady = s.steady_fields_per_second
        print(f"pipeline, model replayed: {s.fields_done / t:.1f} fields/s end to end ({t:.1f} s), "
              f"{steady:.1f} fields/s after the first field; batch {a.batch}, io_tasks {cfg.io_tasks or 'auto'}")
        print(f"  {s.stage_report()}")
        print(f"  after the first field: {steady * total / (1000 * cpus):.2f} of the CPU-bound ceiling above")
        # The job's process (the watcher and the summary loop; Ray Data's executor runs in the StreamDriver
        # actor): if its CPU time grew with the fields it would bound a node's fields/s.
        steady_wall = max(t - s.time_to_first_field, 1e-9)
        print(f"  this process: {first[0] - c0:.1f} s of CPU before the first field (manifest, plate metadata, start), "
              f"then {100 * (c1 - first[0]) / steady_wall:.0f}% of a core "
              f"({1000 * (c1 - first[0]) / max(1, s.fields_done - 1):.1f} ms a field)")
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
