"""The shard task: a shard of the manifest read and decoded, segmented by a model replica as one batch, then
measured and written (:mod:`livecell_ray.pipeline.finish`); a file too large to hold is streamed a tile row at a
time. Every stage catches its own errors and passes the field on marked failed."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from livecell_ray import store
from livecell_ray.config import NormalizeConfig, SegmentConfig
from livecell_ray.pipeline.cluster import format_error
from livecell_ray.pipeline.finish import field_summary, field_tables, finish_fields, write_failure
from livecell_ray.plate.imaging import ImageError, Planes, TooLarge, normalize, read_image_with_info
from livecell_ray.retry import one_line

if TYPE_CHECKING:  # the driver's: the shard workers never import pandas or the manifest (0.25 s of CPU each)

    pass

log = logging.getLogger(__name__)


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
        row["scale_from_metadata"] = scale_from_metadata(row, pixel_size)
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
        _mark_failed(row, "read", f"{row['path']}: {one_line(exc)}")
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


def scale_from_metadata(row: dict[str, Any], pixel_size: float | None) -> bool:
    """Whether a field's pixel size is its file's own claim (neither its manifest row nor --pixel-size gave
    one): such a scale far from the model's is refused rather than trusted (Segmenter.check_scale)."""
    return not float(row.get("pixel_size", np.nan)) > 0 and not pixel_size


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
            routed = all("routed_key" in f for f in ok)  # --route auto: the driver's decision for each well
            seg = ray.get(replica.segment.remote([f["image"] for f in ok], [str(f["cell_type"]) for f in ok],
                                                 [float(f["pixel_size"]) for f in ok], [str(f["path"]) for f in ok],
                                                 [bool(f["scale_from_metadata"]) for f in ok],
                                                 [str(f["routed_key"]) for f in ok] if routed else None))
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
            for k in ("labels", "class_ids", "confidences", "routed_to") + (
                    () if routed else ("cell_type_predicted", "cell_type_probability")):
                f[k] = seg[k][i]
    summaries = finish_fields(fields, out, cfg.storage_options, cfg.pixel_size, provenance_meta) if fields else []
    return summaries + [stream_field(f, replica, cfg, out, provenance_meta) for f in streamed]


#: The part of a streamed field its cell type is predicted from (a full Incucyte frame, from its centre).
TYPE_WINDOW = (1040, 1408)


def _type_window(reader: Any, to_u8: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    h, w = reader.shape
    y0, x0 = max(0, (h - TYPE_WINDOW[0]) // 2), max(0, (w - TYPE_WINDOW[1]) // 2)
    return to_u8(reader.window(y0, y0 + TYPE_WINDOW[0], x0, x0 + TYPE_WINDOW[1]))


def stream_window(row: dict[str, Any], cfg: SegmentConfig) -> tuple[np.ndarray, float]:
    """A streamed field's :data:`TYPE_WINDOW`, normalised as the field is, and its pixel size: what its type
    is predicted from."""
    from livecell_ray.pipeline import stream

    reader = stream.RowReader(row["path"], cfg.storage_options, field_planes(row, cfg.channel))
    try:
        return _type_window(reader, stream.normaliser(reader, cfg.normalize)), \
            field_pixel_size(row, cfg.pixel_size, reader.info.pixel_size)
    finally:
        reader.close()


def stream_field(row: dict[str, Any], replica: Any, cfg: SegmentConfig, out: str,
                 provenance_meta: dict[str, str]) -> dict[str, Any]:
    """A file too large to read whole (``stream_mb``), segmented, measured and written a tile row at a time
    (:mod:`livecell_ray.pipeline.stream`), then committed like any field; its summary. A failure names the file and
    ends in failures/ as any field's does."""
    import ray

    from livecell_ray.pipeline import stream

    t0 = time.perf_counter()
    outputs = store.Outputs(out, cfg.storage_options)
    summary = field_summary(row, ray.get_runtime_context().get_node_id())
    stage = "read"
    try:
        reader = stream.RowReader(row["path"], cfg.storage_options, field_planes(row, cfg.channel))
        try:
            px = field_pixel_size(row, cfg.pixel_size, reader.info.pixel_size)
            summary["pixel_size"] = px
            to_u8 = stream.normaliser(reader, cfg.normalize)
            h, w = reader.shape
            window = _type_window(reader, to_u8)
            summary["read_s"] = time.perf_counter() - t0
            stage = "segment"
            how = ray.get(replica.plan_field.remote(window, str(row["cell_type"]), float(px), (h, w),
                                                    scale_from_metadata(row, cfg.pixel_size), row.get("routed_key")))
            summary.update(model_node=how["model_node"], model_pid=how["model_pid"])
            image_path, write = store.stream_writer(outputs, str(row["plate"]), str(row["row"]), int(row["column"]),
                                                    str(row["site"]), int(row["t_index"]), int(row["n_timepoints"]),
                                                    (h, w), stream.CHUNK, reader.dtype)

            def submit(tiles: list[np.ndarray]) -> Callable[[], list[tuple]]:
                ref = replica.segment_tiles.remote(how["key"], tiles)
                return lambda: ray.get(ref)

            res = stream.segment_streamed(reader, submit, tuple(how["working"]), how["plan"],
                                          px if px > 0 else cfg.pixel_size, write, to_u8)
        finally:
            reader.close()
        stage = "write"
        row = {**row, "routed_to": how["routed_to"]}
        if "routed_key" not in row:
            row.update(cell_type_predicted=how["cell_type_predicted"],
                       cell_type_probability=how["cell_type_probability"])
        cells, field_row = field_tables(row, res.cells, res.stats)
        store.commit_tables(outputs, str(row["plate"]), str(row["well"]), summary["field_id"], cells, field_row,
                            provenance_meta, bool(row.get("failed_before")))
        summary["n_cells"] = int(res.stats["n_cells"])
        summary["shape"] = [h, w]
        summary["model_s"] = res.seconds.get("model", 0.0)
    except ray.exceptions.RayActorError:
        raise  # the replica is gone for good: the run stops, see _results
    except ImageError as exc:
        summary.update(status="failed", stage=stage, error=str(exc))
    except Exception as exc:
        if store.unwritable(exc):
            raise  # OUT's, not this field's: the run stops (see the driver's _results)
        summary.update(status="failed", stage=stage, error=f"{row['path']}: {one_line(exc)}")
    if summary["status"] != "ok":
        write_failure(outputs, summary["field_id"], summary["path"], summary["field_id"], str(row["plate"]),
                      str(row["well"]), summary["stage"], summary["error"], row.get("timepoint_h"))
    summary["finish_s"] = time.perf_counter() - t0 - summary["read_s"] - summary["model_s"]
    return summary
