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
#: LIVECell's pixel size (Incucyte S3, 10x): the scale of the shipped models' training data.
LIVECELL_PIXEL_SIZE_UM = 1.24
#: A field of unknown pixel size whose cells the model finds few of, none confidently, is probably imaged at
#: another magnification: its cells' mean confidence below this and their coverage of the field below
#: SCALE_DOUBT_COVERAGE. Measured with small.pt: 22 LIVECell fields 0.44-0.67 and 9-63%; HeLa DIC at 63x
#: (0.19 um/px, cells 40x LIVECell's area) taken at LIVECell's scale 0.30-0.38 and 1-4% (20 frames).
SCALE_DOUBT_CONFIDENCE = 0.40
SCALE_DOUBT_COVERAGE = 0.05

IMAGE_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class NormalizeConfig:
    """Robust percentile scaling shared by training and inference (same pixels in both)."""

    low_percentile: float = 1.0
    high_percentile: float = 99.8


#: Network input size of weights that do not state their own (weights/models.json).
DEFAULT_IMGSZ = 704


#: The confidence threshold of models that carry none of their own.
DEFAULT_CONF = 0.25


@dataclass(frozen=True)
class InferenceConfig:
    """How the model runs on one batch of fields."""

    # Network input size (long side). None: the model's own (weights/models.json: 832 for small.pt, which
    # segments LIVECell's cells best enlarged 832/704 times), DEFAULT_IMGSZ for weights without one.
    imgsz: int | None = None
    # Confidence threshold. None: the model's own (a user model's `models add --conf`, chosen by `train` where
    # its count of cells matched its training fields'), else DEFAULT_CONF.
    conf: float | None = None
    iou: float = 0.6
    max_det: int = 3000
    mask_threshold: float = 0.5
    half: bool | None = None  # None: fp16 exactly when on a GPU
    backend: str = "torch"  # "torch" or "onnx" (ONNX Runtime, exported by ultralytics; CPU speed-up)
    paint_on_device: bool | None = None  # None: label images are painted on the GPU when the model is on one
    # Test-time augmentation: the network also sees each field mirrored left-right and top-bottom, and a
    # cell's mask is the mean of the passes' logits (twins matched by box IoU >= tta_match_iou). Three
    # times the network's work; the Usiigaci-only small.pt's held-out mask AP 0.343 -> 0.363 (weights/README.md).
    tta: bool = False
    tta_match_iou: float = 0.6
    # A field larger than imgsz (at the model's working scale) is cut into imgsz tiles overlapping by this many
    # pixels, more than a cell is wide (livecell_ray.model.tiles); None: a quarter of imgsz.
    tile_overlap: int | None = None
    # Fields and tiles a network batch holds at most, when the call brings fewer fields. None: 64 on a GPU
    # (larger batches fill it), 4 on a CPU (where they are no faster, and a batch of 64 tiles of 832 px
    # holds 3 GiB of activations). A field of more tiles than this is cut, segmented and merged a batch
    # at a time, so its tiles' results are never all held at once.
    max_batch: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in ("torch", "onnx"):
            raise ValueError(f"unknown backend {self.backend!r}: use torch or onnx")


@dataclass(frozen=True)
class SegmentConfig:
    """One segmentation run over a plate (the unit that run.json records)."""

    source: str
    out: str
    # 'auto': each field's cell type's shipped model where there is one (BT474, MCF7), small.pt otherwise
    # (livecell_ray.model.models.AUTO); 'small', 'big', a .pt path, or CELLTYPE=MODEL,...,*=MODEL.
    model: str = "auto"
    trust_weights: bool = False
    batch_size: int = 4
    replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 0.5
    pattern: str = LIVECELL_PATTERN
    layout: str | None = None  # an instrument's naming preset (livecell_ray.plate.layouts), instead of pattern
    manifest: str | None = None
    # Micrometres per pixel of the plate's fields (a manifest's pixel_size column, then the file's own OME or
    # TIFF resolution metadata, win for their fields): each field is resampled to its model's pixel size
    # before the network, and its labels mapped back to the field's own pixels. None: taken as the model's.
    pixel_size: float | None = None
    # A multi-plane file's phase plane (an index, or an OME channel name); a time-lapse stack read as one
    # field-timepoint a plane (stack_axis "t", interval_h apart). Multi-plane files are never averaged.
    channel: str | None = None
    stack_axis: str | None = None
    interval_h: float | None = None
    address: str | None = None
    num_cpus: int | None = None  # for a local ray.init
    storage_options: dict[str, Any] = field(default_factory=dict)
    max_pixels: int = 64_000_000
    # A file of this many MiB or more is not read whole but a band of rows at a time (livecell_ray.pipeline.stream):
    # segmented, measured and written as its rows come, in Zarr chunks of 1024 x 1024, so that a stitched
    # well of 20,000 x 20,000 px holds a few tile rows in memory, never the field (max_pixels does not apply
    # to it). None: every file is read whole.
    stream_mb: float | None = 64.0
    overwrite: bool = False
    append: bool = False  # add this source's fields to an OUT that holds another source's (run.json lists both)
    replica_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per replica
    # How much the shards in flight may hold at once (about 4 bytes a pixel of 704x520 fields: normalised
    # plane, labels, raw plane): bounds pipeline.in_flight, so memory stays flat however large the plate.
    # 2 GiB: 22 shards of 64 fields, so that a 16-CPU GPU node keeps every CPU busy.
    object_store_budget_mb: int = 2048
    # Shards in flight at once, each a task that reads its fields, waits for its batch from a replica, then
    # measures and writes; None: as many as the cluster has CPUs. Each running task holds a worker
    # process (numpy, zarr, pyarrow: ~150 MB), so the bound also bounds memory.
    io_tasks: int | None = None
    # A shard worker process is replaced after about this many fields: zarr, Arrow and the allocator keep
    # about 70 KB a field that no call gives back, which over a 100,000-field run would be gigabytes per
    # worker. A fresh worker costs a second or two of start-up; None keeps workers for the whole run.
    io_worker_max_fields: int | None = 2000
    # A replica that hangs without dying (a stuck GPU call) stops its shards for good. When no field
    # finishes for this long, every task and replica of the execution is killed and a new one takes the
    # fields left, at most stall_restarts times.
    # Generous by default: an autoscaled cluster may take many minutes to bring up its first GPU node.
    # None: wait forever.
    stall_timeout_s: float | None = 1800.0
    stall_restarts: int = 2
    # After the fields, merge each well that got new ones into one Parquet part a table (compact.py): a
    # query then opens a few files a well instead of two a field-timepoint.
    compact: bool = True
    # One run writes an OUT at a time (store.acquire): a second waits for the first (True) or stops with
    # a message naming it (False). A run's lease is renewed every third of the TTL while it runs; the
    # lease of a run that died frees itself after the TTL.
    wait_for_lease: bool = False
    lease_ttl_s: float = 120.0
    # Every field's cell type is predicted from its pixels by the field classifier ('celltype': the
    # shipped one when installed; a .pt path; None: none) into cell_type_predicted and its probability.
    # route='auto' also sends each field to the model of its predicted type (--model TYPE=MODEL,...),
    # the general one ('*') where the type has none; 'none' routes by the file name's type.
    classifier: str | None = "celltype"
    route: str = "none"
    # The plate map's cell_line column as (plate or "" for every plate, well, cell line): under route='auto'
    # it decides a well's model over any prediction.
    cell_lines: list[tuple[str, str, str]] = field(default_factory=list)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)

    def __post_init__(self) -> None:
        """Values no run could use fail here, naming the flag (and spec key), before anything is written."""
        check_positive(self.pixel_size, "--pixel-size (pixel_size)", "micrometres")
        check_positive(self.stream_mb, "stream_mb", "MiB")
        if self.stack_axis not in (None, "t"):
            raise ValueError(f"--stack-axis (stack_axis) {self.stack_axis!r}: the only stack axis read is t (time)")
        check_positive(self.interval_h, "--interval (interval)", "hours")
        if self.interval_h is not None and self.stack_axis is None:
            raise ValueError("--interval (interval) applies to --stack-axis t only")
        if self.channel is not None and str(self.channel).lstrip("-").isdigit() and int(self.channel) < 0:
            raise ValueError(f"--channel (channel) {self.channel} is out of range: channels count from 0")
        if self.layout is not None and self.pattern != LIVECELL_PATTERN:
            raise ValueError(f"--layout (layout) {self.layout!r} stands for a --pattern (pattern): give one of "
                             f"the two, not both")

    @property
    def stream_bytes(self) -> int | None:
        """``stream_mb`` in bytes: files this large are streamed (None: none is)."""
        return int(self.stream_mb * 2**20) if self.stream_mb else None

    def provenance(self) -> dict[str, Any]:
        """Parameters that change the outputs; a rerun into OUT must match these to resume."""
        d = dataclasses.asdict(self)
        for k in ("source", "out", "address", "num_cpus", "storage_options", "replicas", "overwrite", "append",
                  "gpus_per_replica", "cpus_per_replica", "batch_size", "trust_weights", "model",
                  "replica_resources", "max_pixels", "stream_mb", "object_store_budget_mb", "io_tasks",
                  "io_worker_max_fields", "stall_timeout_s", "stall_restarts", "compact", "wait_for_lease",
                  "lease_ttl_s", "classifier", "cell_lines"):
            d.pop(k, None)
        if self.route == "none":  # as before routing existed, so earlier outputs still resume
            d.pop("route")
        for k in ("channel", "stack_axis", "interval_h", "layout"):  # likewise for multi-plane files, presets
            if d[k] is None:
                d.pop(k)
        if self.inference.conf is None:  # a model's own threshold is recorded beside it (preflight.provenance)
            d["inference"]["conf"] = DEFAULT_CONF
        if self.inference.tile_overlap is None:  # as before tiling existed, so earlier outputs still resume
            d["inference"].pop("tile_overlap")
        if not self.inference.tta:  # as before TTA existed, so earlier outputs still resume
            d["inference"].pop("tta")
            d["inference"].pop("tta_match_iou")
        return json.loads(json.dumps(d))


def check_positive(value: float | None, flag: str, unit: str) -> None:
    """A size or time that must be positive when given; the error names the flag."""
    if value is not None and not value > 0:
        raise ValueError(f"{flag} must be a positive number of {unit}, got {value}")


class SpecError(ValueError):
    """A malformed job spec; the message names the file and the key."""


#: Job-spec keys (YAML) -> SegmentConfig fields.
_SPEC_KEYS = {"source": "source", "output": "out", "out": "out", "model": "model", "replicas": "replicas",
              "gpus_per_replica": "gpus_per_replica", "cpus_per_replica": "cpus_per_replica",
              "batch_size": "batch_size", "storage_options": "storage_options", "pixel_size": "pixel_size",
              "pattern": "pattern", "manifest": "manifest", "trust_weights": "trust_weights",
              "overwrite": "overwrite", "append": "append", "replica_resources": "replica_resources",
              "max_pixels": "max_pixels",
              "stream_mb": "stream_mb", "object_store_budget_mb": "object_store_budget_mb", "io_tasks": "io_tasks",
              "io_worker_max_fields": "io_worker_max_fields", "stall_timeout_s": "stall_timeout_s",
              "stall_restarts": "stall_restarts", "compact": "compact", "wait": "wait_for_lease",
              "lease_ttl_s": "lease_ttl_s", "classifier": "classifier", "route": "route", "channel": "channel",
              "stack_axis": "stack_axis", "interval": "interval_h", "layout": "layout"}
#: Spec keys the job itself reads, not the SegmentConfig (jobs/segment_plate.py): a plate map to check and keep.
JOB_KEYS = {"platemap"}
_INFERENCE_KEYS = {"imgsz", "conf", "iou", "max_det", "mask_threshold", "half", "tta", "backend", "tile_overlap",
                   "max_batch"}


def segment_config_from_spec(spec: dict[str, Any], where: str = "job spec") -> SegmentConfig:
    """Build and type-check a SegmentConfig from a job spec mapping (YAML)."""
    if not isinstance(spec, dict):
        raise SpecError(f"{where}: expected a mapping of keys to values")
    for req in ("source", "output"):
        if req not in spec and not (req == "output" and "out" in spec):
            raise SpecError(f"{where}: missing required key '{req}'")
    kwargs: dict[str, Any] = {}
    inference: dict[str, Any] = {}
    for key, value in spec.items():
        if key in _SPEC_KEYS:
            kwargs[_SPEC_KEYS[key]] = value
        elif key in _INFERENCE_KEYS:
            inference[key] = value
        elif key in JOB_KEYS:
            if value is not None and not isinstance(value, str):
                raise SpecError(f"{where}: key '{key}' should be a path or URL, got {type(value).__name__} {value!r}")
        else:
            raise SpecError(f"{where}: unknown key '{key}'")
    if isinstance(kwargs.get("channel"), int) and not isinstance(kwargs["channel"], bool):
        kwargs["channel"] = str(kwargs["channel"])  # an index in YAML; names are strings
    _check_types(where, SegmentConfig, kwargs)
    _check_types(where, InferenceConfig, inference)
    at_least_one = [kwargs.get(k) for k in ("replicas", "batch_size", "io_tasks", "io_worker_max_fields")]
    if any(v is not None and v < 1 for v in at_least_one):
        raise SpecError(f"{where}: replicas, batch_size, io_tasks and io_worker_max_fields must be at least 1")
    if kwargs.get("stall_timeout_s") is not None and kwargs["stall_timeout_s"] <= 0:
        raise SpecError(f"{where}: stall_timeout_s must be positive (or null: wait forever)")
    if kwargs.get("stall_restarts", 0) < 0:
        raise SpecError(f"{where}: stall_restarts must be 0 or more")
    try:
        kwargs["inference"] = InferenceConfig(**inference)
        return SegmentConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{where}: {exc}") from exc


def _check_types(where: str, cls: type, values: dict[str, Any]) -> None:
    """Each value has its dataclass field's type (YAML gives strings, numbers, booleans, mappings)."""
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for name, value in values.items():
        t = types[name]
        ok = (("int" in t and isinstance(value, int) and not isinstance(value, bool))
              or ("float" in t and isinstance(value, (int, float)) and not isinstance(value, bool))
              or ("str" in t and isinstance(value, str)) or ("bool" in t and isinstance(value, bool))
              or ("dict" in t and isinstance(value, dict)) or (value is None and "None" in t))
        if not ok:
            raise SpecError(f"{where}: key '{name}' should be {t}, got {type(value).__name__} {value!r}")
