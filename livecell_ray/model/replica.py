"""The model replica: a Ray actor that holds the network(s) and segments what the shard tasks send it.

A module of its own, importing nothing the actor does not use: a replica's process starts by importing
the module that defines its class, and every module imported there (pandas, pyarrow, zarr: 0.7 s of
CPU) would delay the first field, which waits for the replica (docs/performance.md).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from livecell_ray import offline
from livecell_ray.config import InferenceConfig
from livecell_ray.model import models
from livecell_ray.retry import one_line

if TYPE_CHECKING:  # segment imports torch, which the reading and measuring workers never need
    from livecell_ray.model.segment import Instances

log = logging.getLogger(__name__)


class SegmentActor:
    """One model replica: loads the network(s) once, then segments batches of fields."""

    def __init__(self, weights: dict[str, models.Weights], inference: InferenceConfig,
                 classifier: models.Weights | None = None, route: str = "none"):
        offline.configure()
        import torch

        # Ray gives an actor as many intra-op threads as CPUs it reserved (--cpus-per-replica); an
        # explicit LIVECELL_RAY_TORCH_THREADS overrides that for CPU inference.
        threads = os.environ.get("LIVECELL_RAY_TORCH_THREADS")
        if threads and not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(threads)))
        from livecell_ray.model.segment import Segmenter

        self.segmenter = Segmenter(weights, inference)
        self.route = route
        self.classifier = None
        if classifier is not None:
            from livecell_ray.model.classify import FieldClassifier

            self.classifier = FieldClassifier(classifier, segmenter=self.segmenter)
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()

    def classify(self, images: list[np.ndarray], pixel_sizes: list[float], paths: list[str]) -> dict[str, Any]:
        """Each field's calibrated log-probabilities over the classifier's types (None where it failed, with
        the reason in ``error``): the routing pass of ``--route auto`` (:mod:`livecell_ray.model.route`)."""
        n = len(images)
        errors = [""] * n
        px = [p if p > 0 else None for p in pixel_sizes]
        assert self.classifier is not None, "classify needs a classifier"
        done = isolated(lambda idx: list(self.classifier.log_proba([images[i] for i in idx], [px[i] for i in idx])),
                        list(range(n)), paths, errors, "field classifier")
        return {"classes": list(self.classifier.names), "abstain_below": self.classifier.abstain_below,
                "logp": [done[i].tolist() if i in done else None for i in range(n)], "error": errors}

    def segment(self, images: list[np.ndarray], cell_types: list[str], pixel_sizes: list[float],
                paths: list[str], from_metadata: list[bool] | None = None,
                routes: list[str] | None = None) -> dict[str, Any]:
        """One model batch: a shard's readable fields. Returns, per field, its label image (uint16 when it
        fits), class ids and confidences as bytes, its predicted cell type and probability, the model that
        segmented it (``routed_to``), and an error ("" when segmented); then where and how long (model_node,
        model_pid, model_s a field).

        ``routes``: each field's model key as ``--route auto`` decided it for its well (the driver's routing
        pass); without them a field goes to its name's type's model, and the classifier, when there is one,
        says what the field's cells look like from the cells found (no second pass of the model).

        A field's failure is its own: one whose scale is beyond reason (``from_metadata``: its pixel size is
        the file's own claim, :meth:`Segmenter.check_scale`) is refused before the batch, and a batch that
        raises is run again field by field, so that only the fields that fail alone are marked failed.
        """
        n = len(images)
        t0 = time.perf_counter()
        out: dict[str, Any] = {"labels": [np.zeros((0, 0), np.uint16)] * n, "class_ids": [b""] * n,
                               "confidences": [b""] * n, "cell_type_predicted": [""] * n,
                               "cell_type_probability": [float("nan")] * n, "routed_to": [""] * n,
                               "error": [""] * n}
        errors = out["error"]
        px = [p if p > 0 else None for p in pixel_sizes]
        from_metadata = list(from_metadata or [False] * n)
        todo = list(range(n))
        types = list(routes) if routes is not None else list(cell_types)
        predict = self.classifier is not None and routes is None
        if predict and self.classifier.head is None:  # a YOLOv8-cls network: from the pixels, before
            failed: list[str] = [""] * n
            predicted = isolated(lambda idx: self.classifier([images[i] for i in idx]), todo, paths, failed,
                                 "field classifier")
            for i, (t, prob, _) in predicted.items():
                out["cell_type_predicted"][i], out["cell_type_probability"][i] = t, prob
            if any(failed):
                log.warning("field classifier failed; cell_type_predicted left empty: %s",
                            "; ".join(e for e in failed if e))
        from livecell_ray.model.segment import ScaleError

        for i in list(todo):
            try:
                self.segmenter.check_scale(types[i], px[i], images[i].shape, from_metadata[i])
            except ScaleError as exc:
                errors[i] = f"{paths[i]}: {exc}"
                todo.remove(i)
        done = isolated(lambda idx: self.segmenter([images[i] for i in idx], [types[i] for i in idx],
                                                   [px[i] for i in idx]), todo, paths, errors, "model")
        for i, r in done.items():
            out["labels"][i], out["class_ids"][i], out["confidences"][i] = encode_instances(r)
            out["routed_to"][i] = self.segmenter.name(types[i])
        if predict and self.classifier.head is not None and done:  # from the cells just found
            idx = sorted(done)
            try:
                logp = self.classifier.from_cells([images[i] for i in idx], [done[i] for i in idx],
                                                  [px[i] for i in idx])
                for i, (t, prob, _) in zip(idx, self.classifier.named(logp)):
                    out["cell_type_predicted"][i], out["cell_type_probability"][i] = t, prob
            except Exception:  # noqa: BLE001 - the segmentation stands; the prediction is left empty
                log.exception("field classifier failed; cell_type_predicted left empty")
        out.update(model_node=self.node_id, model_pid=os.getpid(), model_s=(time.perf_counter() - t0) / max(1, n))
        return out

    def plan_field(self, window: np.ndarray, cell_type: str, pixel_size: float, shape: tuple[int, int],
                   from_metadata: bool = False, route: str | None = None) -> dict[str, Any]:
        """How a streamed field is segmented (livecell_ray.pipeline.stream): its type predicted from ``window`` (a part
        of it, normalised), then its model, tile plan and scale (``Segmenter.tiling``). ``route``: its model key
        as ``--route auto`` decided it (the prediction is then the routing pass's)."""
        out: dict[str, Any] = {"cell_type_predicted": "", "cell_type_probability": float("nan"),
                               "model_node": self.node_id, "model_pid": os.getpid()}
        px = pixel_size if pixel_size > 0 else None
        if route is not None:
            cell_type = route
        elif self.classifier is not None:
            try:
                (t, prob, _), = self.classifier([window], [px])
                out["cell_type_predicted"], out["cell_type_probability"] = t, prob
            except Exception:
                log.exception("field classifier failed; cell_type_predicted left empty")
        self.segmenter.check_scale(cell_type, px, shape, from_metadata)
        key, scale, working, plan = self.segmenter.tiling(cell_type, px, shape)
        out.update(key=key, scale=scale, working=working, plan=plan, routed_to=self.segmenter.name(cell_type))
        return out

    def segment_tiles(self, key: str, tiles: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """One tile row of a streamed field at model ``key``'s working scale: each tile's labels (uint16 when
        they fit), confidences and class ids."""
        out = []
        for r in self.segmenter.tile_batch(key, tiles):
            labels, cls, conf = encode_instances(r)
            out.append((labels, np.frombuffer(conf, np.float32), np.frombuffer(cls, np.int16)))
        return out


def isolated(run: Callable[[list[int]], list[Any]], idx: list[int], paths: list[str], errors: list[str],
             what: str) -> dict[int, Any]:
    """``run`` over the fields ``idx`` as one batch ({field: its result}); when the batch raises, each field
    alone, so that one field's fault (its size, its scale, its pixels) never fails its neighbours. A field
    that fails alone gets its one-line reason in ``errors``."""
    if not idx:
        return {}
    try:
        return dict(zip(idx, run(idx)))
    except Exception as exc:  # noqa: BLE001 - which field is to blame is found below
        if len(idx) == 1:
            errors[idx[0]] = f"{paths[idx[0]]}: {what} failed ({one_line(exc)})"
            return {}
    out = {}
    for i in idx:
        try:
            out[i] = run([i])[0]
        except Exception as exc:  # noqa: BLE001 - this field's own failure, recorded as such
            errors[i] = f"{paths[i]}: {what} failed ({one_line(exc)})"
    return out


def encode_instances(result: Instances) -> tuple[np.ndarray, bytes, bytes]:
    """A field's segmentation as it travels from the model replica to the measuring task.

    Labels go as uint16 when they fit (nearly always): half the object-store traffic of uint32.
    """
    small = result.labels.dtype == np.uint16 or result.labels.max(initial=0) < 2**16
    labels = result.labels.astype(np.uint16, copy=False) if small else result.labels
    return labels, result.class_ids.astype(np.int16).tobytes(), result.confidences.astype(np.float32).tobytes()
