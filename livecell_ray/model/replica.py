"""The model replica: a Ray actor that holds the network(s) and segments what the shard tasks send it.

A module of its own, importing nothing the actor does not use: a replica's process starts by importing
the module that defines its class, and every module imported there (pandas, pyarrow, zarr: 0.7 s of
CPU) would delay the first field, which waits for the replica (docs/performance.md).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from livecell_ray import offline
from livecell_ray.config import InferenceConfig
from livecell_ray.model import models

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

            self.classifier = FieldClassifier(classifier)
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()

    def segment(self, images: list[np.ndarray], cell_types: list[str], pixel_sizes: list[float],
                paths: list[str]) -> dict[str, Any]:
        """One model batch: a shard's readable fields. Returns, per field, its label image (uint16 when it
        fits), class ids and confidences as bytes, its predicted cell type and probability, and an error
        ("" when segmented); then where and how long (model_node, model_pid, model_s a field).
        """
        n = len(images)
        t0 = time.perf_counter()
        out: dict[str, Any] = {"labels": [np.zeros((0, 0), np.uint16)] * n, "class_ids": [b""] * n,
                               "confidences": [b""] * n, "cell_type_predicted": [""] * n,
                               "cell_type_probability": [float("nan")] * n, "error": [""] * n}
        try:
            types = list(cell_types)
            if self.classifier is not None:  # every field's type from its pixels, whatever the routing
                try:
                    for i, (t, prob, _) in enumerate(self.classifier(images)):
                        out["cell_type_predicted"][i], out["cell_type_probability"][i] = t, prob
                except Exception:
                    if self.route == "auto":
                        raise  # no type, no route: the batch fails with the reason
                    log.exception("field classifier failed; cell_type_predicted left empty")
                if self.route == "auto":
                    types = list(out["cell_type_predicted"])
            res = self.segmenter(images, types, [px if px > 0 else None for px in pixel_sizes])
            for i, r in enumerate(res):
                out["labels"][i], out["class_ids"][i], out["confidences"][i] = encode_instances(r)
        except Exception as exc:
            out["error"] = [f"{path}: model failed ({type(exc).__name__}: {exc})" for path in paths]
        out.update(model_node=self.node_id, model_pid=os.getpid(), model_s=(time.perf_counter() - t0) / max(1, n))
        return out


    def plan_field(self, window: np.ndarray, cell_type: str, pixel_size: float, shape: tuple[int, int]
                   ) -> dict[str, Any]:
        """How a streamed field is segmented (livecell_ray.pipeline.stream): its type predicted from ``window`` (a part
        of it, normalised), then its model, tile plan and scale (``Segmenter.tiling``)."""
        out: dict[str, Any] = {"cell_type_predicted": "", "cell_type_probability": float("nan"),
                               "model_node": self.node_id, "model_pid": os.getpid()}
        if self.classifier is not None:
            try:
                (t, prob, _), = self.classifier([window])
                out["cell_type_predicted"], out["cell_type_probability"] = t, prob
            except Exception:
                if self.route == "auto":
                    raise
                log.exception("field classifier failed; cell_type_predicted left empty")
            if self.route == "auto":
                cell_type = out["cell_type_predicted"]
        key, scale, working, plan = self.segmenter.tiling(cell_type, pixel_size if pixel_size > 0 else None, shape)
        out.update(key=key, scale=scale, working=working, plan=plan)
        return out

    def segment_tiles(self, key: str, tiles: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """One tile row of a streamed field at model ``key``'s working scale: each tile's labels (uint16 when
        they fit), confidences and class ids."""
        out = []
        for r in self.segmenter.tile_batch(key, tiles):
            labels, cls, conf = encode_instances(r)
            out.append((labels, np.frombuffer(conf, np.float32), np.frombuffer(cls, np.int16)))
        return out


def encode_instances(result: Instances) -> tuple[np.ndarray, bytes, bytes]:
    """A field's segmentation as it travels from the model replica to the measuring task.

    Labels go as uint16 when they fit (nearly always): half the object-store traffic of uint32.
    """
    small = result.labels.dtype == np.uint16 or result.labels.max(initial=0) < 2**16
    labels = result.labels.astype(np.uint16, copy=False) if small else result.labels
    return labels, result.class_ids.astype(np.int16).tobytes(), result.confidences.astype(np.float32).tobytes()
