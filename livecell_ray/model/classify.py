"""Cell-type classification of whole fields, as a segmentation run applies it (classify-then-segment).

A YOLOv8-cls network (:mod:`livecell_ray.training.classifier` trains it) gives a field's type as the mean of
its grid crops' class probabilities, so one odd region does not decide it.
"""

from __future__ import annotations

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
    """A trained YOLOv8-cls model applied to whole fields (mean of grid-crop probabilities)."""

    def __init__(self, weights: str | Any, crop: int = 256):
        """``weights``: verified :class:`livecell_ray.model.models.Weights` (checked again where loaded), or a path."""
        from livecell_ray.model import models

        if isinstance(weights, str):
            weights = models.Weights(Path(weights).stem, weights, models.sha256(weights))
        self.model = models.load(weights, task="classify")
        self.names = [self.model.names[i] for i in sorted(self.model.names)]
        self.crop = crop

    def __call__(self, images: list[np.ndarray]) -> list[tuple[str, float, np.ndarray]]:
        """(type, its probability, every type's probability) for each normalised uint8 field."""
        out = []
        for img in images:
            crops = [np.repeat(c[..., None], 3, axis=2) for c in grid_crops(img, self.crop)]
            res = self.model.predict(crops, verbose=False, device="cpu")
            probs = np.mean([r.probs.data.float().cpu().numpy() for r in res], axis=0)
            k = int(np.argmax(probs))
            out.append((self.names[k], float(probs[k]), probs))
        return out
