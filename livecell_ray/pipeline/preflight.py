"""What is checked before Ray starts, and what a run records: the plan (manifest, OUT, weights), the run's
provenance (the models and parameters a resume must match), its summary, and RunError."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import livecell_ray
from livecell_ray import store
from livecell_ray.config import SegmentConfig
from livecell_ray.model import models
from livecell_ray.pipeline import credentials
from livecell_ray.pipeline.cluster import format_error
from livecell_ray.pipeline.shard import field_planes
from livecell_ray.plate.imaging import ImageError, PlaneError, TooLarge, read_image_with_info

if TYPE_CHECKING:  # the driver's: the shard workers never import pandas or the manifest (0.25 s of CPU each)

    from livecell_ray.plate import manifest as manifest_mod

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
    damaged: list[str] = field(default_factory=list)  # committed fields found damaged, redone: path and reason
    # Fields segmented with no pixel size known (no --pixel-size, manifest column or file metadata): taken to be
    # at the model's scale, which the CLI's summary says.
    scale_assumed: int = 0
    # Of those, fields whose cells the model found few of, none confidently (config.SCALE_DOUBT_*): probably
    # imaged at another magnification; the first one's path.
    scale_doubtful: int = 0
    scale_doubtful_example: str = ""
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
            raise RunError("--route auto needs a field classifier: weights/celltype.json is not installed "
                           "and --classifier names none (train one with `livecell-ray train-classifier`)")
        used["classifier"] = clf
    # Each network's input size as it ran (a run that sets none takes the model's own from weights/models.json).
    sizes = {k: w.input_size(cfg.inference.imgsz) for k, w in weights.items()}
    # A model's own confidence threshold, where it has one and the run sets none (as earlier outputs: absent).
    confs = {k: w.conf for k, w in weights.items() if w.conf is not None and cfg.inference.conf is None}
    return {"package": "livecell-ray", "version": livecell_ray.__version__,
            "models": {k: {"path": w.path, "sha256": w.sha256, **({"imgsz": sizes[k]} if k in sizes else {}),
                           **({"conf": confs[k]} if k in confs else {})}
                       for k, w in used.items()},
            "parameters": cfg.provenance()}


def same_provenance(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return models_used(a) == models_used(b) and a.get("parameters") == b.get("parameters")


def models_used(prov: dict[str, Any]) -> dict[str, tuple]:
    """What of each model a resume must match: its file, input size and own confidence threshold."""
    return {k: (v["sha256"], v.get("imgsz"), v.get("conf")) for k, v in prov.get("models", {}).items()}


def reader_channel(cfg: SegmentConfig, man: manifest_mod.Manifest) -> str | None:
    """The plane a reader picks inside each file: --channel, unless it already chose the files by name."""
    return None if man.channel_from_names else cfg.channel


def plan(cfg: SegmentConfig, weights: dict[str, models.Weights] | None = None
         ) -> tuple[manifest_mod.Manifest, store.Outputs, dict[str, models.Weights]]:
    """Everything that can be checked before Ray starts: manifest, OUT, weights (``weights``: cfg.model's, when
    resolved already)."""
    from livecell_ray.plate import manifest as manifest_mod

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
    previous, _ = previous_run(cfg, outputs, provenance(cfg, weights))
    check_source(cfg, outputs, previous, list(man.fields["plate"].unique()))
    return man, outputs, weights


def previous_run(cfg: SegmentConfig, outputs: store.Outputs, prov: dict[str, Any]
                 ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """OUT's run.json (None: none, or unreadable) and the provenance its results were made with (None: no
    results). A run writes its provenance before its first field, so an interrupted run's OUT has it too;
    where run.json lacks it (unreadable, emptied, or written by a version that wrote it last), the committed
    fields' own metadata says. Results of another model or other parameters are refused unless --overwrite
    (which then replaces them)."""
    try:
        previous = outputs.read_run()
    except ValueError as exc:  # damaged: the fields' own metadata decides, and this run rewrites it
        log.warning("%s", exc)
        previous = None
    recorded = (previous or {}).get("provenance") or None
    if recorded is None:
        made = committed_provenance(outputs)
        if len(made) > 1 and not cfg.overwrite:
            raise RunError(f"{cfg.out}: its committed fields were made by {len(made)} different models or "
                           f"parameter sets; use another OUT or --overwrite")
        recorded = next(iter(made.values()), None)
    if recorded is not None and not cfg.overwrite and not same_provenance(recorded, prov):
        raise RunError(f"{cfg.out}: holds results of another model or other parameters; "
                       f"use another OUT or --overwrite")
    return previous, recorded


def check_source(cfg: SegmentConfig, outputs: store.Outputs, previous: dict[str, Any] | None,
                 plates: list[str]) -> None:
    """An OUT holds the plates of the sources that made it: a source bringing a plate the OUT does not hold,
    into an OUT that holds another source's plates, is refused unless --append (a second plate added by
    mistake would go unnoticed). New timepoints or fields of a plate the OUT holds, from another folder (a
    plate processed as it is imaged), are taken; run.json lists every source either way."""
    others = [s for s in sources(previous) if not same_source(s, cfg.source)]
    if not others or cfg.append or cfg.overwrite:
        return
    masks = store.join(outputs.root, "masks")
    held = {p.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr")
            for p in (outputs.fs.ls(masks, detail=False) if outputs.fs.exists(masks) else [])}
    new = sorted({str(p) for p in plates if store.safe(str(p)) not in held})
    if held and new:
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        raise RunError(f"{cfg.out}: holds plates of another source ({others[0]}{more}), and {cfg.source} brings "
                       f"plate {new[0]}{f' (and {len(new) - 1} more)' if len(new) > 1 else ''} it does not hold; "
                       f"give --append to add it (run.json then lists both sources), or use another OUT")


def sources(run: dict[str, Any] | None) -> list[str]:
    """Every source whose fields an OUT holds, as its run.json records them (``sources``; before output format
    0.3 only the last run's ``source``)."""
    run = run or {}
    return list(run.get("sources") or ([run["source"]] if run.get("source") else []))


def same_source(a: str, b: str) -> bool:
    """Whether two source URLs name one plate: local paths compared resolved (``plate`` and ``./plate/``)."""
    import os

    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def committed_provenance(outputs: store.Outputs) -> dict[str, dict[str, Any]]:
    """Each distinct provenance the committed fields/ files were written with (their Parquet metadata)."""
    import json

    import pyarrow.parquet as pq

    found: dict[str, dict[str, Any]] = {}
    for path in outputs.committed().fields:
        try:
            with outputs.fs.open(path, "rb") as f:
                meta = pq.read_schema(f).metadata or {}
        except Exception as exc:  # noqa: BLE001 - a damaged file is verify's to name; it proves nothing here
            log.warning("%s: unreadable (%s)", path, format_error(exc))
            continue
        text = meta.get(b"livecell_ray")
        if text:
            prov = json.loads(text)
            key = json.dumps(models_used(prov), sort_keys=True) + json.dumps(prov.get("parameters"), sort_keys=True)
            found.setdefault(key, prov)
    return found
