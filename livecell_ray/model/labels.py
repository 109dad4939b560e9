"""Instances -> one uint32 label image per field, without dense full-resolution masks.

ultralytics' retina-mask path (``ops.process_mask_native``) upsamples every instance's prototype
mask to the whole image: O(N x H x W) for N cells, which dominates inference on dense fields. The
upsampling is separable and linear, so we precompute its row and column weight matrices once per
(input size, image size) by running ultralytics' own functions on basis vectors, then evaluate
each instance only inside its box: O(sum of box areas). The result equals the dense path.
:func:`paint` does it instance by instance with NumPy (the CPU path); :func:`paint_batch` does it for
every instance of a batch of fields at once with torch, on the GPU where the model runs.

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


@dataclass(frozen=True)
class BatchMirror:
    """:class:`Mirror` for :func:`paint_batch`: instance ``i``'s twin is in prototype plane ``proto_index[i]``."""

    proto_index: torch.Tensor
    coeffs: torch.Tensor
    matched: torch.Tensor
    axis: int


def axis_weights_on(weights: AxisWeights, device: torch.device | str) -> AxisWeights:
    """The same weights as tensors on a device, for :func:`paint_batch`."""
    return AxisWeights(*(torch.as_tensor(getattr(weights, f), device=device)
                         for f in ("wy", "wx", "y_lo", "y_hi", "x_lo", "x_hi")))


def _batch_logits(protos: torch.Tensor, pidx: torch.Tensor, coeffs: torch.Tensor, ry: torch.Tensor,
                  rx: torch.Tensor, vy: torch.Tensor, vx: torch.Tensor, wts: AxisWeights) -> torch.Tensor:
    """Upsampled mask logits of n instances at pixels ``ry`` x ``rx`` ((n, S) each, valid where ``vy``/``vx``),
    as ``_box_logits`` computes them: the prototypes under the pixels' span, then the axis weights.
    ``protos`` is (B, mh, mw, C): each gathered prototype pixel is one contiguous vector."""
    mh, mw = protos.shape[1:3]

    def span(r: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, m: int, wgt: torch.Tensor):
        p0 = torch.where(v, lo[r], m).amin(1)
        p1 = torch.where(v, hi[r], 0).amax(1)
        size = int((p1 - p0).clamp(min=0).max()) if len(r) else 0
        t = p0[:, None] + torch.arange(max(size, 1), device=r.device)
        ok = t < p1[:, None]
        t = t.clamp(0, m - 1)
        # Weights of pixel rows (or columns) on the prototype rows under them; padding weighs nothing.
        return t, wgt[r[:, :, None], t[:, None, :]] * ok[:, None, :]

    ty, wy = span(ry, vy, wts.y_lo, wts.y_hi, mh, wts.wy)
    tx, wx = span(rx, vx, wts.x_lo, wts.x_hi, mw, wts.wx)
    planes = protos[pidx[:, None, None], ty[:, :, None], tx[:, None, :]]  # (n, Ph, Pw, C)
    logit = (planes.float() @ coeffs.float()[:, None, :, None])[..., 0]
    return wy @ logit @ wx.transpose(1, 2)


def paint_batch(protos: torch.Tensor, field: torch.Tensor, coeffs: torch.Tensor, boxes: torch.Tensor,
                conf: torch.Tensor, n_fields: int, shape: tuple[int, int], weights: AxisWeights,
                threshold: float = 0.5, mirrors: tuple[BatchMirror, ...] = (),
                budget: int = 1 << 25) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`paint` for a whole batch of fields at once, on the tensors' device (the GPU, where there is one).

    protos: (B, C, mh, mw), every prototype plane of the batch; instance ``i`` belongs to field
    ``field[i]`` (< n_fields) and uses plane ``field[i]``; coeffs (N, C), boxes (N, 4) xyxy in image
    pixels, conf (N,); weights from :func:`axis_weights_on`. Returns (n_fields, H, W) int32 labels,
    1..K per field in descending confidence, and the kept instances' indices, field by field in label
    order. Each instance is evaluated inside its box only, like :func:`paint`: O(sum of box areas)
    instead of the O(N x H x W) of dense masks, in a few large tensor operations for the whole batch
    (instances grouped by box size) rather than a loop over fields or instances. A pixel goes to the
    most confident instance whose mask covers it, which is :func:`paint`'s claim order.
    """
    h, w = shape
    dev = protos.device
    n = len(conf)
    if n == 0:
        return torch.zeros((n_fields, h, w), dtype=torch.int32, device=dev), torch.zeros(0, dtype=torch.int64,
                                                                                         device=dev)
    none = torch.iinfo(torch.int32).max
    owner = torch.full((n_fields * h * w,), none, dtype=torch.int32, device=dev)  # rank owning each pixel
    thr = math.log(threshold / (1 - threshold))
    field = field.long()
    order = torch.argsort(-conf.float(), stable=True)
    order = order[torch.argsort(field[order], stable=True)]  # by field, then descending confidence
    rank = torch.empty(n, dtype=torch.int32, device=dev)
    rank[order] = torch.arange(1, n + 1, dtype=torch.int32, device=dev)
    pix = torch.ceil(boxes.double()).long()
    pix[:, [0, 2]] = pix[:, [0, 2]].clamp(0, w)
    pix[:, [1, 3]] = pix[:, [1, 3]].clamp(0, h)
    bh, bw = (pix[:, 3] - pix[:, 1]).clamp(min=0), (pix[:, 2] - pix[:, 0]).clamp(min=0)
    side = torch.maximum(bh, bw)
    by_size = torch.argsort(side, stable=True)
    sizes = side[by_size].cpu().numpy()
    cost = sizes**2 + protos.shape[1] * (sizes // 4 + 2) ** 2 + 2 * sizes * (sizes // 4 + 2)  # elements each
    planes = protos.permute(0, 2, 3, 1).contiguous()
    start = 0
    while start < n:
        # Instances of similar box size (the largest at most 1.3x or 8 px over the smallest), each chunk
        # about `budget` elements at most: little padding, few kernel launches.
        end = int(np.searchsorted(sizes, max(sizes[start] * 1.3, sizes[start] + 8), side="right"))
        fits = np.arange(1, end - start + 1) * cost[start:end] <= budget
        end = start + max(1, int(fits.sum()))
        idx = by_size[start:end]
        start = end
        sh, sw = max(int(bh[idx].max()), 1), max(int(bw[idx].max()), 1)
        dy, dx = torch.arange(sh, device=dev), torch.arange(sw, device=dev)
        vy, vx = dy[None] < bh[idx, None], dx[None] < bw[idx, None]
        ry = (pix[idx, 1, None] + dy[None]).clamp(max=h - 1)
        rx = (pix[idx, 0, None] + dx[None]).clamp(max=w - 1)
        up = _batch_logits(planes, field[idx], coeffs[idx], ry, rx, vy, vx, weights)
        if mirrors:
            passes = torch.ones(len(idx), device=dev)
            for m in mirrors:
                ok = m.matched[idx].float()
                # The twin's pixels: the same pixels of the mirror image, so no flipping afterwards.
                ty, tx = (ry, w - 1 - rx) if m.axis == 1 else (h - 1 - ry, rx)
                twin = _batch_logits(planes, m.proto_index[idx], m.coeffs[idx], ty, tx, vy, vx, weights)
                up = up + twin * ok[:, None, None]
                passes = passes + ok
            up = up / passes[:, None, None]
        hit = (up > thr) & vy[:, :, None] & vx[:, None, :]
        where = (field[idx, None, None] * (h * w) + ry[:, :, None] * w + rx[:, None, :])[hit]
        ranks = rank[idx, None, None].expand_as(hit)[hit]
        owner.scatter_reduce_(0, where, ranks, reduce="amin")
    owner = torch.where(owner == none, 0, owner)
    # Ranks that own pixels become labels 1..K of their field in confidence order; the others are dropped.
    owns = torch.bincount(owner, minlength=n + 1)[1:] > 0
    cum = torch.cumsum(owns.int(), 0)
    first = torch.searchsorted(field[order], torch.arange(n_fields, device=dev))  # each field's first rank - 1
    base = torch.cat([torch.zeros(1, dtype=cum.dtype, device=dev), cum])[first]
    new_label = torch.zeros(n + 1, dtype=torch.int32, device=dev)
    new_label[1:] = ((cum - base[field[order]]) * owns).int()
    return new_label[owner.long()].view(n_fields, h, w), order[owns]
