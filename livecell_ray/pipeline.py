"""Distribution: the plate's manifest cut into shards, each a Ray task beside the model replicas.

    manifest rows --shards of batch_size fields--> process_shard (a CPU task each):
        read + decode + normalise --> SegmentActor.segment (a replica: Ray actor, GPU or CPU, one batch)
        --> measure + write to Zarr + Parquet, committed; a summary row a field back to the driver

A shard's fields are read, sent to a replica as one model batch, and measured and written by the same
task: the raw planes never leave the process that read them, and only the normalised planes and the
label images cross the object store. Several shards are in flight at once, so reading and measuring of
some overlap the model's work on others; how many is bounded (``in_flight``), so memory stays flat from
ten fields to a whole plate. Every stage catches its own errors and passes the field on marked failed,
so one bad file never stops the plate: it ends in failures/ instead.

Fault tolerance is Ray's own: a replica whose process or node dies is restarted and its pending batches
retried (max_restarts, max_task_retries), a shard task whose worker dies is run again (max_retries);
both are safe because a field counts as done only when its fields/ row is committed, and rewriting it
replaces rather than duplicates. A replica that hangs without dying (a stuck GPU call) is caught by the
driver's watchdog: when no shard finishes for ``stall_timeout_s``, every task and replica of that
execution is killed and a new one takes the fields still to do.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

import livecell_ray
from livecell_ray import credentials, models, offline, store
from livecell_ray.config import NormalizeConfig, SegmentConfig
from livecell_ray.imaging import ImageError, PlaneError, Planes, TooLarge, normalize, read_image_with_info
from livecell_ray.measure import measure_cells, measure_field
from livecell_ray.replica import SegmentActor

if TYPE_CHECKING:  # the driver's: the shard workers never import pandas or the manifest (0.25 s of CPU each)
    import pandas as pd

    from livecell_ray import manifest as manifest_mod

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """The run cannot start (bad output location, provenance mismatch...) or cannot go on (stalled)."""


@dataclass
class RunSummary:
    """What the CLI prints and run.json records."""

    out: str
    fields_total: int = 0
    fields_skipped: int = 0
    fields_done: int = 0
    fields_failed: int = 0
    unmatched: int = 0
    cells: int = 0
    seconds: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)
    # Seconds spent in each stage, summed over fields: against the wall time (and the workers each stage
    # has) they say which stage bounds the run. "model" is the replica's time on its batches.
    stage_seconds: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "model": 0.0, "finish": 0.0})
    time_to_first_field: float | None = None
    restarts: list[str] = field(default_factory=list)  # why each stalled execution was thrown away
    # Fields segmented with no pixel size known (no --pixel-size, manifest column or file metadata): taken to be
    # at the model's scale, which the CLI's summary says.
    scale_assumed: int = 0
    compaction: dict[str, Any] | None = None  # what compacting the wells did (None: not asked for)

    @property
    def fields_per_second(self) -> float:
        return self.fields_done / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_fields_per_second(self) -> float:
        """Fields/s after the first one came out: the rate without Ray's and the model's start-up."""
        if self.time_to_first_field is None or self.seconds <= self.time_to_first_field:
            return 0.0
        return max(0, self.fields_done - 1) / (self.seconds - self.time_to_first_field)

    def stage_report(self) -> str:
        """Per-field time of each stage and how busy the model replicas were (for benchmarks and tuning)."""
        n = max(1, self.fields_done + self.fields_failed)
        ms = {k: 1000 * v / n for k, v in self.stage_seconds.items()}
        busy = self.stage_seconds["model"] / self.seconds if self.seconds > 0 else 0.0
        first = f"{self.time_to_first_field:.1f} s" if self.time_to_first_field is not None else "-"
        return (f"read {ms['read']:.1f} ms, model {ms['model']:.1f} ms, measure+write {ms['finish']:.1f} ms a "
                f"field; model replicas busy {busy:.0%} of the run (summed); first field after {first}")


# --------------------------------------------------------------------------- stages
def read_field(row: dict[str, Any], storage_options: dict[str, Any], max_pixels: int,
               norm: NormalizeConfig, channel: str | None = None, pixel_size: float | None = None,
               stream_bytes: int | None = None) -> dict[str, Any]:
    """Decode and normalise one field; on failure mark it and carry the reason along.

    Its pixel size is :func:`field_pixel_size`. A file of ``stream_bytes`` or more is not read: it is marked
    ``stream`` (:func:`stream_field` reads it a band at a time).
    """
    row = dict(row)
    t0 = time.perf_counter()
    try:
        raw, info = read_image_with_info(row["path"], storage_options, max_pixels, field_planes(row, channel),
                                         stream_bytes=stream_bytes)
        row["pixel_size"] = field_pixel_size(row, pixel_size, info.pixel_size)
        row["image"] = normalize(raw, norm)
        row["raw"] = raw  # in the camera's units, for intensity statistics; it never leaves the shard's task
        row["status"], row["stage"], row["error"] = "ok", "", ""
    except TooLarge:
        _mark_failed(row, "", "")
        row["status"], row["stream"] = "ok", True
    except ImageError as exc:
        _mark_failed(row, "read", str(exc))
    except Exception as exc:  # anything else still names the file
        _mark_failed(row, "read", f"{row['path']}: {type(exc).__name__}: {exc}")
    row["read_s"] = time.perf_counter() - t0
    return row


def field_planes(row: dict[str, Any], channel: str | None) -> Planes:
    """Which plane of its file a manifest row is: ``channel`` (--channel), and its stack plane if it has one."""
    plane = int(row.get("plane", -1))
    return Planes(channel, plane if plane >= 0 else None)


def field_pixel_size(row: dict[str, Any], pixel_size: float | None, from_file: float | None) -> float:
    """A field's um/px: the manifest's for it, else ``pixel_size`` (--pixel-size), else the file's own (OME or
    TIFF resolution metadata), else unknown (NaN: the model's scale is assumed)."""
    given = float(row.get("pixel_size", np.nan))
    return given if given > 0 else (pixel_size or from_file or np.nan)


def _summary(row: dict[str, Any], node: str) -> dict[str, Any]:
    """A field's summary for the driver, as it stands before it is measured and written (``node``: this one)."""
    return {"field_id": str(row["field_id"]), "path": str(row["path"]), "status": str(row["status"]), "n_cells": 0,
            "stage": str(row["stage"]), "error": str(row["error"]), "model_node": str(row.get("model_node", "")),
            "model_pid": int(row.get("model_pid", 0)), "measure_node": node, "measure_pid": os.getpid(),
            "read_s": float(row.get("read_s", 0.0)), "model_s": float(row.get("model_s", 0.0)),
            "pixel_size": float(row.get("pixel_size", np.nan))}


def _mark_failed(row: dict[str, Any], stage: str, error: str) -> None:
    row["image"] = np.zeros((0, 0), np.uint8)
    row["raw"] = np.zeros((0, 0), np.uint8)
    row["status"], row["stage"], row["error"] = "failed", stage, error


def process_shard(rows: list[dict[str, Any]], replica: Any, cfg: SegmentConfig, out: str,
                  provenance_meta: dict[str, str]) -> list[dict[str, Any]]:
    """A shard of the manifest, start to end, in one CPU task: read its fields, have ``replica`` segment
    the readable ones as one batch, then measure, write and commit them; one summary a field.

    One task a shard rather than a task a stage: a field's raw plane stays where it was read, and Ray
    schedules, serialises and tracks one task per batch_size fields instead of three per field.
    """
    import ray

    fields = [read_field(r, cfg.storage_options, cfg.max_pixels, cfg.normalize, cfg.channel, cfg.pixel_size,
                         cfg.stream_bytes) for r in rows]
    streamed = [f for f in fields if f.get("stream")]
    fields = [f for f in fields if not f.get("stream")]
    ok = [f for f in fields if f["status"] == "ok"]
    if ok:
        try:
            seg = ray.get(replica.segment.remote([f["image"] for f in ok], [str(f["cell_type"]) for f in ok],
                                                 [float(f["pixel_size"]) for f in ok], [str(f["path"]) for f in ok]))
        except ray.exceptions.RayActorError:
            raise  # the replica is gone for good (its restarts spent): the run stops, see _results
        except Exception as exc:  # its answer was lost on the way, or could not be sent
            seg = {"error": [f"{f['path']}: model failed ({format_error(exc)})" for f in ok]}
        for i, f in enumerate(ok):
            f.update(model_node=seg.get("model_node", ""), model_pid=seg.get("model_pid", 0),
                     model_s=seg.get("model_s", 0.0))
            if seg["error"][i]:
                f["status"], f["stage"], f["error"] = "failed", "segment", seg["error"][i]
                continue
            for k in ("labels", "class_ids", "confidences", "cell_type_predicted", "cell_type_probability"):
                f[k] = seg[k][i]
    summaries = finish_fields(fields, out, cfg.storage_options, cfg.pixel_size, provenance_meta) if fields else []
    return summaries + [stream_field(f, replica, cfg, out, provenance_meta) for f in streamed]


#: The part of a streamed field its cell type is predicted from (a full Incucyte frame, from its centre).
TYPE_WINDOW = (1040, 1408)


def stream_field(row: dict[str, Any], replica: Any, cfg: SegmentConfig, out: str,
                 provenance_meta: dict[str, str]) -> dict[str, Any]:
    """A file too large to read whole (``stream_mb``), segmented, measured and written a tile row at a time
    (:mod:`livecell_ray.stream`), then committed like any field; its summary. A failure names the file and
    ends in failures/ as any field's does."""
    import ray

    from livecell_ray import stream

    t0 = time.perf_counter()
    outputs = store.Outputs(out, cfg.storage_options)
    summary = _summary(row, ray.get_runtime_context().get_node_id())
    stage = "read"
    try:
        reader = stream.RowReader(row["path"], cfg.storage_options, field_planes(row, cfg.channel))
        try:
            px = field_pixel_size(row, cfg.pixel_size, reader.info.pixel_size)
            summary["pixel_size"] = px
            to_u8 = stream.normaliser(reader, cfg.normalize)
            h, w = reader.shape
            y0, x0 = max(0, (h - TYPE_WINDOW[0]) // 2), max(0, (w - TYPE_WINDOW[1]) // 2)
            window = to_u8(reader.window(y0, y0 + TYPE_WINDOW[0], x0, x0 + TYPE_WINDOW[1]))
            summary["read_s"] = time.perf_counter() - t0
            stage = "segment"
            how = ray.get(replica.plan_field.remote(window, str(row["cell_type"]), float(px), (h, w)))
            summary.update(model_node=how["model_node"], model_pid=how["model_pid"])
            image_path, write = store.stream_writer(outputs, str(row["plate"]), str(row["row"]), int(row["column"]),
                                                    str(row["site"]), int(row["t_index"]), int(row["n_timepoints"]),
                                                    (h, w), stream.CHUNK)

            def submit(tiles: list[np.ndarray]) -> Callable[[], list[tuple]]:
                ref = replica.segment_tiles.remote(how["key"], tiles)
                return lambda: ray.get(ref)

            res = stream.segment_streamed(reader, submit, tuple(how["working"]), how["plan"],
                                          px if px > 0 else cfg.pixel_size, write, to_u8)
        finally:
            reader.close()
        stage = "write"
        row = {**row, "cell_type_predicted": how["cell_type_predicted"],
               "cell_type_probability": how["cell_type_probability"]}
        cells, field_row = _field_tables(row, res.cells, res.stats)
        store.commit_tables(outputs, str(row["plate"]), str(row["well"]), summary["field_id"], cells, field_row,
                            provenance_meta, bool(row.get("failed_before")))
        summary["n_cells"] = int(res.stats["n_cells"])
        summary["model_s"] = res.seconds.get("model", 0.0)
    except ray.exceptions.RayActorError:
        raise  # the replica is gone for good: the run stops, see _results
    except ImageError as exc:
        summary.update(status="failed", stage=stage, error=str(exc))
    except Exception as exc:
        summary.update(status="failed", stage=stage, error=f"{row['path']}: {type(exc).__name__}: {exc}")
    if summary["status"] != "ok":
        write_failure(outputs, summary["field_id"], summary["path"], summary["field_id"], str(row["plate"]),
                      str(row["well"]), summary["stage"], summary["error"])
    summary["finish_s"] = time.perf_counter() - t0 - summary["read_s"] - summary["model_s"]
    return summary


def write_plates(out: str, storage_options: dict[str, Any], fields: pd.DataFrame, pixel_size: float | None,
                 prov: dict[str, Any], layouts: dict[str, dict[str, Any]]) -> None:
    """The plates' NGFF metadata and layout (:func:`livecell_ray.store.init_plates`), retried on transient
    errors; before any field of them is written."""
    outputs = store.Outputs(out, storage_options)
    store.retry(store.init_plates, outputs, fields, pixel_size, prov, layouts)


def finish_field(row: dict[str, Any], out: str, storage_options: dict[str, Any], pixel_size: float | None,
                 provenance_meta: dict[str, str]) -> dict[str, Any]:
    """Measure and write one field (see :func:`finish_fields`); returns its summary."""
    return finish_fields([row], out, storage_options, pixel_size, provenance_meta)[0]


def finish_fields(rows: list[dict[str, Any]], out: str, storage_options: dict[str, Any], pixel_size: float | None,
                  provenance_meta: dict[str, str]) -> list[dict[str, Any]]:
    """Measure a block of fields, then hand them to the store, which writes and commits them in one call
    (:func:`livecell_ray.store.write_block`). A field that cannot be measured ends in failures/ with stage
    measure, one whose own writes keep failing with stage write.
    """
    t0 = time.perf_counter()
    outputs = store.Outputs(out, storage_options)
    import ray

    node = ray.get_runtime_context().get_node_id()
    summaries = [_summary(r, node) for r in rows]
    block: list[tuple[int, store.FieldResult]] = []
    for i, (row, summary) in enumerate(zip(rows, summaries)):
        if summary["status"] != "ok":
            continue
        try:
            labels = np.asarray(row["labels"])
            raw = np.asarray(row["raw"])
            cls = np.frombuffer(row["class_ids"], np.int16)
            conf = np.frombuffer(row["confidences"], np.float32)
            px = float(row.get("pixel_size", np.nan))
            cells = measure_cells(labels, raw, cls, conf, px if px > 0 else pixel_size)
            fstats = measure_field(labels, raw)
        except Exception as exc:
            summary.update(status="failed", stage="measure", error=f"{row['path']}: {type(exc).__name__}: {exc}")
            continue
        block.append((i, _field_result(row, labels, cells, fstats)))
    errors = store.write_block(outputs, [f for _, f in block], provenance_meta)
    for i, f in block:
        if f.field_id in errors:
            summaries[i].update(status="failed", stage="write", error=errors[f.field_id])
        else:
            summaries[i]["n_cells"] = len(f.cells["label"])
    for row, s in zip(rows, summaries):
        if s["status"] != "ok":
            write_failure(outputs, s["field_id"], s["path"], s["field_id"], str(row["plate"]), str(row["well"]),
                          s["stage"], s["error"])
    each = (time.perf_counter() - t0) / max(1, len(rows))
    for s in summaries:
        s["finish_s"] = each
    return summaries


def _field_result(row: dict[str, Any], labels: np.ndarray, cells: dict[str, np.ndarray],
                  fstats: dict[str, Any]) -> store.FieldResult:
    """A measured field as the store writes it: its planes, its cells/ columns and its fields/ row."""
    cells_cols, field_cols = _field_tables(row, cells, fstats)
    return store.FieldResult(str(row["field_id"]), str(row["path"]), str(row["plate"]), str(row["well"]),
                             str(row["row"]), int(row["column"]), str(row["site"]), int(row["t_index"]),
                             int(row["n_timepoints"]), np.asarray(row["image"]), labels, cells_cols, field_cols,
                             bool(row.get("failed_before")))


def _field_tables(row: dict[str, Any], cells: dict[str, np.ndarray], fstats: dict[str, Any]
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A measured field's cells/ columns and fields/ row."""
    fid, plate = str(row["field_id"]), str(row["plate"])
    meta = {k: str(row[k]) for k in ("field", "site", "cell_type", "path")}
    n = len(cells["label"])
    cells_cols = {"field_id": [fid] * n, **cells,
                  "field": [meta["field"]] * n, "crop": np.full(n, int(row["crop"]), np.int32),
                  "site": [meta["site"]] * n, "timepoint": np.full(n, float(row["timepoint"])),
                  "cell_type": [meta["cell_type"]] * n, "path": [meta["path"]] * n}
    field_cols = {
        "field_id": [fid], "path": [meta["path"]], "field": [meta["field"]],
        "crop": [int(row["crop"])], "site": [meta["site"]], "timepoint": [float(row["timepoint"])],
        "t_index": [int(row["t_index"])], "cell_type": [meta["cell_type"]],
        "cell_type_predicted": [str(row.get("cell_type_predicted", ""))],
        "cell_type_probability": [float(row.get("cell_type_probability", np.nan))],
        "zarr_path": [store.field_zarr_path(plate, str(row["row"]), int(row["column"]), str(row["site"]))],
        **{k: [v] for k, v in fstats.items()}, "status": ["ok"],
    }
    return cells_cols, field_cols


def write_failure(outputs: store.Outputs, key: str, path: str, field_id: str, plate: str, well: str,
                  stage: str, error: str) -> dict[str, Any]:
    """One row in failures/, keyed so that a rerun overwrites rather than duplicates it."""
    rec = {"key": key, "path": path, "field_id": field_id, "plate": plate, "well": well, "stage": stage,
           "error": error, "time": datetime.now(timezone.utc).isoformat()}
    outputs.write_table(outputs.table_path("failures", None, None, key),
                        store.table_from_columns({k: [v] for k, v in rec.items()}))
    return rec


# --------------------------------------------------------------------------- the run
def _check_out(cfg: SegmentConfig, outputs: store.Outputs) -> None:
    src = cfg.source if "://" in cfg.source else os.path.abspath(cfg.source)
    if outputs.url.rstrip("/").startswith(src.rstrip("/") + "/") or outputs.url.rstrip("/") == src.rstrip("/"):
        raise RunError(f"{cfg.out}: output location is inside the source {cfg.source}; choose another OUT")
    try:
        outputs.fs.makedirs(outputs.root, exist_ok=True)
        probe = store.join(outputs.root, f".write-probe-{os.getpid()}")
        with outputs.fs.open(probe, "wb") as f:
            f.write(b"ok")
        outputs.fs.rm(probe)
    except Exception as exc:
        raise RunError(f"{cfg.out}: output location is not writable ({type(exc).__name__}: {exc})") from exc


def provenance(cfg: SegmentConfig, weights: dict[str, models.Weights]) -> dict[str, Any]:
    """What made these outputs; a resume must match it."""
    used = dict(weights)
    if cfg.route == "auto":  # the classifier then decides which model segments a field
        clf = models.resolve_classifier(cfg.classifier, cfg.trust_weights)
        if clf is None:
            raise RunError("--route auto needs a field classifier: weights/celltype.pt is not installed "
                           "and --classifier names none (train one with `livecell-ray train-classifier`)")
        used["classifier"] = clf
    # Each network's input size as it ran (a run that sets none takes the model's own from weights/models.json).
    sizes = {k: w.input_size(cfg.inference.imgsz) for k, w in weights.items()}
    return {"package": "livecell-ray", "version": livecell_ray.__version__,
            "models": {k: {"path": w.path, "sha256": w.sha256, **({"imgsz": sizes[k]} if k in sizes else {})}
                       for k, w in used.items()},
            "parameters": cfg.provenance()}


def _same_provenance(a: dict[str, Any], b: dict[str, Any]) -> bool:
    used = lambda p: {k: (v["sha256"], v.get("imgsz")) for k, v in p.get("models", {}).items()}  # noqa: E731
    return used(a) == used(b) and a.get("parameters") == b.get("parameters")


def reader_channel(cfg: SegmentConfig, man: manifest_mod.Manifest) -> str | None:
    """The plane a reader picks inside each file: --channel, unless it already chose the files by name."""
    return None if man.channel_from_names else cfg.channel


def init_ray(cfg: SegmentConfig) -> None:
    """Join a cluster (address) or start a local Ray with offline workers."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": True, "logging_level": "ERROR"}
    if cfg.address:
        ray.init(address=cfg.address, runtime_env={"env_vars": offline.worker_env()}, **kwargs)
    elif os.environ.get("RAY_ADDRESS"):  # inside a Ray job (its runtime_env already applies), or pointed at one
        ray.init(**kwargs)
    else:
        # address="local": always a fresh local instance, never a stale cluster found in /tmp/ray. Its workers
        # are this process's children's children and inherit its environment, offline settings included; no
        # job runtime_env, so the worker Ray prestarts for the first driver (default environment) is one the
        # model replica can take: 0.8 s less to the first field than a worker started for a runtime_env.
        offline.configure()
        ray.init(address="local", num_cpus=cfg.num_cpus or os.cpu_count(), include_dashboard=False, **kwargs)


def plan(cfg: SegmentConfig, weights: dict[str, models.Weights] | None = None
         ) -> tuple[manifest_mod.Manifest, store.Outputs, dict[str, models.Weights]]:
    """Everything that can be checked before Ray starts: manifest, OUT, weights (``weights``: cfg.model's, when
    resolved already)."""
    from livecell_ray import manifest as manifest_mod

    for name, url in (("source", cfg.source), ("OUT", cfg.out)):
        if credentials.url_password(url):  # it would be in every path column, run.json and the logs
            raise RunError(f"{credentials.redact_url(url)}: the {name} URL holds a password; leave it out and "
                           f"{credentials.HOW}")
    man = manifest_mod.build(cfg.source, cfg.pattern, cfg.manifest, cfg.storage_options, cfg.channel, cfg.layout)
    if cfg.stack_axis == "t":
        man = manifest_mod.expand_stacks(man, cfg.interval_h, cfg.storage_options)
    # Multi-plane files read without the flags that say which plane (or with a channel they lack) fail here,
    # on the first file, before anything is written; any other fault of that file is its own failure later.
    first = man.fields.iloc[0]
    try:
        read_image_with_info(first["path"], cfg.storage_options, cfg.max_pixels,
                             field_planes(first, reader_channel(cfg, man)), stream_bytes=cfg.stream_bytes)
    except PlaneError as exc:
        raise RunError(str(exc)) from None
    except (ImageError, TooLarge):
        pass
    outputs = store.Outputs(cfg.out, cfg.storage_options)
    weights = weights or models.resolve_map(cfg.model, cfg.trust_weights)
    if cfg.route not in ("none", "auto"):
        raise RunError(f"route {cfg.route!r}: use none or auto")
    if cfg.route == "auto":
        provenance(cfg, weights)  # checks that a classifier is there to route by
    _check_out(cfg, outputs)
    previous = outputs.read_run()
    if previous and not cfg.overwrite and not _same_provenance(previous.get("provenance", {}),
                                                               provenance(cfg, weights)):
        raise RunError(f"{cfg.out}: holds results of another model or other parameters; "
                       f"use another OUT or --overwrite")
    return man, outputs, weights


def run(cfg: SegmentConfig, progress: Callable[[dict[str, Any], int, int], None] | None = None,
        planned: tuple[manifest_mod.Manifest, store.Outputs, dict[str, models.Weights]] | None = None
        ) -> RunSummary:
    """Segment every field of the plate not already done in OUT; returns the summary.

    The run holds OUT's lease (:func:`livecell_ray.store.acquire`) from before it reads what OUT holds
    until after it writes run.json, so two runs into one OUT take turns (``wait_for_lease``) or the
    second stops with a clear message; never both extending the plate's layout at once.
    """
    t0 = time.time()
    early, early_weights = ([], None) if planned else _early_replicas(cfg)
    try:
        man, outputs, weights = planned or plan(cfg, early_weights)
        try:
            lease = store.acquire(outputs, cfg.lease_ttl_s, cfg.wait_for_lease,
                                  on_wait=lambda msg: print(f"{msg} (--wait)", file=sys.stderr, flush=True))
        except store.LeaseBusy as exc:
            raise RunError(str(exc)) from None
        try:
            return _run_held(cfg, progress, man, outputs, weights, lease, t0, early)
        except store.LeaseLost as exc:
            raise RunError(str(exc)) from None
        finally:
            lease.release()
    finally:
        _stop(early)  # those the run did not use (nothing to do, or it stopped before its shards)


def _early_replicas(cfg: SegmentConfig) -> tuple[list[Any], dict[str, models.Weights] | None]:
    """On a Ray that is there already (a cluster's address, a Ray job, a notebook's session), the model replicas
    start before the plan is made, so that their start-up (a process, torch's import, the weights, CUDA)
    overlaps the manifest and OUT's checks. A local Ray is started only once the plan holds, so that a plate's
    errors come in a second rather than after Ray's own start; its replicas start as before. Returns the
    replicas and the weights they hold (the plan's, which it then need not resolve and verify again)."""
    import ray

    if not (ray.is_initialized() or cfg.address or os.environ.get("RAY_ADDRESS")):
        return [], None
    try:
        weights = models.resolve_map(cfg.model, cfg.trust_weights)
    except models.WeightsError:
        return [], None  # the plan stops with the reason
    init_ray(cfg)
    return start_replicas(cfg, weights), weights


def _stop(replicas: list[Any]) -> None:
    """Kill model replicas (their processes too), those already gone included."""
    import ray

    for r in replicas:
        try:
            ray.kill(r, no_restart=True)
        except Exception:  # noqa: BLE001 - gone with its node, or Ray shut down: nothing left to stop
            pass


def _run_held(cfg: SegmentConfig, progress: Callable[[dict[str, Any], int, int], None] | None,
              man: manifest_mod.Manifest, outputs: store.Outputs, weights: dict[str, models.Weights],
              lease: store.Lease, t0: float, replicas: list[Any]) -> RunSummary:
    """The run, once OUT's lease is held; ``replicas``: model replicas started for it already, if any."""
    import ray

    from livecell_ray import manifest as manifest_mod

    started = datetime.now(timezone.utc).isoformat()
    prov = provenance(cfg, weights)
    previous = outputs.read_run()
    if previous and not cfg.overwrite and not _same_provenance(previous.get("provenance", {}), prov):
        # Another run finished here while this one waited for the lease (plan() saw OUT before it).
        raise RunError(f"{cfg.out}: holds results of another model or other parameters; "
                       f"use another OUT or --overwrite")
    if previous and not _same_provenance(previous.get("provenance", {}), prov):  # --overwrite
        for sub in ("masks", "cells", "fields", "failures", "run.json"):
            p = store.join(outputs.root, sub)
            if outputs.fs.exists(p):
                outputs.fs.rm(p, recursive=True)
        previous = None
    outputs.clean_temporary()
    # Sites and time indices around what OUT already holds: a plate imaged since the last run grows.
    known = store.retry(store.read_layouts, outputs, man.fields["plate"].unique())
    fields, layouts = manifest_mod.apply_layout(man.fields, known)
    man = manifest_mod.Manifest(fields, man.unmatched)
    done = outputs.done_field_ids()
    failed = outputs.failure_keys()  # one listing: stale rows go, the fields to redo are marked from it
    # Fields done since they failed (their rows' removal itself failed).
    outputs.remove_many([outputs.table_path("failures", None, None, key) for key in failed & done])
    todo = man.fields[~man.fields["field_id"].isin(done)]
    summary = RunSummary(out=outputs.url, fields_total=len(man.fields), fields_skipped=len(man.fields) - len(todo),
                         unmatched=len(man.unmatched))
    for path in man.unmatched:
        key = "unmatched-" + manifest_mod.field_id(path, "", "", 0, 0.0)
        summary.failures.append(write_failure(outputs, key, path, "", "", "", "manifest",
                                              f"{path}: file name does not match the pattern"))
    meta = {"livecell_ray": __import__("json").dumps(prov)}
    lease.check()  # still this run's OUT before the plate's layout is extended
    plates = (outputs.url, cfg.storage_options, man.fields, cfg.pixel_size, prov, layouts)
    if not len(todo):
        write_plates(*plates)
    else:
        init_ray(cfg)
        # Files chosen by their names' channel are read whole: the reader is told no channel.
        stream_cfg = dataclasses.replace(cfg, channel=reader_channel(cfg, man))
        for res in _results(stream_cfg, todo, failed, outputs.url, weights, meta, summary.restarts, plates,
                            replicas):
            if lease.lost:  # the renewal found another run holding OUT: stop here (what is committed stands)
                raise store.LeaseLost(lease.lost)
            if summary.time_to_first_field is None:
                summary.time_to_first_field = time.time() - t0
            for stage in summary.stage_seconds:
                summary.stage_seconds[stage] += float(res.get(f"{stage}_s", 0.0))
            if res["status"] == "ok":
                summary.fields_done += 1
                summary.cells += int(res["n_cells"])
                summary.scale_assumed += not float(res.get("pixel_size", np.nan)) > 0
            else:
                summary.fields_failed += 1
                summary.failures.append({k: res[k] for k in ("path", "stage", "error")})
            if progress:
                progress(res, summary.fields_done + summary.fields_failed, len(todo))
    if cfg.compact:
        summary.compaction = _compact(cfg, outputs, todo)
    summary.seconds = time.time() - t0
    fields_now = len(outputs.done_field_ids())
    lease.check()
    outputs.write_run({
        "provenance": prov, "started": (previous or {}).get("started", started),
        "last_run": {"started": started, "ended": datetime.now(timezone.utc).isoformat(),
                     "seconds": round(summary.seconds, 3), "fields_processed": summary.fields_done,
                     "fields_failed": summary.fields_failed, "fields_skipped": summary.fields_skipped,
                     "cells": summary.cells, "time_to_first_field": summary.time_to_first_field,
                     "restarts": summary.restarts, "compaction": summary.compaction,
                     "fields_scale_assumed": summary.scale_assumed,
                     "stage_seconds": {k: round(v, 3) for k, v in summary.stage_seconds.items()}},
        "source": cfg.source, "fields_in_manifest": summary.fields_total, "fields_done": fields_now,
        "unmatched_files": len(man.unmatched),
        "execution": {"replicas": cfg.replicas, "batch_size": cfg.batch_size,
                      "gpus_per_replica": cfg.gpus_per_replica, "cpus_per_replica": cfg.cpus_per_replica,
                      "address": cfg.address, "ray": ray.__version__ if ray.is_initialized() else None},
    })
    return summary


def _compact(cfg: SegmentConfig, outputs: store.Outputs, todo: pd.DataFrame) -> dict[str, Any]:
    """Compact the wells this run wrote to (or left unfinished compactions in); never fails the run.

    The fields are committed already: a compaction that fails leaves them readable as they are, and
    the next run (or ``livecell-ray compact``) tries again.
    """
    from livecell_ray import compact

    t = time.time()
    wells = {(p, w) for p, w in zip(todo["plate"], todo["well"])}
    try:
        c = compact.compact(outputs.url, cfg.storage_options, only=sorted(wells))
    except Exception as exc:  # noqa: BLE001 - the run's results stand; say why and go on
        log.warning("compaction failed: %s", format_error(exc))
        return {"error": format_error(exc), "seconds": round(time.time() - t, 3)}
    for e in c.errors:
        log.warning("compaction: %s", e)
    return {"wells": c.wells, "wells_compacted": c.wells_compacted, "files_before": c.files_before,
            "files_after": c.files_after, "errors": c.errors, "seconds": round(time.time() - t, 3)}


def _results(cfg: SegmentConfig, todo: pd.DataFrame, failed: set[str], out: str, weights: dict[str, models.Weights],
             meta: dict[str, str], restarts: list[str], plates: tuple[Any, ...], started: list[Any]
             ) -> Iterator[dict[str, Any]]:
    """One summary per field, from shards run as Ray tasks beside the model replicas, watched for stalls.

    The plate metadata (``plates``: :func:`write_plates`' arguments) is written here, before any shard is
    submitted but after the replicas are started, so that their start-up (process, imports, network)
    overlaps it. At most ``in_flight`` shards are submitted at a time (each holds its fields in memory);
    the next is submitted as one finishes. ``restarts`` gets one line per execution thrown away because
    no shard finished for ``stall_timeout_s``; after ``stall_restarts`` of them the run stops with a
    RunError. What finished is kept, so the same command resumes. ``started``: replicas started before the
    plan (:func:`_early_replicas`), which the first execution uses rather than start its own.
    """
    import ray

    outputs = store.Outputs(out, cfg.storage_options)
    remaining = _shard_rows(todo, failed)
    cfg_ref = ray.put(cfg)
    task = ray.remote(num_cpus=SHARD_CPUS, **_recycle(cfg))(process_shard)
    while True:
        replicas = (started if not restarts else []) or start_replicas(cfg, weights)
        limit = in_flight(cfg, len(replicas))
        shards = _shards(remaining, cfg.batch_size, ramp=limit)
        pending: dict[Any, list[dict[str, Any]]] = {}
        finished: set[str] = set()
        next_shard, reason = 0, ""
        try:
            if not restarts:  # the first execution: while its replicas load
                write_plates(*plates)
                # Then the folders the shards' files go to (on a fresh plate, after its groups: the groups'
                # listing then finds no folders to walk; 0.6 instead of 0.75 s of CPU for 400 wells).
                store.make_folders(outputs, todo)
            while next_shard < len(shards) or pending:
                while next_shard < len(shards) and len(pending) < limit:
                    rows = shards[next_shard]
                    ref = task.remote(rows, replicas[next_shard % len(replicas)], cfg_ref, out, meta)
                    pending[ref] = rows
                    next_shard += 1
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=cfg.stall_timeout_s or None)
                if not ready:
                    reason = f"no field finished for {cfg.stall_timeout_s:g} s"
                    break
                for ref in ready:
                    rows = pending.pop(ref)
                    try:
                        summaries = ray.get(ref)
                    except ray.exceptions.RayActorError as exc:
                        # A replica that died past its restarts (or failed to load) fails every batch sent to
                        # it: stop with the reason rather than record the whole plate as failed.
                        raise RunError(f"{out}: a model replica stopped for good ({_root_cause(exc)}); the fields "
                                       f"finished are kept: run the same command again to resume") from None
                    except Exception as exc:  # the task's worker died past its retries, or Ray lost its result
                        summaries = [_lost(outputs, r, exc) for r in rows]
                    for res in summaries:
                        finished.add(res["field_id"])
                        yield res
            if not reason:
                return
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            _stop(replicas)  # a frozen replica too: its process is killed
        remaining = [r for r in remaining if r["field_id"] not in finished]
        restarts.append(f"{reason}; started again over the {len(remaining)} fields left")
        if len(restarts) > cfg.stall_restarts:
            n = len(restarts)
            raise RunError(f"{out}: the pipeline stopped making progress {n} time{'s' * (n > 1)} (last: {reason}); "
                           f"the fields finished are kept: run the same command again to resume, or raise "
                           f"stall_timeout_s")
        log.warning("%s: %s", out, restarts[-1])


# A shard task's CPU reservation: reading and measuring are single-threaded and light next to a model on the
# CPU, so fractional CPUs keep them running beside the replicas on a 2-CPU laptop; how many run at once is
# in_flight's bound, not the CPU count's.
SHARD_CPUS = 0.25
# A replica whose process (or node) dies comes back this many times; its batches in flight are retried.
REPLICA_RESTARTS = 8


def start_replicas(cfg: SegmentConfig, weights: dict[str, models.Weights]) -> list[Any]:
    """The model replicas (Ray actors); they load their networks while the first shards are read."""
    import ray

    classifier = models.resolve_classifier(cfg.classifier, cfg.trust_weights)
    actor = ray.remote(SegmentActor).options(
        num_cpus=cfg.cpus_per_replica, num_gpus=cfg.gpus_per_replica or None,
        resources=cfg.replica_resources or None, max_restarts=REPLICA_RESTARTS, max_task_retries=-1)
    return [actor.remote(weights, cfg.inference, classifier, cfg.route) for _ in range(cfg.replicas)]


def in_flight(cfg: SegmentConfig, replicas: int) -> int:
    """Shards submitted at once: io_tasks (by default the cluster's CPUs: each shard task is one CPU's work
    while it reads or measures), at least one more than the replicas so that each has a batch while
    another is measured, and no more than ``object_store_budget_mb`` holds at about 4 bytes a pixel of
    704x520 fields (normalised plane, labels, raw plane). More than the CPUs starts more worker
    processes than can run, each a second of start-up: 2.4 s more to the first field on 2 CPUs."""
    import ray

    io = cfg.io_tasks or max(1, int(ray.cluster_resources().get("CPU", 2)))
    by_memory = int(cfg.object_store_budget_mb * 2**20 // (cfg.batch_size * 704 * 520 * 4))
    return max(replicas + 1, min(io, by_memory))


def _recycle(cfg: SegmentConfig) -> dict[str, int]:
    """Replace a shard worker process after about ``io_worker_max_fields`` fields (max_calls counts tasks)."""
    n = cfg.io_worker_max_fields
    return {"max_calls": max(1, n // cfg.batch_size)} if n else {}


def _shards(rows: list[dict[str, Any]], batch: int, ramp: int) -> list[list[dict[str, Any]]]:
    """Shards of ``batch`` fields, but the first ``ramp`` of them (those submitted at the start) and the
    last fields (``ramp`` full shards' worth) in shards of a quarter of that (at least 4 fields): the
    first fields come out sooner, and the run does not end on one full shard while the other workers
    have nothing left.
    """
    small = min(batch, max(4, batch // 4))
    head = min(len(rows), small * ramp)
    tail = max(head, len(rows) - batch * ramp)
    cut = [(i, min(i + small, head)) for i in range(0, head, small)]
    cut += [(i, min(i + batch, tail)) for i in range(head, tail, batch)]
    cut += [(i, min(i + small, len(rows))) for i in range(tail, len(rows), small)]
    return [rows[i:j] for i, j in cut]


def _shard_rows(todo: pd.DataFrame, failed: set[str]) -> list[dict[str, Any]]:
    """The manifest rows to do, as plain dicts for the shard tasks; ``failed``: the keys in failures/."""
    rows = todo.to_dict("records")
    for r in rows:
        r["column"] = int(r["column"])
        r["crop"] = int(r["crop"])
        r["failed_before"] = r["field_id"] in failed
    return rows


def _root_cause(exc: BaseException) -> str:
    """The last line of the innermost error Ray wraps (an actor's traceback ends with its exception)."""
    import re

    inner = getattr(exc, "cause", None) or exc
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(inner).splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else type(inner).__name__


def _lost(outputs: store.Outputs, row: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    """A field whose shard task could not finish (its worker died past its retries): its failures/ row and
    summary, so that the rest of the plate goes on and a rerun tries it again."""
    error = f"{row['path']}: its task could not finish ({format_error(exc)})"
    write_failure(outputs, str(row["field_id"]), str(row["path"]), str(row["field_id"]), str(row["plate"]),
                  str(row["well"]), "worker", error)
    return {"field_id": str(row["field_id"]), "path": str(row["path"]), "status": "failed", "n_cells": 0,
            "stage": "worker", "error": error}


def format_error(exc: BaseException) -> str:
    """One line for the CLI."""
    return str(exc).splitlines()[0] if str(exc) else "".join(traceback.format_exception_only(exc)).strip()
