"""The driver's loop: OUT's lease, what is done already, the shards submitted beside the replicas and bounded
in flight, the stall watchdog that throws a stuck execution away, compaction and run.json."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

from livecell_ray import store
from livecell_ray.config import SegmentConfig
from livecell_ray.model import models
from livecell_ray.pipeline.cluster import (
    SHARD_CPUS,
    RayDown,
    early_replicas,
    format_error,
    in_flight,
    init_ray,
    ray_down,
    recycle,
    root_cause,
    start_replicas,
    stop_replicas,
)
from livecell_ray.pipeline.finish import refuse_mixed_shapes, write_failure, write_plates
from livecell_ray.pipeline.preflight import (
    RunError,
    RunSummary,
    plan,
    previous_run,
    provenance,
    reader_channel,
    same_provenance,
    same_source,
    sources,
)
from livecell_ray.pipeline.routing import route_rows
from livecell_ray.pipeline.shard import process_shard

if TYPE_CHECKING:  # the driver's: the shard workers never import pandas or the manifest (0.25 s of CPU each)
    import pandas as pd

    from livecell_ray.plate import manifest as manifest_mod

log = logging.getLogger(__name__)


def run(cfg: SegmentConfig, progress: Callable[[dict[str, Any], int, int], None] | None = None,
        planned: tuple[manifest_mod.Manifest, store.Outputs, dict[str, models.Weights]] | None = None
        ) -> RunSummary:
    """Segment every field of the plate not already done in OUT; returns the summary.

    The run holds OUT's lease (:func:`livecell_ray.store.acquire`) from before it reads what OUT holds
    until after it writes run.json, so two runs into one OUT take turns (``wait_for_lease``) or the
    second stops with a clear message; never both extending the plate's layout at once.
    """
    t0 = time.time()
    early, early_weights = ([], None) if planned else early_replicas(cfg)
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
    except OSError as exc:  # OUT full or read-only, met by the driver (run.json, the plate's metadata, ...)
        if not store.unwritable(exc):
            raise
        raise RunError(store.unwritable_message(cfg.out, exc)) from None
    finally:
        stop_replicas(early)  # those the run did not use (nothing to do, or it stopped before its shards)


def _run_held(cfg: SegmentConfig, progress: Callable[[dict[str, Any], int, int], None] | None,
              man: manifest_mod.Manifest, outputs: store.Outputs, weights: dict[str, models.Weights],
              lease: store.Lease, t0: float, replicas: list[Any]) -> RunSummary:
    """The run, once OUT's lease is held; ``replicas``: model replicas started for it already, if any."""
    import ray

    from livecell_ray.plate import manifest as manifest_mod

    started = datetime.now(timezone.utc).isoformat()
    prov = provenance(cfg, weights)
    # Again under the lease: another run may have written here while this one waited for it.
    previous, recorded = previous_run(cfg, outputs, prov)
    if recorded is not None and not same_provenance(recorded, prov):  # --overwrite
        for sub in ("masks", "cells", "fields", "failures", "run.json"):
            p = store.join(outputs.root, sub)
            if outputs.fs.exists(p):
                outputs.fs.rm(p, recursive=True)
        previous = None
    outputs.clean_temporary()
    # Provenance before the first field: a run stopped after its first commit still says what made it.
    every_source = [s for s in sources(previous) if not same_source(s, cfg.source)] + [cfg.source]
    outputs.write_run({**(previous or {}), "provenance": prov, "started": (previous or {}).get("started", started),
                       "source": cfg.source, "sources": every_source})
    # Sites and time indices around what OUT already holds: a plate imaged since the last run grows.
    known = store.retry(store.read_layouts, outputs, man.fields["plate"].unique())
    fields, layouts = manifest_mod.apply_layout(man.fields, known)
    man = manifest_mod.Manifest(fields, man.unmatched)
    damaged: list[str] = []
    done = _done(outputs, damaged)
    failed = outputs.failure_keys()  # one listing: stale rows go, the fields to redo are marked from it
    # Fields done since they failed (their rows' removal itself failed).
    outputs.remove_many([outputs.table_path("failures", None, None, key) for key in failed & done])
    todo = man.fields[~man.fields["field_id"].isin(done)]
    summary = RunSummary(out=outputs.url, fields_total=len(man.fields), fields_skipped=len(man.fields) - len(todo),
                         unmatched=len(man.unmatched), damaged=damaged)
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
        committed: list[dict[str, Any]] = []
        for res in _results(stream_cfg, todo, failed, outputs.url, weights, meta, summary.restarts, plates,
                            replicas):
            if lease.lost:  # the renewal found another run holding OUT: stop here (what is committed stands)
                raise store.LeaseLost(lease.lost)
            if summary.time_to_first_field is None:
                summary.time_to_first_field = time.time() - t0
            for stage in summary.stage_seconds:
                summary.stage_seconds[stage] += float(res.get(f"{stage}_s", 0.0))
            if res["status"] == "ok":
                committed.append({k: res.get(k) for k in ("field_id", "path", "shape", "n_cells")})
                summary.fields_done += 1
                summary.cells += int(res["n_cells"])
                if not float(res.get("pixel_size", np.nan)) > 0:
                    summary.scale_assumed += 1
                    if doubtful_scale(res):
                        summary.scale_doubtful += 1
                        summary.scale_doubtful_example = summary.scale_doubtful_example or str(res["path"])
            else:
                summary.fields_failed += 1
                summary.failures.append({k: res[k] for k in ("path", "stage", "error")})
            if progress:
                progress(res, summary.fields_done + summary.fields_failed, len(todo))
        for res in refuse_mixed_shapes(outputs, todo, committed):
            summary.fields_done -= 1
            summary.cells -= int(res["n_cells"])
            summary.fields_failed += 1
            summary.failures.append({k: res[k] for k in ("path", "stage", "error")})
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
                     "fields_scale_doubtful": summary.scale_doubtful,
                     "stage_seconds": {k: round(v, 3) for k, v in summary.stage_seconds.items()}},
        "source": cfg.source, "sources": every_source, "fields_in_manifest": summary.fields_total,
        "fields_done": fields_now,
        "unmatched_files": len(man.unmatched),
        "execution": {"replicas": cfg.replicas, "batch_size": cfg.batch_size,
                      "gpus_per_replica": cfg.gpus_per_replica, "cpus_per_replica": cfg.cpus_per_replica,
                      "address": cfg.address, "ray": ray.__version__ if ray.is_initialized() else None},
    })
    return summary


def doubtful_scale(res: dict[str, Any]) -> bool:
    """Whether a field taken at the model's scale looks imaged at another: the model found cells, but few and
    none confidently (``config.SCALE_DOUBT_CONFIDENCE`` and ``SCALE_DOUBT_COVERAGE``). An empty field is not."""
    from livecell_ray.config import SCALE_DOUBT_CONFIDENCE, SCALE_DOUBT_COVERAGE

    conf = float(res.get("mean_confidence", np.nan))
    return (int(res.get("n_cells", 0)) > 0 and conf < SCALE_DOUBT_CONFIDENCE
            and float(res.get("coverage", 1.0)) < SCALE_DOUBT_COVERAGE)


def _compact(cfg: SegmentConfig, outputs: store.Outputs, todo: pd.DataFrame) -> dict[str, Any]:
    """Compact the wells this run wrote to (or left unfinished compactions in); never fails the run.

    The fields are committed already: a compaction that fails leaves them readable as they are, and
    the next run (or ``livecell-ray compact``) tries again.
    """
    from livecell_ray.store import compact

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
    plan (:func:`early_replicas`), which the first execution uses rather than start its own.
    """
    import ray

    outputs = store.Outputs(out, cfg.storage_options)
    remaining = _shard_rows(todo, failed)
    cfg_ref = ray.put(cfg)
    task = ray.remote(num_cpus=SHARD_CPUS, **recycle(cfg))(process_shard)
    while True:
        replicas = (started if not restarts else []) or start_replicas(cfg, weights)
        limit = in_flight(cfg, len(replicas))
        pending: dict[Any, list[dict[str, Any]]] = {}
        finished: set[str] = set()
        next_shard, reason = 0, ""
        try:
            if not restarts:  # the first execution: while its replicas load
                write_plates(*plates)
                # Then the folders the shards' files go to (on a fresh plate, after its groups: the groups'
                # listing then finds no folders to walk; 0.6 instead of 0.75 s of CPU for 400 wells).
                store.make_folders(outputs, todo)
            if cfg.route == "auto":  # each well's model, from all its fields, before any is segmented
                remaining = route_rows(remaining, replicas, cfg, out, weights)
            shards = cut_shards(remaining, cfg.batch_size, ramp=limit)
            while next_shard < len(shards) or pending:
                while next_shard < len(shards) and len(pending) < limit:
                    rows = shards[next_shard]
                    ref = task.remote(rows, replicas[next_shard % len(replicas)], cfg_ref, out, meta)
                    pending[ref] = rows
                    next_shard += 1
                ready = _wait(list(pending), cfg.stall_timeout_s, out)
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
                        raise RunError(f"{out}: a model replica stopped for good ({root_cause(exc)}); the fields "
                                       f"finished are kept: run the same command again to resume") from None
                    except Exception as exc:  # the task's worker died past its retries, or Ray lost its result
                        check_ray(out)
                        if store.unwritable(getattr(exc, "cause", None)):  # OUT full or read-only: stop here
                            raise RunError(store.unwritable_message(out, exc.cause)) from None
                        summaries = [_lost(outputs, r, exc) for r in rows]
                    for res in summaries:
                        finished.add(res["field_id"])
                        yield res
            if not reason:
                return
        finally:
            if not ray_down():  # a Ray whose raylet or GCS died answers nothing: stop_local_ray's to clean up
                for ref in pending:
                    ray.cancel(ref, force=True)
                stop_replicas(replicas)  # a frozen replica too: its process is killed
        remaining = [r for r in remaining if r["field_id"] not in finished]
        restarts.append(f"{reason}; started again over the {len(remaining)} fields left")
        if len(restarts) > cfg.stall_restarts:
            n = len(restarts)
            raise RunError(f"{out}: the pipeline stopped making progress {n} time{'s' * (n > 1)} (last: {reason}); "
                           f"the fields finished are kept: run the same command again to resume, or raise "
                           f"stall_timeout_s")
        log.warning("%s: %s", out, restarts[-1])


def _done(outputs: store.Outputs, damaged: list[str]) -> set[str]:
    """The committed fields a rerun skips: not those whose committed files are not whole (truncated,
    emptied): those are un-committed, so this run redoes them, and named in ``damaged``."""
    from livecell_ray.store import verify

    c = outputs.committed()
    bad = verify.unreadable_sources(outputs, c)
    if not bad:
        return c.done
    damaged.extend(bad.values())
    log.warning("%s: %d committed fields have damaged files, redone (first: %s)", outputs.url, len(bad),
                next(iter(bad.values())))
    verify.uncommit(outputs, sorted(bad))
    return c.done - {store.file_key(p) for p in bad}  # per-field sources: each one's key is its field_id


#: How often the driver, while it waits for shards, checks that the local Ray's own processes are alive.
WATCH_S = 1.0


def _wait(refs: list[Any], stall_timeout_s: float | None, out: str) -> list[Any]:
    """ray.wait for one of ``refs`` up to ``stall_timeout_s`` (None or 0: forever), in steps of WATCH_S so that
    a local Ray whose raylet or GCS died stops the run in a second (RayDown) instead of never answering."""
    import ray

    deadline = time.monotonic() + stall_timeout_s if stall_timeout_s else None
    while True:
        step = WATCH_S if deadline is None else max(0.0, min(WATCH_S, deadline - time.monotonic()))
        ready, _ = ray.wait(refs, num_returns=1, timeout=step)
        if ready:
            return ready
        check_ray(out)
        if deadline is not None and time.monotonic() >= deadline:
            return []


def check_ray(out: str) -> None:
    """Raise RayDown if the local Ray this run started lost one of its own processes."""
    dead = ray_down()
    if dead:
        raise RayDown(f"{out}: Ray's own processes on this machine stopped mid-run ({dead} killed or crashed); "
                      f"the fields finished are kept: run the same command again to resume")


def cut_shards(rows: list[dict[str, Any]], batch: int, ramp: int) -> list[list[dict[str, Any]]]:
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


def _lost(outputs: store.Outputs, row: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    """A field whose shard task could not finish (its worker died past its retries): its failures/ row and
    summary, so that the rest of the plate goes on and a rerun tries it again."""
    error = f"{row['path']}: its task could not finish ({format_error(exc)})"
    write_failure(outputs, str(row["field_id"]), str(row["path"]), str(row["field_id"]), str(row["plate"]),
                  str(row["well"]), "worker", error, row.get("timepoint_h"))
    return {"field_id": str(row["field_id"]), "path": str(row["path"]), "status": "failed", "n_cells": 0,
            "stage": "worker", "error": error}
