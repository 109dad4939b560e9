"""What the pipeline around the model sustains: `livecell-ray segment` with the network's answers replayed.

    python benchmarks/replay.py --fields 400 [--batch 64] [--io-tasks N] [--baseline REV|FOLDER] [--rounds R]

On a GPU node the network is nearly free (forward-only fp16: thousands of fields/s); what is left is
reading, decoding, moving fields through Ray's object store, measuring and writing. This runs exactly
that part of `livecell-ray segment` on this machine's CPUs: Ray is started by the pipeline's own
`init_ray`, and an import hook carried by the environment (`replay_site/sitecustomize.py`) swaps the
model replica's Segmenter for one returning the real results that small.pt computed beforehand for each of
the bundled LIVECell fields (same labels, classes, confidences). Nothing else differs, so fields/s
here is the ceiling the CPUs put on a GPU node of this many cores, and its per-field time splits into
the stage costs printed first (each measured alone, in this process).

Each pipeline run is a fresh process (its own local Ray); it reports fields/s end to end and after the
first field, the first field's time (from `pipeline.run`, and from before `ray.init`), the CPU
time of the driver and every Ray process it started, a field, and when each start-up step ran (the
job process's own, and from Ray's timeline the replica's start and the first shard task and model call).
``--baseline`` names other code (a git revision, checked out as a temporary worktree, or a checkout's
folder): its package runs the same plate in turns with this one's, ``--rounds`` times each, and the
ratios are printed.

A diagnostic for benchmarks only: the product never runs without its model.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Which checkout's package runs: this one, or the one --baseline names (set for the run's process and
# its Ray workers alike, so that both import the same code).
CODE_ENV = "LIVECELL_RAY_REPLAY_CODE"
CODE = Path(os.environ.get(CODE_ENV, str(ROOT)))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(CODE))

ENV = "LIVECELL_RAY_REPLAY"


def _key(image: np.ndarray) -> str:
    """Which recorded field this is: a hash of every 16th pixel (the whole field cost the actor 0.8 ms)."""
    return hashlib.blake2b(np.ascontiguousarray(image[::16, ::16]).tobytes(), digest_size=16).hexdigest()


class ReplaySegmenter:
    """Stands in for segment.Segmenter in the Ray workers: the recorded results, looked up by image."""

    def __init__(self, weights=None, inference=None, device=None):
        from livecell_ray.model.segment import Instances

        with np.load(os.environ[ENV]) as z:
            keys = [str(k) for k in z["keys"]]
            self.results = {k: Instances(z[f"labels{i}"], z[f"cls{i}"], z[f"conf{i}"]) for i, k in enumerate(keys)}
        self.device = "replay"

    def __call__(self, images, cell_types=None, pixel_sizes=None):
        return [self.results[_key(im)] for im in images]


def patch(actor: type) -> None:
    """Model replicas replay instead of running the network: the actor's constructor swapped
    (``replay_site/sitecustomize.py`` calls this as the module defining the actor is imported, in the
    processes that import it; nothing else is imported ahead of what the product's processes import)."""

    def replaying_init(self, weights, inference, classifier=None, route="none"):
        import ray

        self.segmenter = ReplaySegmenter()
        self.classifier, self.route = None, route  # the field classifier is a network too: not replayed
        self.node_id = ray.get_runtime_context().get_node_id()

    actor.__init__ = replaying_init


def record(path: Path, model: str) -> int:
    """Run the real model once over the bundled fields and store its results; returns the mean cell count."""
    from throughput import example_fields

    from livecell_ray.model import models
    from livecell_ray.model.segment import Segmenter

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

    from livecell_ray import pipeline, store
    from livecell_ray.config import NormalizeConfig
    from livecell_ray.model import replica
    from livecell_ray.plate import manifest

    os.environ[ENV] = str(recorded)
    rep = ReplaySegmenter()
    rows = manifest.scan(str(plate)).fields.head(repeats).to_dict("records")
    t = time.perf_counter()
    read = [pipeline.read_field(r, {}, 10**9, NormalizeConfig()) for r in rows]
    costs = {"read + decode + normalise": (time.perf_counter() - t) / len(rows)}
    for r in read:
        labels, cls, conf = replica.encode_instances(rep([r["image"]])[0])
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


class CpuMeter:
    """CPU seconds of this process and every process it started (Ray's GCS, raylet, agents, workers,
    actors), polled every 0.1 s so that a process that ends (an actor killed with its run) keeps what it
    used until its last poll."""

    def __init__(self, interval: float = 0.1):
        import threading

        import psutil

        self._me, self._seen, self._lock = psutil.Process(), {}, threading.Lock()
        self._done = threading.Event()
        self._poll()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import psutil

        for p in [self._me, *self._me.children(recursive=True)]:
            try:
                t, key = p.cpu_times(), (p.pid, p.create_time())
            except psutil.Error:
                continue  # gone meanwhile
            with self._lock:
                self._seen[key] = t.user + t.system

    def _loop(self, interval: float) -> None:
        while not self._done.wait(interval):
            self._poll()

    def seconds(self) -> float:
        self._poll()
        with self._lock:
            return sum(self._seen.values())

    def by_pid(self) -> dict[int, float]:
        """CPU seconds so far of each process (by pid; a pid reused keeps the sum of its processes)."""
        self._poll()
        out: dict[int, float] = {}
        with self._lock:
            for (pid, _), v in self._seen.items():
                out[pid] = out.get(pid, 0.0) + v
        return out

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def run_once(plate: Path, recorded: Path, out: Path, batch: int, io_tasks: int | None) -> dict[str, float]:
    """One pipeline run over the plate in this process (a fresh local Ray); its figures."""
    from livecell_ray import offline

    offline.configure()
    import ray

    from livecell_ray import pipeline
    from livecell_ray.config import SegmentConfig

    meter = CpuMeter()
    cpu = meter.seconds

    # Ray's workers inherit this environment: the code under test, and the hook that makes replicas replay.
    os.environ.update({ENV: str(recorded), CODE_ENV: str(CODE), "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "benchmarks" / "replay_site"), str(CODE), str(ROOT / "benchmarks")])})
    cfg = SegmentConfig(source=str(plate), out=str(out), batch_size=batch, io_tasks=io_tasks, cpus_per_replica=0.5)
    t_init = time.perf_counter()
    pipeline.init_ray(cfg)  # as `livecell-ray segment` starts its local Ray
    try:
        first: list[float] = []  # CPU seconds of all processes when the first field came out
        pids = {"model replicas": set(), "reading + measuring + writing": set()}

        def on_field(res, done, total):
            if not first:
                first.append(cpu())
            pids["model replicas"].add(int(res.get("model_pid", 0)))
            pids["reading + measuring + writing"].add(int(res.get("measure_pid", 0)))

        # Where the driver looks its steps up: the pipeline's driver module, or older code's one pipeline.py.
        steps = importlib.import_module("livecell_ray.pipeline.driver") if hasattr(pipeline, "__path__") else pipeline
        spans = _time_driver_steps(steps)
        before = meter.by_pid()
        wall0 = time.time()
        t0, c0 = time.perf_counter(), cpu()
        s = pipeline.run(cfg, progress=on_field)
        t, c1 = time.perf_counter() - t0, cpu()
        after = meter.by_pid()
        time.sleep(1.5)  # Ray's workers report their task events every second (those of a short run's last one)
        startup = _startup(spans, ray.timeline(), wall0, s.time_to_first_field)
    finally:
        meter.stop()
        ray.shutdown()
    # Where the CPU went, ms a field: the job's process, the replicas, the shard (or read and measure/write)
    # workers, and everything else (Ray's GCS, raylet, agents, its executor's actors, idle workers).
    used = {pid: after[pid] - before.get(pid, 0.0) for pid in after}
    split = {"driver": used.pop(os.getpid(), 0.0)}
    for name, group in pids.items():
        split[name] = sum(used.pop(pid, 0.0) for pid in group)
    split["Ray's own processes and the rest"] = sum(used.values())
    if s.fields_failed:
        raise SystemExit(f"{s.fields_failed} fields failed: {s.failures[:3]}")
    return {"fields": s.fields_done, "seconds": t, "end_to_end": s.fields_done / t,
            "steady": s.steady_fields_per_second, "first_field": s.time_to_first_field,
            "first_field_with_init": s.time_to_first_field + (t0 - t_init),
            "cpu_ms_a_field": 1000 * (c1 - c0) / s.fields_done,
            "steady_cpu_ms_a_field": 1000 * (c1 - first[0]) / max(1, s.fields_done - 1),
            "cpu_ms_by_process": {k: 1000 * v / s.fields_done for k, v in split.items()},
            "stage_report": s.stage_report(), "startup": startup}


def _time_driver_steps(pipeline_mod) -> dict[str, list[float]]:
    """Wall-clock spans of the job process's start-up steps (the plate's metadata, its folders), where the
    code has them: their functions wrapped for this run only."""
    from livecell_ray import store

    spans: dict[str, list[float]] = {}
    for mod, name, label in ((pipeline_mod, "write_plates", "plate metadata (job's process)"),
                             (store, "make_folders", "folders (job's process)")):
        f = getattr(mod, name, None)
        if f is None:
            continue

        def timed(*args, _f=f, _label=label, **kwargs):
            start = time.time()
            try:
                return _f(*args, **kwargs)
            finally:
                spans[_label] = [start, time.time()]

        setattr(mod, name, timed)
    return spans


def _startup(spans: dict[str, list[float]], events: list[dict], wall0: float, first: float) -> dict[str, list[float]]:
    """Seconds from `pipeline.run` to each start-up step's start and end: the job process's steps, then from
    Ray's own timeline the model replica's __init__ and the first shard task and model call."""
    out = {k: [a - wall0, b - wall0] for k, (a, b) in spans.items()}
    ran = [(e["name"], e["ts"] / 1e6 - wall0, e.get("dur", 0) / 1e6) for e in events
           if e.get("ph") == "X" and "ts" in e and isinstance(e.get("name"), str)]
    for label, match in (("model replica's __init__", lambda n: n.endswith("__init__")),
                         ("first shard task", lambda n: n.endswith("process_shard")),
                         ("first model call", lambda n: n == "segment" or n.endswith(".segment"))):
        hits = sorted((ts, ts + d) for n, ts, d in ran if match(n))
        if hits:
            out[label] = list(hits[0])
    out["first field out"] = [first, first]
    return out


def _subprocess_run(code: Path, plate: Path, recorded: Path, out: Path, a: argparse.Namespace) -> dict[str, float]:
    """run_once in a fresh process with ``code``'s package (Ray's start-up is part of what is measured)."""
    res = out.with_suffix(".json")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--fields", str(a.fields), "--batch", str(a.batch),
           "--_run", str(plate), str(recorded), str(out), str(res)]
    if a.io_tasks:
        cmd += ["--io-tasks", str(a.io_tasks)]
    subprocess.run(cmd, check=True, env={**os.environ, CODE_ENV: str(code)})
    return json.loads(res.read_text())


def _line(name: str, r: dict[str, float]) -> str:
    return (f"  {name:9s} {r['end_to_end']:6.1f} fields/s end to end ({r['seconds']:.1f} s), {r['steady']:6.1f} after "
            f"the first field; first field {r['first_field']:.1f} s ({r['first_field_with_init']:.1f} s with "
            f"ray.init); CPU {r['cpu_ms_a_field']:.1f} ms a field ({r['steady_cpu_ms_a_field']:.1f} after the first)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fields", type=int, default=400)
    ap.add_argument("--model", default="small")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--io-tasks", type=int, default=None)
    ap.add_argument("--baseline", default=None, help="the code to compare with: a checkout's folder, or a git "
                                                     "revision (checked out here as a temporary worktree)")
    ap.add_argument("--rounds", type=int, default=None, help="runs of each code, in turns (default 2 with "
                                                             "--baseline, else 1)")
    ap.add_argument("--_run", nargs=4, type=Path, help=argparse.SUPPRESS)  # PLATE RECORDED OUT JSON: one run here
    a = ap.parse_args()
    if a._run:
        plate, recorded, out, res = a._run
        res.write_text(json.dumps(run_once(plate, recorded, out, a.batch, a.io_tasks)))
        return
    from livecell_ray import offline

    offline.configure()
    from throughput import build_plate

    tmp = Path(tempfile.mkdtemp(prefix="lcr-replay-"))
    try:
        recorded = tmp / "recorded.npz"
        cells = record(recorded, a.model)
        plate = build_plate(a.fields, tmp / "plate")
        cpus = os.cpu_count() or 2
        print(f"{a.fields} fields of 704x520, {cells} cells a field on average ({a.model} results replayed), "
              f"batch {a.batch}, {cpus} CPUs")
        costs = stage_costs(plate, recorded, tmp / "alone")
        for k, v in costs.items():
            print(f"  {k:34s} {v:6.1f} ms a field")
        total = sum(costs.values())
        print(f"  {'sum':34s} {total:6.1f} ms a field -> at most {1000 * cpus / total:.0f} fields/s on {cpus} CPUs")
        codes = {"this code": ROOT}
        if a.baseline:
            codes = {"baseline": _checkout(a.baseline, tmp / "baseline"), "this code": ROOT}
        results: dict[str, list[dict[str, float]]] = {k: [] for k in codes}
        for r in range(a.rounds or (2 if a.baseline else 1)):
            for name, code in codes.items():
                results[name].append(_subprocess_run(code, plate, recorded, tmp / f"out-{r}-{len(results[name])}"
                                                     f"-{name.replace(' ', '_')}", a))
                print(_line(name, results[name][-1]), flush=True)
        for name, runs in results.items():
            split = runs[-1]["cpu_ms_by_process"]
            print(f"CPU ms a field by process, {name} (last run): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in split.items()))
        print(f"pipeline, model replayed ({codes['this code']}):")
        print(f"  {results['this code'][-1]['stage_report']}")
        print("start-up of the last run of this code, seconds from pipeline.run (Ray's timeline for its workers):")
        for k, (a0, b0) in sorted(results["this code"][-1]["startup"].items(), key=lambda kv: kv[1]):
            print(f"  {k:34s} {a0:5.2f} -> {b0:5.2f}")
        if a.baseline:
            med = {k: {m: float(np.median([x[m] for x in v])) for m in v[0] if isinstance(v[0][m], float)}
                   for k, v in results.items()}
            print(f"medians over {len(results['baseline'])} runs each, this code / baseline ({a.baseline}):")
            for m, what in (("end_to_end", "fields/s end to end"), ("steady", "fields/s after the first field"),
                            ("first_field", "first field, s"), ("cpu_ms_a_field", "CPU ms a field"),
                            ("steady_cpu_ms_a_field", "CPU ms a field after the first")):
                b, c = med["baseline"][m], med["this code"][m]
                print(f"  {what:32s} {c:7.1f} vs {b:7.1f}: {c / b:.2f}x")
    finally:
        _clean_up(tmp)


def _clean_up(tmp: Path) -> None:
    """Remove a run's scratch folder, and the baseline's worktree in it if one was checked out."""
    if (tmp / "baseline").exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "baseline")],
                       check=False, capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)


def _checkout(baseline: str, where: Path) -> Path:
    """The baseline's folder: as given if it is one, else a worktree of that git revision at ``where``."""
    if Path(baseline).is_dir():
        return Path(baseline).resolve()
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(where), baseline],
                   check=True)
    return where


if __name__ == "__main__":
    main()
