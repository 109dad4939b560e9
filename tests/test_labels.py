"""Box-local label painting equals ultralytics' dense retina-mask path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from livecell_ray.model import labels as L


def _instances(rng, h, w, mh, mw, n):
    protos = (ndi.gaussian_filter(rng.normal(size=(32, mh, mw)), (0, 3, 3)) * 5).astype(np.float32)
    coeffs = rng.normal(size=(n, 32)).astype(np.float32)
    xy = rng.uniform(0, [w, h], size=(n, 2))
    wh = rng.uniform(4, 80, size=(n, 2))
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1).astype(np.float32)
    conf = rng.uniform(0.2, 1, size=n).astype(np.float32)
    return protos, coeffs, boxes, conf


def _assert_same_labels(fast, kept, ref, kept_ref):
    """Same instances kept in the same order, each with IoU >= 0.99 (in practice identical)."""
    assert np.array_equal(kept, kept_ref)
    for k in range(1, int(ref.max()) + 1):
        a, b = fast == k, ref == k
        assert (a & b).sum() / (a | b).sum() >= 0.99
    assert (fast != ref).mean() < 1e-4


@pytest.mark.parametrize("h,w,ih,iw", [(520, 704, 544, 704), (1022, 1024, 704, 704), (300, 200, 704, 480),
                                       (97, 1203, 64, 704)])
def test_paint_equals_dense_retina_masks(h, w, ih, iw):
    rng = np.random.default_rng(h * w)
    mh, mw = ih // 4, iw // 4
    protos, coeffs, boxes, conf = _instances(rng, h, w, mh, mw, 250)
    ax = L.axis_weights((mh, mw), (h, w))
    fast, kept = L.paint(protos, coeffs, boxes, conf, (h, w), ax)
    dense, kept_d = L.paint_dense(torch.from_numpy(protos), torch.from_numpy(coeffs), torch.from_numpy(boxes),
                                  conf, (h, w))
    assert fast.max() > 50
    _assert_same_labels(fast, kept, dense, kept_d)


def test_labels_are_compact_and_follow_confidence():
    rng = np.random.default_rng(1)
    protos, coeffs, boxes, conf = _instances(rng, 200, 300, 64, 80, 120)
    ax = L.axis_weights((64, 80), (200, 300))
    lab, kept = L.paint(protos, coeffs, boxes, conf, (200, 300), ax)
    present = np.unique(lab)[1:]
    assert np.array_equal(present, np.arange(1, len(kept) + 1))
    assert np.all(np.diff(conf[kept]) <= 0)  # label 1 is the most confident
    assert len(set(kept.tolist())) == len(kept)


def test_more_confident_instance_wins_overlap():
    protos = np.full((1, 20, 20), 10.0, np.float32)  # every pixel positive
    coeffs = np.ones((2, 1), np.float32)
    boxes = np.array([[0, 0, 60, 60], [30, 30, 80, 80]], np.float32)
    conf = np.array([0.3, 0.9], np.float32)
    ax = L.axis_weights((20, 20), (80, 80))
    lab, kept = L.paint(protos, coeffs, boxes, conf, (80, 80), ax)
    assert list(kept) == [1, 0]
    assert lab[40, 40] == 1 and lab[10, 10] == 2
    assert (lab == 1).sum() == 50 * 50
    assert (lab == 2).sum() == 60 * 60 - 30 * 30


def test_empty():
    ax = L.axis_weights((16, 16), (64, 64))
    lab, kept = L.paint(np.zeros((32, 16, 16), np.float32), np.zeros((0, 32), np.float32),
                        np.zeros((0, 4), np.float32), np.zeros(0, np.float32), (64, 64), ax)
    assert lab.shape == (64, 64) and lab.max() == 0 and len(kept) == 0


def _batch(fields, h, w, mh, mw, budget=1 << 25):
    """paint_batch over several fields' instances at once, split back into per-field (labels, kept)."""
    protos = torch.from_numpy(np.stack([f[0] for f in fields]))
    sizes = [len(f[3]) for f in fields]
    field = torch.cat([torch.full((k,), i) for i, k in enumerate(sizes)])
    cat = [torch.from_numpy(np.concatenate([f[j] for f in fields])) for j in (1, 2, 3)]
    weights = L.axis_weights_on(L.axis_weights((mh, mw), (h, w)), "cpu")
    lab, kept = L.paint_batch(protos, field, *cat, len(fields), (h, w), weights, budget=budget)
    per_field = np.bincount(field[kept].numpy(), minlength=len(fields))
    starts, bounds = np.cumsum([0, *sizes]), np.cumsum([0, *per_field])
    return [(lab[i].numpy(), kept[bounds[i]:bounds[i + 1]].numpy() - starts[i]) for i in range(len(fields))]


@pytest.mark.parametrize("h,w,ih,iw,budget", [(520, 704, 544, 704, 1 << 25), (300, 200, 704, 480, 5000),
                                              (1022, 1024, 704, 704, 1 << 25)])
def test_batch_painting_on_device_equals_box_local_paint(h, w, ih, iw, budget):
    """The GPU painter (run here on the CPU: same code, same tensors), a batch of fields with different
    numbers of cells at once, gives each field the box-local painter's labels and order; a small budget
    splits it into many chunks."""
    rng = np.random.default_rng(h + w)
    mh, mw = ih // 4, iw // 4
    fields = [_instances(rng, h, w, mh, mw, k) for k in (300, 0, 40, 250)]
    got = _batch(fields, h, w, mh, mw, budget)
    for (protos, coeffs, boxes, conf), (lab, kept) in zip(fields, got):
        fast, kept_ref = L.paint(protos, coeffs, boxes, conf, (h, w), L.axis_weights((mh, mw), (h, w)))
        assert fast.max() >= len(conf) // 2  # most cells keep pixels: a real comparison
        _assert_same_labels(lab, kept, fast, kept_ref)
    (empty, none), = _batch([_instances(rng, h, w, mh, mw, 0)], h, w, mh, mw)
    assert empty.shape == (h, w) and int(empty.max()) == 0 and len(none) == 0


def _mirror_reference(protos, coeffs, boxes, conf, shape, mirrors):
    """Test-time augmentation the slow, obvious way: every pass's dense logits over the whole image
    (ultralytics' upsampling), mirrored back, averaged where an instance has a twin, cut to its box."""
    from ultralytics.utils import ops

    h, w = shape
    c, mh, mw = protos.shape
    total = L._dense_upsample(torch.from_numpy(coeffs @ protos.reshape(c, -1)), mh, mw, shape).numpy()
    passes = np.ones(len(conf))
    for m in mirrors:
        up = L._dense_upsample(torch.from_numpy(m.coeffs @ m.protos.reshape(c, -1)), mh, mw, shape).numpy()
        total += np.flip(up, axis=1 + m.axis) * m.matched[:, None, None]
        passes += m.matched
    masks = ops.crop_mask(torch.from_numpy((total / passes[:, None, None] > 0).astype(np.float32)),
                          torch.from_numpy(boxes)).numpy().astype(bool)
    labels = np.zeros(shape, np.uint32)
    kept = []
    for i in np.argsort(-conf, kind="stable"):
        claim = masks[i] & (labels == 0)
        if claim.any():
            labels[claim] = len(kept) + 1
            kept.append(i)
    return labels, np.asarray(kept)


@pytest.mark.parametrize("h,w,ih,iw", [(520, 704, 544, 704), (300, 200, 704, 480)])
def test_mirrored_passes_average_like_the_dense_reference_on_cpu_and_device(h, w, ih, iw):
    rng = np.random.default_rng(h + 2 * w)
    mh, mw = ih // 4, iw // 4
    protos, coeffs, boxes, conf = _instances(rng, h, w, mh, mw, 200)
    mirrors = []
    for axis in (1, 0):
        twin_protos, twin_coeffs, _, _ = _instances(rng, h, w, mh, mw, 200)
        mirrors.append(L.Mirror(twin_protos, twin_coeffs, rng.uniform(size=200) < 0.8, axis))
    ref, kept_ref = _mirror_reference(protos, coeffs, boxes, conf, (h, w), mirrors)
    fast, kept = L.paint(protos, coeffs, boxes, conf, (h, w), L.axis_weights((mh, mw), (h, w)), mirrors=tuple(mirrors))
    assert fast.max() > 50
    _assert_same_labels(fast, kept, ref, kept_ref)
    plain, _ = L.paint(protos, coeffs, boxes, conf, (h, w), L.axis_weights((mh, mw), (h, w)))
    assert (plain != fast).mean() > 0.01  # the mirrored passes changed the masks
    # On the device: the mirror passes' prototypes are planes 1 and 2 of the batch.
    planes = torch.from_numpy(np.stack([protos, mirrors[0].protos, mirrors[1].protos]))
    twins = tuple(L.BatchMirror(torch.full((200,), k + 1), torch.from_numpy(m.coeffs), torch.from_numpy(m.matched),
                                m.axis) for k, m in enumerate(mirrors))
    weights = L.axis_weights_on(L.axis_weights((mh, mw), (h, w)), "cpu")
    dev, kept_d = L.paint_batch(planes, torch.zeros(200, dtype=torch.int64), torch.from_numpy(coeffs),
                                torch.from_numpy(boxes), torch.from_numpy(conf), 1, (h, w), weights, mirrors=twins,
                                budget=20_000)
    _assert_same_labels(dev[0].numpy(), kept_d.numpy(), ref, kept_ref)
