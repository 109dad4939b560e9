"""The ONNX Runtime backend (ultralytics' export) segments like PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

from livecell_ray.config import InferenceConfig
from livecell_ray.model import models
from livecell_ray.model.segment import Segmenter
from livecell_ray.plate.imaging import normalize, read_image

from .conftest import EXAMPLES


def test_onnx_backend_matches_torch(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime", reason="onnx extra not installed")
    monkeypatch.setenv("LIVECELL_RAY_CACHE", str(tmp_path / "cache"))
    imgs = [normalize(read_image(str(p))) for p in sorted(EXAMPLES.glob("*.tif"))[:3]]
    w = models.resolve_map("small")
    torch_res = Segmenter(w, InferenceConfig(backend="torch"))(imgs)
    onnx_res = Segmenter(w, InferenceConfig(backend="onnx"))(imgs)
    assert list((tmp_path / "cache").glob("*.onnx")), "exported once into the cache"
    for a, b in zip(torch_res, onnx_res):
        assert a.labels.max() > 0
        # float differences between runtimes may flip a borderline detection, never more than a few
        assert abs(int(a.labels.max()) - int(b.labels.max())) <= max(2, 0.02 * a.labels.max())
        agree = ((a.labels > 0) == (b.labels > 0)).mean()
        assert agree > 0.995
        np.testing.assert_allclose(np.sort(a.confidences)[-5:], np.sort(b.confidences)[-5:], atol=2e-3)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        Segmenter(models.resolve_map("small"), InferenceConfig(backend="tpu"))


def test_test_time_augmentation_refines_masks_of_the_same_cells():
    """--tta keeps the original pass's detections and averages each cell's mask with its twins from the
    mirror images; with no twin matched it is the plain result."""
    imgs = [normalize(read_image(str(p))) for p in sorted(EXAMPLES.glob("*.tif"))[:2]]
    w = models.resolve_map("small")
    plain_seg = Segmenter(w, InferenceConfig())
    plain = plain_seg(imgs)
    _, dets, _ = plain_seg.forward(models.DEFAULT_KEY, imgs)
    tta = Segmenter(w, InferenceConfig(tta=True))(imgs)
    unmatched = Segmenter(w, InferenceConfig(tta=True, tta_match_iou=1.01))(imgs)
    on_device = Segmenter(w, InferenceConfig(tta=True, paint_on_device=True))(imgs)
    for p, t, u, d, det in zip(plain, tta, unmatched, on_device, dets):
        np.testing.assert_array_equal(u.labels, p.labels)
        assert p.labels.max() > 20
        # Every cell is one of the original pass's detections (a batch three times as large may move a
        # confidence in the 4th decimal); a few more or fewer end up with pixels of their own.
        assert np.abs(t.confidences[:, None] - det[:, 4].numpy()[None, :]).min(1).max() < 1e-3
        assert abs(int(t.labels.max()) - int(p.labels.max())) <= max(3, 0.03 * p.labels.max())
        changed = (t.labels > 0) != (p.labels > 0)
        assert 0.001 < changed.mean() < 0.1
        assert ((d.labels > 0) == (t.labels > 0)).mean() > 0.999  # the GPU painter agrees


def test_painting_on_the_device_matches_box_local_painting():
    """The GPU's painting path (forced here on the CPU) gives the box-local painter's labels."""
    imgs = [normalize(read_image(str(p))) for p in sorted(EXAMPLES.glob("*.tif"))[:2]]
    w = models.resolve_map("small")
    cpu = Segmenter(w, InferenceConfig(paint_on_device=False))(imgs)
    dev = Segmenter(w, InferenceConfig(paint_on_device=True))(imgs)
    # The device path brings a batch's labels back as uint16 (max_det < 2**15), uint32 beyond that.
    wide = Segmenter(w, InferenceConfig(paint_on_device=True, max_det=40_000))(imgs)
    for a, b, c in zip(cpu, dev, wide):
        assert a.labels.max() > 50 and a.labels.dtype == c.labels.dtype == np.uint32
        assert b.labels.dtype == np.uint16
        assert a.labels.max() == b.labels.max() == c.labels.max()
        np.testing.assert_array_equal(a.confidences, b.confidences)
        np.testing.assert_array_equal(a.class_ids, b.class_ids)
        assert (a.labels != b.labels).mean() < 1e-4
        np.testing.assert_array_equal(b.labels, c.labels)


def test_nms_runs_in_torchvision_not_the_python_loop():
    """ultralytics falls back to a Python-loop NMS unless torchvision is imported (100 ms a field on an
    H100); the Segmenter must take the torchvision kernel even in a fresh process."""
    import subprocess
    import sys

    field = sorted(EXAMPLES.glob("*.tif"))[0]
    code = (
        "from livecell_ray import offline; offline.configure()\n"
        "from ultralytics.utils import nms\n"
        "def loop(*a, **k): raise AssertionError('Python-loop NMS used')\n"
        "nms.TorchNMS.nms = staticmethod(loop)\n"
        "from livecell_ray import models\n"
        "from livecell_ray.plate.imaging import normalize, read_image\n"
        "from livecell_ray.model.segment import Segmenter\n"
        f"r = Segmenter(models.resolve_map('small'))([normalize(read_image({str(field)!r}))])\n"
        "print('cells', int(r[0].labels.max()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split("cells")[-1]) > 50


@pytest.mark.parametrize("imgsz", [704, 832])
@pytest.mark.parametrize("scaleup", [True, False])
@pytest.mark.parametrize("shape", [(520, 704), (512, 700), (1022, 1024), (300, 200)])
def test_letterbox_on_device_equals_ultralytics(shape, scaleup, imgsz):
    """Grey planes resized once and padded on the device: the tensor equals ultralytics' LetterBox of the
    fields as RGB, resized or not."""
    from ultralytics.data.augment import LetterBox

    from livecell_ray.model.segment import letterbox
    from livecell_ray.plate.imaging import to_rgb

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(3)]
    ref = np.stack([LetterBox((imgsz, imgsz), auto=True, stride=32, scaleup=scaleup)(image=to_rgb(im))
                    for im in images])
    got = letterbox(images, imgsz, "cpu", scaleup).permute(0, 2, 3, 1).numpy()
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, ref)
