"""Ray's start-up and the model replicas: a local Ray or a cluster's, the replica actors started (early where
Ray is up already) and stopped, and how many shards are in flight at once."""

from __future__ import annotations

import logging
import os
import signal
import traceback
from typing import Any

from livecell_ray import offline
from livecell_ray.config import SegmentConfig
from livecell_ray.model import models
from livecell_ray.model.replica import SegmentActor
from livecell_ray.retry import one_line

log = logging.getLogger(__name__)


# A shard task's CPU reservation: reading and measuring are single-threaded and light next to a model on the
# CPU, so fractional CPUs keep them running beside the replicas on a 2-CPU laptop; how many run at once is
# in_flight's bound, not the CPU count's.
SHARD_CPUS = 0.25


# A replica whose process (or node) dies comes back this many times; its batches in flight are retried.
REPLICA_RESTARTS = 8


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
        try:
            ray.init(address="local", num_cpus=cfg.num_cpus or os.cpu_count(), include_dashboard=False, **kwargs)
        except Exception as exc:  # a raylet or GCS that died while starting: say so, leave nothing behind
            session = stop_local_ray()
            raise RayDown(f"Ray could not start on this machine ({one_line(exc)}); its logs: {session or '/tmp/ray'}"
                          ) from None
        offline.quiet_ray_errors()


class RayDown(RuntimeError):
    """The local Ray's own processes (raylet, GCS) stopped: the run cannot go on, and what is left of that Ray
    is to be killed (:func:`stop_local_ray`) rather than left to Ray's reconnection timeouts and logs."""


#: The local Ray's processes without which nothing runs (a log monitor or a dashboard may go; these may not).
VITAL = frozenset({"raylet", "gcs_server"})


def ray_down() -> str:
    """'' while the local Ray this process started has its VITAL processes; else those that died (names).
    A Ray joined by address is not this process's to watch: ''."""
    import ray._private.worker as ray_worker

    node = getattr(ray_worker, "_global_node", None)
    if node is None or not getattr(node, "head", False):
        return ""
    try:
        return ", ".join(sorted({kind for kind, _ in node.dead_processes() if kind in VITAL}))
    except Exception:  # noqa: BLE001 - Ray shut down meanwhile: nothing to watch
        return ""


def stop_local_ray() -> str:
    """Kill every process of the local Ray this process started: its descendants that are Ray's, and those
    its raylet started (agents, workers: they outlive a killed raylet, no longer this process's
    descendants), found by the session folder on their command lines. Returns that folder ('' if none).
    Nothing of a Ray joined by address is touched."""
    import psutil
    import ray
    import ray._private.worker as ray_worker

    node = getattr(ray_worker, "_global_node", None)
    if node is not None and not getattr(node, "head", False):
        return ""
    session = node.get_session_dir_path() if node is not None else ""
    raylets = {str(pi.process.pid) for pi in (node.all_processes.get("raylet", []) if node is not None else [])}
    package = os.path.dirname(ray.__file__)
    me = psutil.Process()
    ours = {p.pid for p in me.children(recursive=True)}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if proc.pid == me.pid or not (package in cmd or cmd.startswith("ray::")):
                continue
            # Workers name themselves ray::...; a dead raylet's are known by the raylet they were started by.
            if (proc.pid in ours or (session and session in cmd)
                    or proc.environ().get("RAY_RAYLET_PID") in raylets):
                os.kill(proc.pid, signal.SIGKILL)
        except (psutil.Error, OSError):
            pass
    return session


def start_replicas(cfg: SegmentConfig, weights: dict[str, models.Weights]) -> list[Any]:
    """The model replicas (Ray actors); they load their networks while the first shards are read."""
    import ray

    classifier = models.resolve_classifier(cfg.classifier, cfg.trust_weights)
    actor = ray.remote(SegmentActor).options(
        num_cpus=cfg.cpus_per_replica, num_gpus=cfg.gpus_per_replica or None,
        resources=cfg.replica_resources or None, max_restarts=REPLICA_RESTARTS, max_task_retries=-1)
    return [actor.remote(weights, cfg.inference, classifier, cfg.route) for _ in range(cfg.replicas)]


def early_replicas(cfg: SegmentConfig) -> tuple[list[Any], dict[str, models.Weights] | None]:
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


def stop_replicas(replicas: list[Any]) -> None:
    """Kill model replicas (their processes too), those already gone included."""
    import ray

    if ray_down():  # nothing answers: stop_local_ray kills what is left
        return
    for r in replicas:
        try:
            ray.kill(r, no_restart=True)
        except Exception:  # noqa: BLE001 - gone with its node, or Ray shut down: nothing left to stop
            pass


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


def recycle(cfg: SegmentConfig) -> dict[str, int]:
    """Replace a shard worker process after about ``io_worker_max_fields`` fields (max_calls counts tasks)."""
    n = cfg.io_worker_max_fields
    return {"max_calls": max(1, n // cfg.batch_size)} if n else {}


def root_cause(exc: BaseException) -> str:
    """The last line of the innermost error Ray wraps (an actor's traceback ends with its exception)."""
    import re

    inner = getattr(exc, "cause", None) or exc
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(inner).splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else type(inner).__name__


def format_error(exc: BaseException) -> str:
    """One line for the CLI."""
    return str(exc).splitlines()[0] if str(exc) else "".join(traceback.format_exception_only(exc)).strip()
