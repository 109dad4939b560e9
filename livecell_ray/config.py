"""All tunables in one typed place: the CLI, the Ray job entrypoint and the tests build these."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

#: LIVECell's naming convention: ``A172_Phase_A7_1_00d00h00m_1.tif`` = cell type A172, well A7,
#: field 1, day 0 hour 0 minute 0, crop 1. The plate defaults to the cell type when absent.
LIVECELL_PATTERN = (
    r"(?P<cell_type>[A-Za-z0-9]+)_Phase_(?P<well>[A-Pa-p]\d{1,2})_(?P<field>\d+)_"
    r"(?P<day>\d+)d(?P<hour>\d+)h(?P<minute>\d+)m_(?P<crop>\d+)"
)

IMAGE_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class NormalizeConfig:
    """Robust percentile scaling shared by training and inference (same pixels in both)."""

    low_percentile: float = 1.0
    high_percentile: float = 99.8


@dataclass(frozen=True)
class InferenceConfig:
    """How the model runs on one batch of fields."""

    imgsz: int = 704
    conf: float = 0.25
    iou: float = 0.6
    max_det: int = 3000
    mask_threshold: float = 0.5
    half: bool | None = None  # None: fp16 exactly when on a GPU


@dataclass(frozen=True)
class SegmentConfig:
    """One segmentation run over a plate (the unit that run.json records)."""

    source: str
    out: str
    model: str = "small"
    trust_weights: bool = False
    batch_size: int = 4
    replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 0.5
    pattern: str = LIVECELL_PATTERN
    manifest: str | None = None
    pixel_size: float | None = None  # micrometres per pixel
    address: str | None = None
    num_cpus: int | None = None  # for a local ray.init
    storage_options: dict[str, Any] = field(default_factory=dict)
    max_pixels: int = 64_000_000
    overwrite: bool = False
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)

    def provenance(self) -> dict[str, Any]:
        """Parameters that change the outputs; a rerun into OUT must match these to resume."""
        d = dataclasses.asdict(self)
        for k in ("source", "out", "address", "num_cpus", "storage_options", "replicas", "overwrite",
                  "gpus_per_replica", "cpus_per_replica", "batch_size", "trust_weights", "model"):
            d.pop(k, None)
        return json.loads(json.dumps(d))
