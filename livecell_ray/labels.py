"""Instances -> one uint32 label image per field, without dense full-resolution masks.

ultralytics' retina-mask path (``ops.process_mask_native``) upsamples every instance's prototype
mask to the whole image: O(N x H x W) for N cells, which dominates inference on dense fields. The
upsampling is separable and linear, so we precompute its row and column weight matrices once per
(input size, image size) by running ultralytics' own functions on basis vectors, then evaluate
each instance only inside its box: O(sum of box areas). The result equals the dense path.

Painting goes in descending confidence and only claims free pixels, so where instances overlap the
more confident one wins; labels are 1..K in that order and every label has pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class AxisWeights:
    """Row (h x mh) and column (w x mw) interpolation matrices and each row's non-zero span."""

    wy: np.ndarray
    wx: np.ndarray
    y_lo: np.ndarray
    y_hi: np.ndarray
    x_lo: np.ndarray
    x_hi: np.ndarray


@dataclass(frozen=True)
class Mirror:
    """A pass over the field's mirror image (test-time augmentation), matched to the field's instances.

    ``coeffs[i]`` are the mask coefficients of the mirrored pass's twin of instance ``i`` (meaningful
    where ``matched[i]``), over that pass's own prototypes; ``axis`` 1 mirrors left-right, 0 top-bottom.
    Where an instance has twins, its mask is the mean of the passes' logits, mirrored back.
    """

    protos: Any
    coeffs: Any
    matched: Any
    axis: int


def _dense_upsample(coeffs: torch.Tensor, mh: int, mw: int, shape: tuple[int, int]) -> torch.Tensor:
    """ultralytics' process_mask_native upsampling of (N, mh*mw) logits to (N, H, W), without threshold."""
    import torch.nn.functional as F
    from ultralytics.utils import ops

    h, w = shape
    gain = min(4 * mh / h, 4 * mw / w)
    pad = (4 * mh - max(round(h * gain), 1)) | (4 * mw - max(round(w * gain), 1))
    f = 4 // math.gcd(4, pad | pad // 2)
    c = coeffs.view(1, -1, mh, mw)
    c = F.interpolate(c, scale_factor=f, mode="bilinear") if f > 1 else c
    return ops.scale_masks(c, shape)[0]


def _span(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    nz = np.abs(w) > 1e-7
    lo = np.argmax(nz, axis=1)
    hi = w.shape[1] - np.argmax(nz[:, ::-1], axis=1)
    return lo.astype(np.int64), hi.astype(np.int64)


def axis_weights(proto_hw: tuple[int, int], shape: tuple[int, int]) -> AxisWeights:
    """Interpolation weights equal to ultralytics' dense upsampling, found by probing it.

    A prototype that is 1 on row k (constant along x) upsamples to column vector ``wy[:, k]``;
    likewise for columns. Probed in chunks to bound memory.
    """
    mh, mw = proto_hw
    h, w = shape
    wy = np.empty((h, mh), np.float32)
    for k0 in range(0, mh, 16):
        ks = range(k0, min(mh, k0 + 16))
        basis = torch.zeros((len(ks), mh, mw))
        for i, k in enumerate(ks):
            basis[i, k, :] = 1.0
        up = _dense_upsample(basis.view(len(ks), -1), mh, mw, shape)
        wy[:, k0:k0 + len(ks)] = up[:, :, w // 2].T.numpy()
    wx = np.empty((w, mw), np.float32)
    for k0 in range(0, mw, 16):
        ks = range(k0, min(mw, k0 + 16))
        basis = torch.zeros((len(ks), mh, mw))
        for i, k in enumerate(ks):
            basis[i, :, k] = 1.0
        up = _dense_upsample(basis.view(len(ks), -1), mh, mw, shape)
        wx[:, k0:k0 + len(ks)] = up[:, h // 2, :].T.numpy()
    y_lo, y_hi = _span(wy)
    x_lo, x_hi = _span(wx)
    return AxisWeights(wy, wx, y_lo, y_hi, x_lo, x_hi)


def box_pixels(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Integer pixel ranges [x0, y0, x1, y1) inside each xyxy box, as ultralytics' crop_mask keeps them."""
    h, w = shape
    b = np.ceil(np.asarray(boxes, np.float64)).astype(np.int64)
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
    return b


def _box_logits(protos: np.ndarray, coeff: np.ndarray, y0: int, y1: int, x0: int, x1: int,
                weights: AxisWeights) -> np.ndarray | None:
    """One instance's upsampled mask logits inside pixels [y0, y1) x [x0, x1); None if no prototype reaches."""
    py0, py1 = weights.y_lo[y0], weights.y_hi[y1 - 1]
    px0, px1 = weights.x_lo[x0], weights.x_hi[x1 - 1]
    if py1 <= py0 or px1 <= px0:
        return None
    c = protos.shape[0]
    logit = (coeff @ protos[:, py0:py1, px0:px1].reshape(c, -1)).reshape(py1 - py0, px1 - px0)
    return weights.wy[y0:y1, py0:py1] @ logit @ weights.wx[x0:x1, px0:px1].T


def paint(protos: np.ndarray, coeffs: np.ndarray, boxes: np.ndarray, conf: np.ndarray,
          shape: tuple[int, int], weights: AxisWeights, threshold: float = 0.5,
          mirrors: tuple[Mirror, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Label image (uint32) and, for labels 1..K, the index of the instance each came from.

    protos: (C, mh, mw) prototypes; coeffs: (N, C); boxes: (N, 4) xyxy in image pixels; conf: (N,).
    mirrors: passes over mirror images whose logits are averaged in (see :class:`Mirror`).
    """
    h, w = shape
    labels = np.zeros((h, w), np.uint32)
    if len(conf) == 0:
        return labels, np.zeros(0, np.int64)
    thr = math.log(threshold / (1 - threshold))
    order = np.argsort(-np.asarray(conf), kind="stable")
    pix = box_pixels(boxes, shape)
    kept = []
    nxt = 1
    for i in order:
        x0, y0, x1, y1 = pix[i]
        if x1 <= x0 or y1 <= y0:
            continue
        up = _box_logits(protos, coeffs[i], y0, y1, x0, x1, weights)
        if up is None:
            continue
        passes = 1
        for m in mirrors:
            if not m.matched[i]:
                continue
            # The same pixels in the mirror image, then mirrored back onto the field.
            box = (y0, y1, w - x1, w - x0) if m.axis == 1 else (h - y1, h - y0, x0, x1)
            twin = _box_logits(m.protos, m.coeffs[i], *box, weights)
            if twin is not None:
                up = up + np.flip(twin, axis=m.axis)
                passes += 1
        if passes > 1:
            up = up / passes  # the mean of the passes' logits
        region = labels[y0:y1, x0:x1]
        claim = (up > thr) & (region == 0)
        if claim.any():
            region[claim] = nxt
            kept.append(i)
            nxt += 1
    return labels, np.asarray(kept, np.int64)


def paint_dense(protos: torch.Tensor, coeffs: torch.Tensor, boxes: torch.Tensor, conf: np.ndarray,
                shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Reference: ultralytics' retina masks (process_mask_native), painted the same way."""
    from ultralytics.utils import ops

    h, w = shape
    labels = np.zeros((h, w), np.uint32)
    if len(conf) == 0:
        return labels, np.zeros(0, np.int64)
    masks = ops.process_mask_native(protos, coeffs, boxes, shape).numpy().astype(bool)
    kept, nxt = [], 1
    for i in np.argsort(-np.asarray(conf), kind="stable"):
        claim = masks[i] & (labels == 0)
        if claim.any():
            labels[claim] = nxt
            kept.append(i)
            nxt += 1
    return labels, np.asarray(kept, np.int64)


def paint_torch(protos: torch.Tensor, coeffs: torch.Tensor, boxes: torch.Tensor, conf: torch.Tensor,
                shape: tuple[int, int], threshold: float = 0.5, chunk: int = 128,
                mirrors: tuple[Mirror, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`paint` on the tensors' own device (the GPU, where there is one): an int32 label tensor and
    the kept instances' indices, both left on the device for the caller to bring back once per batch.

    On a GPU the dense upsampling that is too slow on a CPU costs well under a millisecond, while
    box-local painting would keep a CPU core busy per model replica. Instances go in descending
    confidence, ``chunk`` at a time: within a chunk the most confident covering instance takes each
    free pixel, exactly the claim order of :func:`paint`.
    """
    h, w = shape
    dev = protos.device
    owner = torch.zeros((h, w), dtype=torch.int32, device=dev)  # rank + 1 of the instance owning a pixel
    n = len(conf)
    if n == 0:
        return owner, torch.zeros(0, dtype=torch.int64, device=dev)
    thr = math.log(threshold / (1 - threshold))
    c, mh, mw = protos.shape
    order = torch.argsort(-conf.float(), stable=True)
    pix = torch.ceil(boxes.double()).long()
    pix[:, [0, 2]] = pix[:, [0, 2]].clamp(0, w)
    pix[:, [1, 3]] = pix[:, [1, 3]].clamp(0, h)
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    none = torch.iinfo(torch.int32).max
    flat = protos.float().reshape(c, -1)
    mirror_flats = [m.protos.float().reshape(c, -1) for m in mirrors]
    for r0 in range(0, n, chunk):
        idx = order[r0:r0 + chunk]
        up = _dense_upsample(coeffs[idx].float() @ flat, mh, mw, shape)
        if mirrors:
            passes = torch.ones(len(idx), device=dev)
            for m, m_flat in zip(mirrors, mirror_flats):
                ok = m.matched[idx].float()
                twin = _dense_upsample(m.coeffs[idx].float() @ m_flat, mh, mw, shape)
                up = up + twin.flip(1 + m.axis) * ok.view(-1, 1, 1)
                passes = passes + ok
            up = up / passes.view(-1, 1, 1)
        b = pix[idx].view(-1, 4, 1, 1)
        inside = (xs >= b[:, 0]) & (xs < b[:, 2]) & (ys >= b[:, 1]) & (ys < b[:, 3])
        rank = torch.arange(r0 + 1, r0 + 1 + len(idx), device=dev, dtype=torch.int32).view(-1, 1, 1)
        first = torch.where((up > thr) & inside, rank, none).amin(0)
        owner = torch.where((owner == 0) & (first != none), first, owner)
    # Ranks that own pixels become labels 1..K in confidence order; ranks that own none are dropped.
    owns = torch.bincount(owner.view(-1), minlength=n + 1)[1:] > 0
    new_label = torch.zeros(n + 1, dtype=torch.int32, device=dev)
    new_label[1:] = torch.cumsum(owns.int(), 0) * owns
    return new_label[owner.long()], order[owns]
