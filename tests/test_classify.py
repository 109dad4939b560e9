"""Classify-then-segment: field crops by field, a YOLOv8-cls classifier, cell_type_predicted, --route auto."""

from __future__ import annotations

import numpy as np
import pytest

from livecell_ray import pipeline, store
from livecell_ray.config import InferenceConfig, SegmentConfig
from livecell_ray.model import models
from livecell_ray.model.segment import Segmenter
from livecell_ray.plate.imaging import normalize, read_image
from livecell_ray.training import classifier

from .conftest import EXAMPLES


def test_grid_crops_cover_the_field_flush_with_its_edges():
    img = np.arange(520 * 704, dtype=np.int64).reshape(520, 704)
    crops = classifier.grid_crops(img, 256)
    assert len(crops) == 3 * 3 and all(c.shape == (256, 256) for c in crops)
    covered = np.zeros(img.shape, bool)
    for c in crops:
        y, x = divmod(int(c[0, 0]), 704)
        covered[y:y + 256, x:x + 256] = True
    assert covered.all()
    assert [c.shape for c in classifier.grid_crops(img[:100, :150], 256)] == [(100, 100), (100, 100)]


def test_crop_data_set_never_splits_a_field(tmp_path):
    held = {"A172_Phase_A7_1_00d00h00m_1", "SkBr3_Phase_E3_2_02d08h00m_1"}
    summary = classifier.build_dataset([str(EXAMPLES)], str(tmp_path / "d"), held,
                                     classifier.ClassifierConfig(crops_per_field=2))
    assert summary["fields"]["val"] == {"A172": 1, "SkBr3": 1}
    assert sum(summary["fields"]["train"].values()) == 8
    stems = {s: {p.name.rsplit("_", 1)[0] for p in (tmp_path / "d" / s).rglob("*.png")} for s in ("train", "val")}
    assert stems["val"] == held and not stems["train"] & stems["val"]
    assert len(list((tmp_path / "d" / "val").rglob("*.png"))) == 2 * 9  # grid crops only: 3 x 3 of 256 px


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A classifier trained for one epoch on crops of the example fields (offline, from the YAML)."""
    root = tmp_path_factory.mktemp("cls")
    classifier.build_dataset([str(EXAMPLES)], str(root / "data"), {"A172_Phase_A7_1_00d00h00m_1"},
                           classifier.ClassifierConfig(crops_per_field=2))
    best = classifier.train(str(root / "data"), str(root / "runs"), "tiny",
                          classifier.ClassifierConfig(epochs=1, imgsz=64, batch=32))
    return str(best.parent / "last.pt")


@pytest.mark.slow
def test_every_field_gets_a_predicted_type_and_auto_routing_uses_it(tiny_classifier, tmp_path, ray_local):
    clf = classifier.FieldClassifier(tiny_classifier)
    paths = sorted(EXAMPLES.glob("*.tif"))[:4]
    plate = tmp_path / "plate"
    plate.mkdir()
    for p in paths:
        (plate / p.name).write_bytes(p.read_bytes())
    expected = {p.name: clf([normalize(read_image(str(p)))])[0] for p in paths}
    routed = sorted({t for t, _, _ in expected.values()})[0]  # one predicted type gets its own model
    cfg = SegmentConfig(source=str(plate), out=str(tmp_path / "out"), classifier=tiny_classifier,
                        trust_weights=True, route="auto", model=f"{routed}=big,*=small")
    assert pipeline.run(cfg).fields_done == len(paths)
    o = store.Outputs(str(tmp_path / "out"))
    fields = o.read_table("fields")
    for f in fields.itertuples():
        name = f.path.rsplit("/", 1)[-1]
        t, prob, _ = expected[name]
        assert f.cell_type_predicted == t and f.cell_type_probability == pytest.approx(prob, rel=1e-4)
        # the field went to the model of its predicted type (file name's type notwithstanding)
        want = "big" if t == routed else "small"
        seg = Segmenter(models.resolve_map(want), InferenceConfig())
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the replica's thread count: the same sums, the same pixels
        try:
            alone = seg([normalize(read_image(f.path))])[0].labels
        finally:
            torch.set_num_threads(threads)
        stored = store.read_labels(o, f.plate, f.zarr_path.split(".zarr/", 1)[1], int(f.t_index))
        np.testing.assert_array_equal(stored, alone, err_msg=f"{name} -> {want}")
    run = o.read_run()
    assert "classifier" in run["provenance"]["models"]


def test_route_auto_without_a_classifier_is_refused(tmp_path):
    cfg = SegmentConfig(source=str(EXAMPLES), out=str(tmp_path / "out"), classifier=None, route="auto")
    with pytest.raises(pipeline.RunError, match="needs a field classifier"):
        pipeline.plan(cfg)
    assert not (tmp_path / "out").exists()


def test_model_auto_gives_each_field_its_types_shipped_model():
    """The default --model auto maps BT474 and MCF7 to their shipped per-type models (weights/models.json's
    cell_type) and every other type to small.pt; a field named MCF7 is segmented by mcf7.pt exactly."""
    w = models.resolve_map(models.AUTO)
    assert SegmentConfig(source="a", out="b").model == models.AUTO
    assert {k: v.path.rsplit("/", 1)[-1] for k, v in w.items()} == {"*": "small.pt", "BT474": "bt474.pt",
                                                                     "MCF7": "mcf7.pt"}
    assert all(v.imgsz == 832 and v.pixel_size == 1.24 for v in w.values())
    assert len({v.sha256 for v in w.values()}) == 3
    seg = Segmenter(w)
    assert seg.model_key("MCF7") == "MCF7" and seg.model_key("A172") == models.DEFAULT_KEY
    field = normalize(read_image(str(EXAMPLES / "MCF7_Phase_F4_1_01d16h00m_4.tif")))
    got = seg([field], ["MCF7"])[0]
    alone = Segmenter({models.DEFAULT_KEY: w["MCF7"]})([field])[0]
    general = Segmenter({models.DEFAULT_KEY: w["*"]})([field])[0]
    np.testing.assert_array_equal(got.labels, alone.labels)
    assert not np.array_equal(got.labels, general.labels)
