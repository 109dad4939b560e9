"""A stitched well: `livecell-ray segment` on one 10,000 x 10,000 field, beside ordinary 704x520 fields.

    python benchmarks/large_field.py [--size 10000] [--fields 10] [--runs ordinary,whole,streamed] [--no-speed]

Builds a stitched field by tiling the bundled LIVECell examples (real cells, LIVECell's scale) up to
SIZE x SIZE, and a plate of FIELDS ordinary 704x520 fields of the same examples (small.pt, CPU, pixel
size 1.24 so the scale is known). Speed: segmenting and measuring each, side by side in this process,
alternating rounds; the stitched field's megapixels per second as a ratio of the ordinary fields' is
what tiling and merging cost beyond the network. Memory: `livecell-ray segment` on each plate in a
fresh process, the peak RSS / PSS of its whole process tree (Ray's workers included): the ordinary
fields, the stitched field read whole (`stream_mb` None) and streamed a tile row at a time (the default
`stream_mb`; livecell_ray.pipeline.stream).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

EXAMPLES = ROOT / "examples" / "livecell_plate"


def build(size: int, n_fields: int, where: Path) -> tuple[Path, Path]:
    """(folder with one SIZE x SIZE stitched field, folder with n_fields ordinary fields)."""
    import tifffile

    from livecell_ray.plate.imaging import read_image

    ims = [read_image(str(p)) for p in sorted(EXAMPLES.glob("*.tif"))]
    rows = []
    k = 0
    for _ in range(-(-size // 520)):
        row = []
        for _ in range(-(-size // 704)):
            row.append(ims[k % len(ims)])
            k += 1
        rows.append(np.concatenate(row, axis=1))
    stitched = np.concatenate(rows, axis=0)[:size, :size]
    big, small = where / "stitched", where / "fields"
    big.mkdir(parents=True)
    small.mkdir(parents=True)
    tifffile.imwrite(big / "Stitched_Phase_A1_1_00d00h00m_1.tif", stitched)
    for i in range(n_fields):
        row, col = "ABCDEFGH"[i // 12 % 8], i % 12 + 1
        tifffile.imwrite(small / f"Mixed_Phase_{row}{col}_1_00d00h00m_1.tif", ims[i % len(ims)])
    return big, small


def run_child(plate: Path, out: Path, max_pixels: int, stream_mb: float | None = None
              ) -> tuple[float, int, int, int, int]:
    """Segment in a fresh process (``stream_mb``: files this large streamed a band at a time; None: read
    whole); (seconds, fields, cells, peak RSS, peak PSS) of its whole process tree."""
    from throughput import PeakRSS

    code = ("import sys, time; from livecell_ray import pipeline; from livecell_ray.config import SegmentConfig;"
            "t=time.time(); s=pipeline.run(SegmentConfig(source=sys.argv[1], out=sys.argv[2], pixel_size=1.24,"
            "max_pixels=int(sys.argv[3]), stream_mb=float(sys.argv[4]) or None, compact=False,"
            "num_cpus=os.cpu_count()));"
            "print('RESULT', time.time()-t, s.fields_done, s.cells)")
    p = subprocess.Popen([sys.executable, "-c", "import os;" + code, str(plate), str(out), str(max_pixels),
                          str(stream_mb or 0)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    with PeakRSS(pid=p.pid) as mem:
        stdout, stderr = p.communicate()
    line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT")), None)
    if p.returncode or line is None:
        raise SystemExit(f"run failed: {stderr[-2000:]}")
    _, seconds, fields, cells = line.split()
    return float(seconds), int(fields), int(cells), mem.peak, mem.peak_pss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=10_000)
    ap.add_argument("--fields", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runs", default="ordinary,whole,streamed",
                    help="end-to-end runs: the ordinary fields, the stitched field read whole (stream_mb None), "
                         "streamed a tile row at a time (the default stream_mb); 'whole' of a 20,000 px field "
                         "needs about 20 GiB")
    ap.add_argument("--no-speed", action="store_true", help="only the end-to-end runs")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lcr-large-"))
    try:
        big, small = build(a.size, a.fields, tmp)
        px_big, px_small = a.size * a.size, 704 * 520
        print(f"one {a.size}x{a.size} stitched field ({px_big / 1e6:.0f} Mpx) and {a.fields} fields of 704x520, "
              f"{os.cpu_count()} CPUs, small.pt")
        if not a.no_speed:
            speed(a, big, small, px_big, px_small)
        print("  livecell-ray segment end to end, each in a fresh process (start-up included):")
        from livecell_ray.config import SegmentConfig

        runs = {"ordinary": ("ordinary fields", small, 64_000_000, SegmentConfig.stream_mb),
                "whole": ("stitched field, read whole", big, px_big + 1, None),
                "streamed": ("stitched field, streamed", big, px_big + 1, SegmentConfig.stream_mb)}
        for key in a.runs.split(","):
            name, plate, limit, stream_mb = runs[key]
            sec, n, cells, rss, pss = run_child(plate, tmp / f"out-{key}", limit, stream_mb)
            print(f"    {name}: {n} in {sec:.1f} s ({n / sec:.3f} fields/s, {cells:,} cells, "
                  f"{px_big * (key != 'ordinary') / 1e6 / sec:.2f} Mpx/s), "
                  f"peak RSS {rss / 2**30:.2f} GiB, PSS {pss / 2**30:.2f} GiB", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def speed(a: argparse.Namespace, big: Path, small: Path, px_big: int, px_small: int) -> None:
    """The model and the measurements (what a field costs beyond reading and writing), in this one process,
    the stitched field whole against the ordinary fields, side by side and alternating."""
    import torch

    from livecell_ray.measure import measure_cells, measure_field
    from livecell_ray.model import models
    from livecell_ray.model.segment import Segmenter
    from livecell_ray.plate.imaging import normalize, read_image

    torch.set_num_threads(os.cpu_count() or 2)
    seg = Segmenter({models.DEFAULT_KEY: models.resolve("small")})
    ordinary = [read_image(str(p)) for p in sorted(small.iterdir())]
    stitched = read_image(str(next(big.iterdir())), max_pixels=px_big + 1)
    seg([normalize(ordinary[0])], None, [1.24])  # warm-up

    def one(raw: np.ndarray) -> int:
        r = seg([normalize(raw)], None, [1.24])[0]
        measure_cells(r.labels, raw, r.class_ids, r.confidences, 1.24)
        measure_field(r.labels, raw)
        return int(r.labels.max())

    times: dict[str, list[float]] = {"ordinary": [], "stitched": []}
    for _ in range(a.rounds):
        t = time.perf_counter()
        for raw in ordinary:
            one(raw)
        times["ordinary"].append((time.perf_counter() - t) / len(ordinary))
        t = time.perf_counter()
        cells = one(stitched)
        times["stitched"].append(time.perf_counter() - t)
    t_small, t_big = (float(np.median(v)) for v in times.values())
    small_mpx, big_mpx = px_small / 1e6 / t_small, px_big / 1e6 / t_big
    print(f"  segment + measure, median of {a.rounds} alternating rounds:")
    print(f"    ordinary fields: {1 / t_small:.3f} fields/s, {small_mpx:.2f} Mpx/s")
    print(f"    stitched field:  {1 / t_big:.4f} fields/s ({t_big:.1f} s, {cells:,} cells), {big_mpx:.2f} Mpx/s")
    print(f"    stitched / ordinary, megapixels per second: {big_mpx / small_mpx:.2f}", flush=True)


if __name__ == "__main__":
    main()
