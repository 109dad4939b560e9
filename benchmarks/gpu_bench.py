"""GPU benchmark: forward-only fp16 throughput vs end-to-end ``livecell-ray segment`` on one GPU.

    bash benchmarks/gpu.sh [N_FIELDS]          # on the GPU machine (see the script)
    python benchmarks/gpu_bench.py --fields 64  # anywhere; falls back to the CPU (fp32) without a GPU

(1) the limit: the network alone, fp16, on 704x520 fields (at --imgsz 704 letterboxed to 544x704), at batch sizes
    8..256, inputs already on the GPU; the best fields/s is the ceiling for any pipeline;
    then the model side alone (letterbox, forward, NMS, painting) on real fields, one replica;
(2) the pipeline: shard tasks on the CPUs read and decode -> one model replica on the GPU (fp16):
    NMS, box-local painting -> the same tasks measure and write Zarr/Parquet, over N real LIVECell fields.
Prints both, their ratio (target >= 0.7) and the end-to-end fields/s (target >= 1,000 for n-seg on
an H100), and writes them as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from livecell_ray import offline  # noqa: E402

offline.configure()


def input_shape(imgsz: int) -> tuple[int, int]:
    """The network input a 704x520 field becomes at this input size (segment.letterbox, as a replica runs it)."""
    import numpy as np

    from livecell_ray.model.segment import letterbox

    return tuple(letterbox([np.zeros((520, 704), np.uint8)], imgsz, "cpu").shape[2:])


def forward_limit(weights: str, batches: list[int], seconds: float = 5.0, imgsz: int = 704) -> dict:
    import torch

    from livecell_ray.model import models

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    half = dev == "cuda"
    net = models.load(models.Weights("bench", weights, models.sha256(weights))).model.fuse().to(dev).eval()
    if half:
        net = net.half()
    out = {}
    for b in batches:
        try:
            x = torch.rand(b, 3, *input_shape(imgsz), device=dev, dtype=torch.float16 if half else torch.float32)
            with torch.inference_mode():
                for _ in range(3):
                    net(x)
                if dev == "cuda":
                    torch.cuda.synchronize()
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    net(x)
                    n += b
                if dev == "cuda":
                    torch.cuda.synchronize()
                out[b] = n / (time.perf_counter() - t0)
            print(f"forward fp{'16' if half else '32'} batch {b:4d}: {out[b]:9.1f} fields/s", flush=True)
        except RuntimeError as exc:  # out of memory: larger batches will not fit either
            print(f"batch {b}: {str(exc).splitlines()[0]}")
            break
    return {"device": dev, "by_batch": out, "best_batch": max(out, key=out.get), "best": max(out.values())}


def segmenter_limit(weights: str, batch: int, seconds: float = 5.0, imgsz: int = 704) -> float:
    """The model side alone on real fields: letterbox, forward, NMS, painting, labels back on the host.

    Between the forward-only limit and end-to-end: what one replica can do if reading and measuring
    never held it up.
    """
    import numpy as np
    from throughput import example_fields

    from livecell_ray.config import InferenceConfig
    from livecell_ray.model import models
    from livecell_ray.model.segment import Segmenter

    fields = example_fields()
    images = [fields[i % len(fields)] for i in range(batch)]
    seg = Segmenter({models.DEFAULT_KEY: models.Weights("bench", weights, models.sha256(weights))},
                    InferenceConfig(imgsz=imgsz))
    seg(images)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        cells = sum(int(np.max(r.labels)) for r in seg(images))
        n += batch
    rate = n / (time.perf_counter() - t0)
    print(f"model side (letterbox, forward, NMS, painting on {seg.device}), batch {batch}: {rate:.1f} fields/s "
          f"({cells} cells per batch)", flush=True)
    print(f"  split per batch of {batch}: {model_side_split(seg, images)}", flush=True)
    return rate


def model_side_split(seg, images: list, repeats: int = 5) -> str:
    """Where the model side's time goes: letterbox + network + NMS, then painting and the copies back."""
    import torch

    from livecell_ray.model import models

    def sync() -> None:
        if seg.device.startswith("cuda"):
            torch.cuda.synchronize()

    fwd = nms = paint = 0.0
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        x, preds, protos = seg.network(models.DEFAULT_KEY, seg.network_batch(images))
        sync()
        t1 = time.perf_counter()
        dets = seg.nms(models.DEFAULT_KEY, preds)
        sync()
        t2 = time.perf_counter()
        seg.paint(x.shape[2:], dets, protos, len(images), images[0].shape)
        sync()
        fwd, nms, paint = fwd + t1 - t0, nms + t2 - t1, paint + time.perf_counter() - t2
    return (f"letterbox + forward {1000 * fwd / repeats:.1f} ms, NMS {1000 * nms / repeats:.1f} ms, "
            f"painting + copies to the host {1000 * paint / repeats:.1f} ms")


class Progress:
    """Prints fields/s every few seconds, so a run cut short by a time limit still says how fast it went."""

    def __init__(self, every: float = 10.0):
        self.t0 = self.last = time.perf_counter()
        self.every = every

    def __call__(self, summary: dict, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            print(f"  ... {done}/{total} fields, {done / (now - self.t0):.1f} fields/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fields", type=int, default=2000)
    ap.add_argument("--model", default="small")
    ap.add_argument("--imgsz", type=int, default=704, help="network input of all three measurements (704: the "
                    "GPU table's; small.pt's own default is 832)")
    ap.add_argument("--replicas", default=None,
                    help="comma-separated replica counts; the replicas of one run share the GPU "
                         "(default 1,2 on a GPU, 1 without)")
    ap.add_argument("--io-tasks", default=None,
                    help="comma-separated shards-in-flight bounds to try (default: the CPUs, and all but "
                         "two of them on a GPU)")
    ap.add_argument("--out", default=None, help="write results JSON here")
    a = ap.parse_args()
    import ray
    import torch
    from throughput import build_plate

    from livecell_ray import pipeline
    from livecell_ray.config import InferenceConfig, SegmentConfig
    from livecell_ray.model import models

    w = models.resolve(a.model, trust=True)
    gpu = torch.cuda.is_available()
    print(f"device: {torch.cuda.get_device_name(0) if gpu else 'CPU (no GPU found)'}; {os.cpu_count()} CPUs; "
          f"model {w.path}", flush=True)
    batches = [8, 16, 32, 64, 128, 256] if gpu else [1, 2, 4]
    limit = forward_limit(w.path, batches, 5.0 if gpu else 2.0, a.imgsz)
    tmp = Path(tempfile.mkdtemp(prefix="lcr-gpu-"))
    try:
        plate = build_plate(a.fields, tmp / "plate")
        batch = min(limit["best_batch"], 64)
        model_side = segmenter_limit(w.path, batch, 5.0 if gpu else 2.0, a.imgsz)
        runs = []
        cpus = os.cpu_count() or 2
        io_default = f"{cpus},{max(1, cpus - 2)}" if gpu else str(cpus)
        grid = [(int(r), int(io)) for r in (a.replicas or ("1,2" if gpu else "1")).split(",")
                for io in (a.io_tasks or io_default).split(",")]
        for k, (replicas, io_tasks) in enumerate(grid):
            cfg = SegmentConfig(source=str(plate), out=str(tmp / f"out{k}"), model=a.model, batch_size=batch,
                                replicas=replicas, gpus_per_replica=1.0 / replicas if gpu else 0.0,
                                cpus_per_replica=1.0 if gpu else 0.5, io_tasks=io_tasks,
                                inference=InferenceConfig(imgsz=a.imgsz, half=gpu or None))
            pipeline.init_ray(cfg)
            # Warm-up run on a few fields so model loading and Ray start-up are not timed.
            warm = build_plate(min(a.fields, 2 * batch * replicas), tmp / f"warm{k}")
            warm_run = pipeline.run(dataclasses.replace(cfg, source=str(warm), out=str(tmp / f"warm-out{k}")))
            if warm_run.fields_failed:  # stop before spending device time on a plate that fails
                for f in warm_run.failures[:3]:
                    print(f"warm-up field FAILED [{f['stage']}] {f['error']}", flush=True)
                sys.exit(1)
            t0 = time.perf_counter()
            s = pipeline.run(cfg, progress=Progress())
            t = time.perf_counter() - t0
            e2e = s.fields_done / t
            runs.append({"replicas": replicas, "io_tasks": io_tasks, "fields_per_s": e2e,
                         "ratio": e2e / limit["best"],
                         "fields": s.fields_done, "failed": s.fields_failed, "cells": s.cells, "seconds": t,
                         "first_failures": s.failures[:5]})
            if s.fields_failed:  # a benchmark of failing fields measures nothing: say why, loudly
                stages = Counter(f["stage"] for f in s.failures)
                print(f"{s.fields_failed} fields FAILED ({dict(stages)}); first errors:", flush=True)
                for f in s.failures[:3]:
                    print(f"  [{f['stage']}] {f['error']}", flush=True)
            steady = s.steady_fields_per_second
            runs[-1].update(steady_fields_per_s=steady, time_to_first_field=s.time_to_first_field,
                            stage_seconds=s.stage_seconds)
            print(f"end-to-end livecell-ray segment: {e2e:.1f} fields/s ({s.fields_done} fields, {s.cells} cells, "
                  f"batch {batch}, {replicas} replica(s) sharing the GPU, io_tasks {io_tasks}); "
                  f"{steady:.1f} fields/s after the first field", flush=True)
            print(f"  {s.stage_report()}", flush=True)
        best = max(runs, key=lambda r: r["fields_per_s"])
        print(f"forward-only limit (best batch {limit['best_batch']}): {limit['best']:.1f} fields/s; model side "
              f"{model_side:.1f} fields/s per replica")
        print(f"ratio end-to-end / forward-only: {best['ratio']:.2f} with {best['replicas']} replica(s), "
              f"io_tasks {best['io_tasks']} "
              f"(target >= 0.7); end-to-end {best['fields_per_s']:.1f} fields/s (target >= 1000)")
        res = {"limit": limit, "model_side_fields_per_s": model_side, "runs": runs,
               "end_to_end_fields_per_s": best["fields_per_s"],
               "ratio": best["ratio"], "batch": batch,
               "device": torch.cuda.get_device_name(0) if gpu else "cpu", "cpus": os.cpu_count()}
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=2, default=str))
        if any(r["failed"] for r in runs):
            sys.exit(1)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
