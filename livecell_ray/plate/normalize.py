"""A field's plane scaled to the model's uint8 between robust percentiles: the one way training and inference
share, for fields read whole and a band of rows at a time alike."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from livecell_ray.config import NormalizeConfig


def normalize(img: np.ndarray, cfg: NormalizeConfig | None = None) -> np.ndarray:
    """Scale a 2-D image of any depth to uint8 between robust percentiles.

    Phase-contrast cameras give 8, 12 or 16 bit data with very different ranges; the model sees
    the same 0-255 contrast whatever came in. A constant image maps to all zeros. Integer images
    (nearly all) take a histogram and a lookup table: the same result as scaling every pixel in
    floating point, 5-10x cheaper, which matters on a GPU node where CPUs bound the fields/s.
    """
    x = np.asarray(img)
    # Percentiles on a strided subsample: identical in expectation, 16x cheaper on big fields.
    sample = x[::4, ::4] if x.size > SAMPLE_ABOVE else x
    return normalizer(sample, x.dtype, sample is not x, cfg)(x)


#: Images of more pixels than this take their percentiles from every 4th row and column.
SAMPLE_ABOVE = 1_000_000


def normalizer(sample: np.ndarray, dtype: np.dtype, subsampled: bool, cfg: NormalizeConfig | None = None
               ) -> Callable[[np.ndarray], np.ndarray]:
    """:func:`normalize` as a function of the image's percentile sample (``subsampled``: every 4th row and
    column of a larger image), so that a field read a band of rows at a time (livecell_ray.pipeline.stream) is
    scaled exactly as it would be whole."""
    cfg = cfg or NormalizeConfig()
    q = [cfg.low_percentile, cfg.high_percentile]
    if dtype in (np.uint8, np.uint16) and sample.size:
        counts = np.bincount(sample.ravel(), minlength=256)
        lo, hi = _percentiles_from_histogram(counts, q)
        # One entry per value present; a subsample may miss the largest, so then the whole range.
        values = np.iinfo(dtype).max + 1 if subsampled else len(counts)
        lut = _scale(np.arange(values, dtype=np.float32), lo, hi)
        return lut.take
    sample = sample.astype(np.float32, copy=False)
    finite = np.isfinite(sample)
    # NaN and inf pixels (a float export's masked or saturated ones) take no part in the percentiles, and
    # come out as 0 (NaN, -inf) or 255 (inf): never an all-zero plane for one bad pixel.
    lo, hi = np.percentile(sample if finite.all() else sample[finite], q) if finite.any() else (np.nan, np.nan)
    return lambda x: _scale(np.asarray(x).astype(np.float32, copy=False), lo, hi)


def _percentiles_from_histogram(counts: np.ndarray, q: list[float]) -> tuple[float, float]:
    """np.percentile's default ('linear') method, read off the values' histogram (exact order statistics)."""
    n = int(counts.sum())
    cum = np.cumsum(counts)
    out = []
    for p in q:
        virtual = (n - 1) * (p / 100)
        prev = int(np.floor(virtual))
        gamma = virtual - prev
        a, b = np.searchsorted(cum, [prev, min(prev + 1, n - 1)], side="right").astype(np.float64)
        # numpy's _lerp, so the values match np.percentile's to the last bit.
        out.append(b - (b - a) * (1 - gamma) if gamma >= 0.5 else a + (b - a) * gamma)
    return out[0], out[1]


def _scale(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(x - lo) / (hi - lo) to 0..255, rounded; zeros when the range is empty."""
    if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo < 1e-6:
        return np.zeros(x.shape, dtype=np.uint8)
    y = (x - np.float64(lo)) * (255.0 / (hi - lo))
    np.clip(y, 0, 255, out=y)
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        y[np.isnan(y)] = 0
    return (y + 0.5).astype(np.uint8)


def to_rgb(gray_u8: np.ndarray) -> np.ndarray:
    """The 3-channel uint8 array YOLO expects (phase contrast is grey)."""
    return np.repeat(gray_u8[..., None], 3, axis=2)
