"""Throughput and memory: the seed-style loop vs ``livecell-ray segment``, side by side.

    python benchmarks/throughput.py [--fields 40] [--model small] [--memory] [--onnx]

Builds a plate of N LIVECell-size (704x520) fields by copying the real example images under new
well names, then runs in this one script:
  (a) the seed-style loop: for each image, ultralytics predict at batch 1 with retina masks, a
      label image from the dense masks, the same statistics (through scikit-image's regionprops,
      one cell at a time, as the seed measured them), the same Zarr + Parquet files;
  (b) livecell-ray segment (Ray, local, CPU) with the same weights and thresholds.
Prints fields/s of both and their ratio, and the peak RSS (driver + Ray processes, sampled).
Also times the mask post-processing alone: ultralytics' process_mask_native vs our box-local
painting on the same instances. --memory runs (b) on N and on 10N fields, each in a fresh process,
and prints the peak RSS and PSS ratios with a per-process breakdown;
--onnx adds (c), the pipeline with the ONNX Runtime backend.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from livecell_ray import offline  # noqa: E402

offline.configure()

EXAMPLES = ROOT / "examples" / "livecell_plate"


def example_fields() -> list[np.ndarray]:
    """The bundled real LIVECell fields, read and normalised as the pipeline does."""
    from livecell_ray.plate.imaging import normalize, read_image

    return [normalize(read_image(str(p))) for p in sorted(EXAMPLES.glob("*.tif"))]


def _title(cmdline: list[str]) -> str:
    """ray::<what it runs> for a Ray worker, else the program (or Python script) name."""
    if cmdline and cmdline[0].startswith("ray::"):
        return cmdline[0].split("(")[0] if "MapBatches" not in cmdline[0] else cmdline[0]
    args = [c for c in cmdline if not c.startswith("-")]
    script = next((c for c in args[1:] if c.endswith(".py")), None) if args and "python" in args[0] else None
    return Path(script or (args[0] if args else "?")).name


class PeakRSS:
    """Peak memory of this process and all its descendants (Ray's raylet and workers).

    `peak` sums RSS, which counts a shared page (torch's libraries, Ray's object store) once per
    process that maps it; `peak_pss` sums PSS, which splits each shared page among its mappers, so it
    is the physical memory the whole job holds. Both are sampled every `interval` seconds.
    """

    def __init__(self, interval: float = 0.1, pid: int | None = None):
        import psutil

        self.proc, self.interval, self.peak, self.peak_pss, self._stop = psutil.Process(pid), interval, 0, 0, False
        self.by_process: dict[int, tuple[str, int, int]] = {}  # pid -> (title, peak RSS, peak PSS)

    def _total(self) -> tuple[int, int]:
        rss = pss = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                info = p.memory_full_info()  # Linux: reads smaps_rollup for pss
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
                title, r0, p0 = self.by_process.get(p.pid) or ("", 0, 0)
                if not title.startswith("ray::") or title == "ray::IDLE":  # Ray retitles workers as they work
                    title = _title(p.cmdline())
                self.by_process[p.pid] = (title, max(r0, info.rss), max(p0, getattr(info, "pss", info.rss)))
            except Exception:
                pass
        return rss, pss

    def breakdown(self) -> dict[str, tuple[int, int, int]]:
        """Peak RSS and PSS summed per process title (Ray names its workers ray::<task or actor>), with counts."""
        out: dict[str, tuple[int, int, int]] = {}
        for title, r, p in self.by_process.values():
            n, r0, p0 = out.get(title, (0, 0, 0))
            out[title] = (n + 1, r0 + r, p0 + p)
        return out

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            rss, pss = self._total()
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            time.sleep(self.interval)

    def __exit__(self, *a):
        self._stop = True
        self._t.join()


def build_plate(n: int, dst: Path) -> Path:
    """N fields named as wells of 384-well plates, cycling through the real LIVECell examples."""
    srcs = sorted(EXAMPLES.glob("*.tif"))
    dst.mkdir(parents=True, exist_ok=True)
    rows = "ABCDEFGHIJKLMNOP"
    for i in range(n):
        src = srcs[i % len(srcs)]
        ct = src.name.split("_")[0]
        well = f"{rows[(i // 24) % 16]}{i % 24 + 1}"
        shutil.copy(src, dst / f"{ct}_Phase_{well}_{1 + i // 384}_00d00h00m_1.tif")
    return dst


def seed_loop(plate: Path, out: Path, weights_path: str, imgsz: int, conf: float, max_det: int) -> int:
    """The seed study's way: one image at a time through ultralytics predict, dense masks."""
    from ultralytics import YOLO

    from livecell_ray import store
    from livecell_ray.config import InferenceConfig
    from livecell_ray.measure import measure_cells_regionprops, measure_field
    from livecell_ray.plate import manifest
    from livecell_ray.plate.imaging import normalize, read_image, to_rgb

    model = YOLO(weights_path, task="segment")
    man = manifest.scan(str(plate)).fields
    outputs = store.Outputs(str(out))
    store.init_plates(outputs, man, None, {})
    cells = 0
    for row in man.itertuples():
        raw = read_image(row.path)
        img = normalize(raw)
        r = model.predict(to_rgb(img), imgsz=imgsz, conf=conf, iou=InferenceConfig().iou, max_det=max_det,
                          retina_masks=True, verbose=False, batch=1)[0]
        labels = np.zeros(img.shape, np.uint32)
        confs, kept = [], 0
        if r.masks is not None:
            masks = r.masks.data.cpu().numpy().astype(bool)
            c = r.boxes.conf.cpu().numpy()
            for i in np.argsort(-c, kind="stable"):
                claim = masks[i] & (labels == 0)
                if claim.any():
                    kept += 1
                    labels[claim] = kept
                    confs.append(c[i])
        cl = measure_cells_regionprops(labels, raw.astype(np.float32), np.zeros(kept, np.int16),
                                       np.array(confs, np.float32))
        measure_field(labels, raw)
        store.write_masks(outputs, row.plate, row.row, row.column, row.site, row.t_index, row.n_timepoints, img,
                          labels)
        outputs.write_table(outputs.table_path("cells", row.plate, row.well, row.field_id),
                            store.table_from_columns({"field_id": [row.field_id] * kept, **cl}))
        cells += kept
    return cells


def ray_run(plate: Path, out: Path, model: str, imgsz: int, conf: float, max_det: int, batch: int,
            backend: str = "torch", io_tasks: int | None = None, io_worker_max_fields: int | None = 2000):
    from livecell_ray import pipeline
    from livecell_ray.config import InferenceConfig, SegmentConfig

    cfg = SegmentConfig(source=str(plate), out=str(out), model=model, batch_size=batch, trust_weights=True,
                        io_tasks=io_tasks, io_worker_max_fields=io_worker_max_fields or None,
                        inference=InferenceConfig(imgsz=imgsz, conf=conf, max_det=max_det, backend=backend))
    return pipeline.run(cfg)


def isolated_run(a: argparse.Namespace, plate: Path, out: Path) -> tuple[float, PeakRSS]:
    """`livecell-ray segment` over the plate in a child Python process; its fields/s and peak memory."""
    import json
    import subprocess

    cmd = [sys.executable, __file__, "--child-run", str(plate), str(out), "--model", a.model, "--imgsz",
           str(a.imgsz), "--conf", str(a.conf), "--max-det", str(a.max_det), "--batch", str(a.batch)]
    if a.io_tasks:
        cmd += ["--io-tasks", str(a.io_tasks)]
    cmd += ["--io-worker-max-fields", str(a.io_worker_max_fields)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    with PeakRSS(pid=proc.pid) as m:
        stdout, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"child run over {plate} failed ({proc.returncode})")
    return json.loads(stdout.strip().splitlines()[-1])["fields_per_s"], m


def postprocess_ratio(weights_path: str, imgsz: int, conf: float, max_det: int, repeats: int = 3) -> None:
    """ultralytics' dense retina-mask step vs box-local painting on the same real instances: the CPU
    path's (NumPy, instance by instance) and the GPU path's (torch, all instances at once; run here on
    the CPU)."""
    import torch
    from ultralytics.utils import ops

    from livecell_ray.model import labels as L
    from livecell_ray.model import models
    from livecell_ray.model.segment import Segmenter

    seg = Segmenter({"*": models.Weights("bench", weights_path, models.sha256(weights_path))},
                    __import__("livecell_ray.config", fromlist=["InferenceConfig"]).InferenceConfig(
                        imgsz=imgsz, conf=conf, max_det=max_det))
    t_dense = t_fast = t_batch = 0.0
    n_inst = 0
    ious, batch_ious = [], []
    for img in example_fields():
        x, dets, protos = seg.forward("*", [img])
        det, proto = dets[0].float(), protos[0].float()
        h, w = img.shape
        boxes = ops.scale_boxes(x.shape[2:], det[:, :4].clone(), (h, w))
        conf_np = det[:, 4].numpy()
        ax = seg.axis_weights(proto.shape[1:], (h, w))
        n_inst += len(det)
        for _ in range(repeats):
            t = time.perf_counter()
            dense = ops.process_mask_native(proto, det[:, 6:], boxes, (h, w))
            t_dense += time.perf_counter() - t
            t = time.perf_counter()
            fast, kept = L.paint(proto.numpy(), det[:, 6:].numpy(), boxes.numpy(), conf_np, (h, w), ax)
            t_fast += time.perf_counter() - t
            t = time.perf_counter()
            on_dev, _ = L.paint_batch(proto[None], torch.zeros(len(det), dtype=torch.int64), det[:, 6:], boxes,
                                      det[:, 4], 1, (h, w), seg.axis_weights(proto.shape[1:], (h, w), "cpu"))
            t_batch += time.perf_counter() - t
        ref, kept_d = L.paint_dense(proto, det[:, 6:], boxes, conf_np, (h, w))
        for k in range(1, int(ref.max()) + 1):
            a, b, c = fast == k, ref == k, on_dev[0].numpy() == k
            ious.append((a & b).sum() / max(1, (a | b).sum()))
            batch_ious.append((c & b).sum() / max(1, (c | b).sum()))
        del dense
    print(f"post-processing on {n_inst} instances x {repeats}: ultralytics process_mask_native "
          f"{t_dense:.3f} s, box-local paint {t_fast:.3f} s, ratio {t_fast / max(t_dense, 1e-9):.3f} "
          f"(target <= 0.1); min per-instance IoU vs dense {min(ious) if ious else float('nan'):.4f}")
    print(f"  the GPU path's painter (paint_batch) on this CPU: {t_batch:.3f} s, "
          f"ratio {t_batch / max(t_dense, 1e-9):.3f}; "
          f"min per-instance IoU vs dense {min(batch_ious) if batch_ious else float('nan'):.4f}")
    torch.set_num_threads(torch.get_num_threads())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fields", type=int, default=40)
    ap.add_argument("--model", default="small")
    ap.add_argument("--imgsz", type=int, default=704)
    ap.add_argument("--conf", type=float, default=0.25)
    ap.add_argument("--max-det", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--memory", action="store_true", help="also run 10N fields and compare peak RSS")
    ap.add_argument("--io-tasks", type=int, default=None, help="shards in flight (default: the CPUs)")
    ap.add_argument("--onnx", action="store_true", help="also run --backend onnx (ONNX Runtime, CPU)")
    ap.add_argument("--io-worker-max-fields", type=int, default=2000,
                    help="fields per I/O worker process before it is replaced (0: never)")
    ap.add_argument("--child-run", nargs=2, metavar=("PLATE", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child_run:  # one measured run of --memory, in its own process
        import json

        t = time.perf_counter()
        n = ray_run(Path(a.child_run[0]), Path(a.child_run[1]), a.model, a.imgsz, a.conf, a.max_det, a.batch,
                    io_tasks=a.io_tasks, io_worker_max_fields=a.io_worker_max_fields).fields_done
        print(json.dumps({"fields_per_s": n / (time.perf_counter() - t)}))
        return
    from livecell_ray.model import models

    w = models.resolve(a.model, trust=True)
    tmp = Path(tempfile.mkdtemp(prefix="lcr-bench-"))
    try:
        plate = build_plate(a.fields, tmp / "plate")
        print(f"plate: {a.fields} fields of 704x520 (real LIVECell examples), model {w.path} "
              f"({w.sha256[:12]}), {os.cpu_count()} CPUs")
        postprocess_ratio(w.path, a.imgsz, a.conf, a.max_det)
        with PeakRSS() as m_seed:
            t = time.perf_counter()
            cells_a = seed_loop(plate, tmp / "seed", w.path, a.imgsz, a.conf, a.max_det)
            t_seed = time.perf_counter() - t
        with PeakRSS() as m_ray:
            t = time.perf_counter()
            s = ray_run(plate, tmp / "ray", a.model, a.imgsz, a.conf, a.max_det, a.batch, io_tasks=a.io_tasks,
                        io_worker_max_fields=a.io_worker_max_fields)
            t_ray = time.perf_counter() - t
        fa, fb = a.fields / t_seed, a.fields / t_ray
        print(f"(a) seed-style loop : {fa:.2f} fields/s, {cells_a} cells, peak RSS {m_seed.peak / 2**20:.0f} MiB")
        print(f"(b) livecell-ray    : {fb:.2f} fields/s, {s.cells} cells, peak RSS {m_ray.peak / 2**20:.0f} MiB "
              f"(driver + Ray processes; includes Ray startup)")
        print(f"    {s.stage_report()}")
        print(f"throughput ratio (b)/(a): {fb / fa:.2f} (target >= 1.5)")
        if a.onnx:
            t = time.perf_counter()
            so = ray_run(plate, tmp / "onnx", a.model, a.imgsz, a.conf, a.max_det, a.batch, backend="onnx",
                         io_tasks=a.io_tasks, io_worker_max_fields=a.io_worker_max_fields)
            fo = a.fields / (time.perf_counter() - t)
            print(f"(c) livecell-ray --backend onnx: {fo:.2f} fields/s, {so.cells} cells; ratio (c)/(b) "
                  f"{fo / fb:.2f}, (c)/(a) {fo / fa:.2f}")
        if a.memory:
            # Each size in a fresh process of its own, so neither run carries the other's (or the seed
            # loop's) memory: the driver plus its Ray processes, nothing else.
            import ray

            ray.shutdown()
            plate10 = build_plate(10 * a.fields, tmp / "plate10")
            (f1, m1), (f10, m10) = (isolated_run(a, p, tmp / f"mem{k}") for k, p in enumerate((plate, plate10)))
            print(f"memory, each run in a fresh process: {a.fields} fields {f1:.2f} fields/s, {10 * a.fields} fields "
                  f"{f10:.2f} fields/s")
            print(f"    peak RSS {m1.peak / 2**20:.0f} -> {m10.peak / 2**20:.0f} MiB; RSS ratio 10N/N "
                  f"{m10.peak / m1.peak:.3f} (target <= 1.1)")
            print(f"    peak PSS (shared pages counted once) {m1.peak_pss / 2**20:.0f} -> "
                  f"{m10.peak_pss / 2**20:.0f} MiB; PSS ratio 10N/N {m10.peak_pss / m1.peak_pss:.3f}")
            small, big = m1.breakdown(), m10.breakdown()
            print(f"    per process (peak, summed per title): {'N':>22s} {'10N':>22s}")
            for title in sorted(set(small) | set(big), key=lambda t: -big.get(t, (0, 0, 0))[1]):
                (n0, r0, p0), (n1, r1, p1) = small.get(title, (0, 0, 0)), big.get(title, (0, 0, 0))
                print(f"    {title[:36]:36s} {n0:2d}x RSS {r0 / 2**20:5.0f} PSS {p0 / 2**20:5.0f}  "
                      f"{n1:2d}x RSS {r1 / 2**20:5.0f} PSS {p1 / 2**20:5.0f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
