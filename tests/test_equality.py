"""What the Ray pipeline writes equals, pixel for pixel and row for row, the Segmenter and measurement
functions on each field alone: mixed field sizes, routing by cell type, test-time augmentation, ONNX."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile

from livecell_ray import pipeline, store
from livecell_ray.config import InferenceConfig, SegmentConfig
from livecell_ray.measure import measure_cells
from livecell_ray.model import models
from livecell_ray.model.segment import Segmenter
from livecell_ray.plate.imaging import normalize, read_image

from .conftest import EXAMPLES

pytestmark = pytest.mark.slow  # starts Ray


def _mixed_plate(dst) -> list:
    """704x520 LIVECell fields, a 1022x1024 field (Usiigaci's size, larger than --imgsz) and a small crop."""
    dst.mkdir()
    a172 = EXAMPLES / "A172_Phase_A7_1_00d00h00m_1.tif"
    skbr3 = EXAMPLES / "SkBr3_Phase_E3_2_02d08h00m_1.tif"
    shutil.copy(a172, dst / a172.name)
    shutil.copy(skbr3, dst / skbr3.name)
    big = np.pad(np.tile(tifffile.imread(skbr3), (2, 2))[:1024, :1022], 0)
    tifffile.imwrite(dst / "BT474_Phase_B3_1_00d00h00m_1.tif", big)
    tifffile.imwrite(dst / "MCF7_Phase_F4_1_00d00h00m_2.tif", tifffile.imread(a172)[100:250, 200:400])
    return sorted(dst.glob("*.tif"))


def _alone(paths, model: str, inference: InferenceConfig) -> dict[str, tuple]:
    import torch

    # The model actor computes on one thread (Ray gives it a fraction of a CPU); another thread count sums
    # convolutions in another order, which moves logits by ~1e-7 and can flip a pixel at the threshold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _segment_alone(paths, model, inference)
    finally:
        torch.set_num_threads(threads)


def _segment_alone(paths, model: str, inference: InferenceConfig) -> dict[str, tuple]:
    seg = Segmenter(models.resolve_map(model), inference)
    out = {}
    for p in paths:
        raw = read_image(str(p))
        r = seg([normalize(raw)], [p.name.split("_")[0]])[0]
        out[p.name] = (r.labels, r.confidences, measure_cells(r.labels, raw, r.class_ids, r.confidences))
    return out


def _written(out: str) -> dict[str, tuple]:
    o = store.Outputs(out)
    fields, cells = o.read_table("fields"), o.read_table("cells")
    got = {}
    for f in fields.itertuples():
        labels = store.read_labels(o, f.plate, f.zarr_path.split(".zarr/", 1)[1], int(f.t_index))
        rows = cells[cells["field_id"] == f.field_id].sort_values("label")
        got[f.path.rsplit("/", 1)[-1]] = (labels, rows)
    return got


@pytest.mark.parametrize("model, inference", [
    ("small", InferenceConfig()),
    ("BT474=big,MCF7=big,*=small", InferenceConfig(tta=True)),  # routing by cell type, and TTA
    ("small", InferenceConfig(backend="onnx")),
], ids=["plain", "routing+tta", "onnx"])
def test_pipeline_output_equals_each_field_segmented_alone(tmp_path, ray_local, model, inference):
    if inference.backend == "onnx":
        pytest.importorskip("onnxruntime", reason="onnxruntime (onnx extra) not installed")
    paths = _mixed_plate(tmp_path / "plate")
    out = str(tmp_path / "out")
    summary = pipeline.run(SegmentConfig(source=str(tmp_path / "plate"), out=out, model=model, batch_size=4,
                                         inference=inference))
    assert summary.fields_done == 4 and summary.fields_failed == 0
    got, ref = _written(out), _alone(paths, model, inference)
    assert got.keys() == ref.keys()
    for name, (labels, conf, cells) in ref.items():
        stored, rows = got[name]
        assert stored.shape == labels.shape, name
        np.testing.assert_array_equal(stored, labels, err_msg=name)
        assert len(rows) == int(labels.max()) > 0, name
        # Confidences agree to float32 rounding: the network batches fields of one size together, and a
        # batch of two computes the same field to within 1e-6 of a batch of one.
        np.testing.assert_allclose(rows["confidence"].to_numpy(), conf, rtol=1e-5, err_msg=name)
        for col, values in cells.items():
            if col != "confidence":
                np.testing.assert_array_equal(rows[col].to_numpy(), np.asarray(values), err_msg=f"{name} {col}")
    assert pd.Series([v[0].shape for v in got.values()]).nunique() == 3  # three sizes went through
