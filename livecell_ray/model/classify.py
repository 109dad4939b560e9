"""Cell-type classification of whole fields, as a segmentation run applies it (classify-then-segment).

The shipped classifier (``weights/celltype.json``, :mod:`livecell_ray.training.classifier` fits it) is a
calibrated logistic regression over what the general segmentation model sees in a field: its network's
activations and the distributions of the cells it finds. Routing (:mod:`livecell_ray.model.route`) then
pools a well's fields. The first version, a YOLOv8-cls network on grid crops (``.pt``), still loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def grid_crops(image: np.ndarray, size: int) -> list[np.ndarray]:
    """Non-overlapping crops covering the field (the last row and column flush with its edges)."""
    h, w = image.shape
    size = min(size, h, w)
    ys = sorted({min(y, h - size) for y in range(0, h, size)})
    xs = sorted({min(x, w - size) for x in range(0, w, size)})
    return [image[y:y + size, x:x + size] for y in ys for x in xs]


class FieldClassifier:
    """A field's cell type from its pixels: the features head (``celltype.json``, :class:`Head` over
    :class:`FieldFeatures` of the general model) or a YOLOv8-cls network (``.pt``: mean of grid-crop
    probabilities, the first version)."""

    def __init__(self, weights: str | Any, crop: int = 256, segmenter: Any = None):
        """``weights``: verified :class:`livecell_ray.model.models.Weights` (checked again where loaded), or a
        path; ``segmenter``: a replica's, whose general network the features classifier shares when it is the
        same model."""
        from livecell_ray.model import models

        if isinstance(weights, str):
            weights = models.Weights(Path(weights).stem, weights, models.sha256(weights))
        self.head: Head | None = None
        self.abstain_below = 0.0
        if str(weights.path).endswith(".json"):
            spec = load_spec(weights)
            self.head = Head.from_json(spec["head"])
            self.names = list(self.head.classes)
            self.abstain_below = float(spec.get("abstain_below", 0.0))
            self.pixel_size = float(spec["features"].get("pixel_size_um", 0) or 0) or None
            self.features = FieldFeatures(models.resolve(spec["features"]["weights"]), segmenter=segmenter)
            if self.features.segmenter_sha != spec["features"]["sha256"]:
                raise models.WeightsError(f"{weights.path}: made from {spec['features']['weights']} with sha256 "
                                          f"{spec['features']['sha256'][:12]}..., but that model is now "
                                          f"{self.features.segmenter_sha[:12]}...: retrain the classifier")
            return
        self.model = models.load(weights, task="classify")
        self.names = [self.model.names[i] for i in sorted(self.model.names)]
        self.crop = crop

    def log_proba(self, images: list[np.ndarray], pixel_sizes: list[float | None] | None = None) -> np.ndarray:
        """Calibrated log-probabilities over :attr:`names`, one row a normalised uint8 field."""
        pixel_sizes = pixel_sizes or [None] * len(images)
        if self.head is not None:
            pxs = [px or self.pixel_size for px in pixel_sizes]
            found = self.features.segment(images, pxs)
            return self.from_cells(images, found, pxs)
        out = []
        for img in images:
            crops = [np.repeat(c[..., None], 3, axis=2) for c in grid_crops(img, self.crop)]
            res = self.model.predict(crops, verbose=False, device="cpu")
            probs = np.mean([r.probs.data.float().cpu().numpy() for r in res], axis=0)
            out.append(np.log(np.clip(probs, 1e-12, None)))
        return np.asarray(out)

    def from_cells(self, images: list[np.ndarray], found: list[Any], pixel_sizes: list[float | None]) -> np.ndarray:
        """:meth:`log_proba` from segmentations already made (``found``: each field's Instances)."""
        assert self.head is not None
        rows = [cell_features(img, r.labels, r.confidences, px or self.pixel_size)
                for img, r, px in zip(images, found, pixel_sizes)]
        return self.head.log_proba(np.asarray(rows))

    def __call__(self, images: list[np.ndarray], pixel_sizes: list[float | None] | None = None
                 ) -> list[tuple[str, float, np.ndarray]]:
        """(type, its probability, every type's probability) for each normalised uint8 field."""
        return self.named(self.log_proba(images, pixel_sizes))

    def named(self, logp: np.ndarray) -> list[tuple[str, float, np.ndarray]]:
        """(type, its probability, every type's probability) from rows of log-probabilities."""
        out = []
        for row in logp:
            k = int(np.argmax(row))
            out.append((self.names[k], float(np.exp(row[k])), np.exp(row)))
        return out


def load_spec(weights: Any) -> dict[str, Any]:
    """A features classifier's JSON, read once from the bytes whose checksum was verified."""
    import json

    from livecell_ray.model import models

    data = Path(weights.path).read_bytes()
    digest = __import__("hashlib").sha256(data).hexdigest()
    if weights.sha256 and digest != weights.sha256:
        raise models.WeightsError(f"{weights.path}: sha256 {digest[:12]}... is not the {weights.sha256[:12]}... "
                                  f"it had when the run started")
    spec = json.loads(data)
    if spec.get("kind") != "field-features":
        raise models.WeightsError(f"{weights.path}: not a livecell-ray field classifier (kind {spec.get('kind')!r})")
    return spec


#: Layers of the YOLOv8-seg network whose activations describe a field (backbone P3-P5, SPPF and the neck
#: outputs the segmentation head reads); each contributes its spatial mean and standard deviation.
EMBED_LAYERS = (4, 6, 8, 9, 15, 18, 21)
#: Quantiles of each cell measurement a field's distribution is summarised by.
CELL_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


class FieldFeatures:
    """What a field looks like to the general segmentation model: the size, shape and texture distributions of
    the cells it finds there (:func:`cell_features`) and, for research, its network's activations (mean and
    spread over the field; ``embed=True``).

    That model learnt LIVECell's cells from many fields, so what it finds carries morphology rather than one
    well's look (density, focus, illumination), which a classifier trained from scratch on a handful of wells
    memorises instead (issue 36: 0.43 accuracy on new wells; weights/logs/celltype/cv.json).
    """

    def __init__(self, weights: Any, inference: Any = None, embed: bool = False, segmenter: Any = None):
        """``weights``: a shipped name, a path or verified Weights; ``segmenter``: one that already holds that
        model as its general ('*') network, used rather than loading it again."""
        from livecell_ray.config import InferenceConfig
        from livecell_ray.model import models
        from livecell_ray.model.segment import Segmenter

        if isinstance(weights, str | Path):  # a shipped name, or a path (research, training)
            weights = models.resolve(str(weights), trust=Path(weights).suffix == ".pt")
        self.segmenter_sha = weights.sha256
        if segmenter is None or segmenter.sha256.get(models.DEFAULT_KEY) != weights.sha256:
            segmenter = Segmenter({models.DEFAULT_KEY: weights}, inference or InferenceConfig())
        self.segmenter = segmenter
        self._pooled: list[Any] = []
        self.embed = embed
        if embed:
            net, _ = self.segmenter.nets[models.DEFAULT_KEY]
            layers = net.model if hasattr(net, "model") else []
            for i in EMBED_LAYERS:
                if i < len(layers):
                    layers[i].register_forward_hook(self._hook)

    def _hook(self, module: Any, args: Any, output: Any) -> None:
        import torch

        x = output.float()
        self._pooled.append(torch.cat([x.mean((2, 3)), x.std((2, 3))], 1).cpu().numpy())

    def segment(self, images: list[np.ndarray], pixel_sizes: list[float | None]) -> list[Any]:
        """The general model's segmentation of fields, as ``segment`` would give it."""
        from livecell_ray.model import models

        return self.segmenter(images, [models.DEFAULT_KEY] * len(images), pixel_sizes)

    def cells(self, image: np.ndarray, pixel_size: float | None = None) -> np.ndarray:
        """One normalised uint8 field's cell features."""
        (inst,) = self.segment([image], [pixel_size])
        return cell_features(image, inst.labels, inst.confidences, pixel_size)

    def features(self, image: np.ndarray, pixel_size: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(network features, cell features) of one field; needs ``embed=True``."""
        self._pooled = []
        (inst,) = self.segment([image], [pixel_size])
        n = len(EMBED_LAYERS)
        passes = [np.concatenate(self._pooled[k:k + n], 1) for k in range(0, len(self._pooled), n)]
        embed = np.concatenate(passes, 0).mean(0)  # the tiles of a large field: their mean
        return embed.astype(np.float32), cell_features(image, inst.labels, inst.confidences, pixel_size)


def cell_features(image: np.ndarray, labels: np.ndarray, confidences: np.ndarray,
                  pixel_size: float | None = None) -> np.ndarray:
    """A field's cells as distributions: quantiles of log area (um^2), shape and intensity, with density (cells
    a mm^2), coverage and the model's confidence; fixed length whatever the number of cells (zeros for a field
    without). ``pixel_size``: the field's um/px (None: LIVECell's, :data:`LIVECELL_PIXEL_SIZE_UM`)."""
    from skimage.measure import regionprops_table

    from livecell_ray.config import LIVECELL_PIXEL_SIZE_UM

    px = pixel_size or LIVECELL_PIXEL_SIZE_UM
    px2 = px ** 2
    n_q = len(CELL_QUANTILES)
    n_cells = int(labels.max(initial=0))
    img = image.astype(np.float32)
    field = [np.log1p(n_cells / (labels.size * px2 / 1e6)), float((labels > 0).mean()), float(img.mean()),
             # edge strength a micrometre (as a LIVECell field's pixel has it)
             float(img.std()), float(np.abs(np.diff(img, axis=1)).mean()) * LIVECELL_PIXEL_SIZE_UM / px,
             float(np.mean(confidences)) if len(confidences) else 0.0]
    if n_cells == 0:
        return np.asarray(field + [0.0] * (6 * n_q), np.float32)
    t = regionprops_table(labels, img, properties=("area", "eccentricity", "solidity", "extent", "intensity_mean",
                                                   "intensity_std"))
    cols = [np.log(t["area"] * px2), t["eccentricity"], t["solidity"], t["extent"],
            t["intensity_mean"] / max(1.0, img.mean()), t["intensity_std"] / max(1.0, img.std())]
    q = [float(v) for c in cols for v in np.quantile(c, CELL_QUANTILES)]
    return np.asarray(field + q, np.float32)


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A field as another microscope, well or day might show it: gamma, contrast, offset, blur and noise."""
    from scipy.ndimage import gaussian_filter

    x = image.astype(np.float32) / 255.0
    x = np.clip(x, 0, 1) ** rng.uniform(0.7, 1.4)
    x = (x - x.mean()) * rng.uniform(0.7, 1.3) + x.mean() + rng.uniform(-0.08, 0.08)
    if rng.random() < 0.5:
        x = gaussian_filter(x, rng.uniform(0.3, 1.2))
    x = x + rng.normal(0, rng.uniform(0, 0.03), x.shape)
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)


@dataclass
class Head:
    """A multinomial logistic regression over standardised field features, stored as plain JSON (no pickle)."""

    classes: list[str]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray  # (classes, features)
    intercept: np.ndarray
    temperature: float = 1.0

    def log_proba(self, x: np.ndarray, temperature: float | None = None) -> np.ndarray:
        """Calibrated log-probabilities, one row a field."""
        z = ((np.atleast_2d(x) - self.mean) / self.scale) @ self.coef.T + self.intercept
        z = z / (temperature or self.temperature)
        return z - np.logaddexp.reduce(z, axis=1, keepdims=True)

    def to_json(self) -> dict[str, Any]:
        return {"classes": self.classes, "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "coef": self.coef.tolist(), "intercept": self.intercept.tolist(), "temperature": self.temperature}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Head:
        return cls(list(d["classes"]), np.asarray(d["mean"]), np.asarray(d["scale"]), np.asarray(d["coef"]),
                   np.asarray(d["intercept"]), float(d.get("temperature", 1.0)))
