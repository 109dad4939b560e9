"""Classify-then-segment: the cell-type classifier, its leave-one-well-out training, well consensus, the plate
map's cell_line, abstention, and --route auto end to end on a real local Ray."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from livecell_ray import pipeline, store
from livecell_ray.config import InferenceConfig, SegmentConfig
from livecell_ray.model import models, route
from livecell_ray.model.classify import FieldClassifier, cell_features
from livecell_ray.model.segment import Segmenter
from livecell_ray.plate.imaging import normalize, read_image
from livecell_ray.training import classifier

from .conftest import EXAMPLES

CLASSES = ["A172", "MCF7", "SkBr3"]
KEYS = ["*", "MCF7", "BT474"]


def logp(*probs: tuple[float, float, float]) -> np.ndarray:
    return np.log(np.asarray(probs, float))


def test_a_well_is_routed_by_all_its_fields_and_each_field_keeps_its_own_prediction():
    wells = [("P", "A1")] * 3 + [("P", "B2")]
    lp = logp((0.2, 0.7, 0.1), (0.3, 0.6, 0.1), (0.6, 0.3, 0.1), (0.1, 0.1, 0.8))
    got = route.decide(wells, lp, CLASSES, KEYS)
    # A1: summed log-probabilities favour MCF7 (0.7 * 0.6 * 0.3 > 0.2 * 0.3 * 0.6), though one field says A172
    assert [r.well_cell_type for r in got] == ["MCF7", "MCF7", "MCF7", "SkBr3"]
    assert [r.cell_type_predicted for r in got] == ["MCF7", "MCF7", "A172", "SkBr3"]
    assert [r.routed_to for r in got] == ["MCF7", "MCF7", "MCF7", "*"]  # SkBr3 has no model of its own
    assert got[2].cell_type_probability == pytest.approx(0.6)
    post = np.array([0.2 * 0.3 * 0.6, 0.7 * 0.6 * 0.3, 0.1 * 0.1 * 0.1])
    assert got[0].well_cell_type_probability == pytest.approx(post[1] / post.sum())
    assert {r.route_reason for r in got} == {route.CONSENSUS}


def test_the_plate_maps_cell_line_wins_and_names_match_without_case_or_punctuation():
    wells = [("P", "A1"), ("Q", "A1")]
    lp = logp((0.98, 0.01, 0.01), (0.98, 0.01, 0.01))
    got = route.decide(wells, lp, CLASSES, KEYS, cell_lines={("P", "A1"): "mcf-7"})
    assert (got[0].routed_to, got[0].route_reason, got[0].well_cell_type) == ("MCF7", route.PLATE_MAP, "mcf-7")
    assert got[0].cell_type_predicted == "A172"  # the prediction is still recorded beside the map's word
    assert (got[1].routed_to, got[1].route_reason) == ("*", route.CONSENSUS)  # plate Q has no map entry
    assert route.model_for("BT-474", KEYS) == "BT474" and route.model_for("HeLa", KEYS) == "*"


def test_unsure_wells_and_unclassified_fields_go_to_the_general_model():
    wells = [("P", "A1"), ("P", "A2"), ("P", "A3")]
    lp = np.vstack([logp((0.3, 0.45, 0.25)), logp((0.02, 0.96, 0.02)), np.full((1, 3), np.nan)])
    got = route.decide(wells, lp, CLASSES, KEYS, abstain_below=0.8)
    assert [(r.routed_to, r.route_reason) for r in got] == [
        ("*", route.ABSTAINED), ("MCF7", route.CONSENSUS), ("*", route.UNCLASSIFIED)]
    assert got[0].well_cell_type == "MCF7"  # what it would have been, kept for the record


def test_leave_one_well_out_never_learns_a_well_from_its_own_fields():
    """Types that only a well's own look gives away (each well a random fingerprint, no type signal): a field
    split lets fields of one well onto both sides and scores near 1; leaving wells out scores near chance."""
    rng = np.random.default_rng(0)
    types, groups, rows = [], [], []
    for t in ("A", "B", "C"):
        for w in range(4):
            fingerprint = rng.normal(0, 1, 20)
            for _ in range(5):
                rows.append(fingerprint + rng.normal(0, 0.1, 20))
                types.append(t)
                groups.append(f"{t}/{w}")
    x, y, g = np.asarray(rows), np.asarray(types), np.asarray(groups)
    cfg = classifier.ClassifierConfig()
    held = classifier.leave_one_well_out(x, y, g, ["A", "B", "C"], cfg)
    wells_acc = (np.array(["A", "B", "C"])[held.argmax(1)] == y).mean()
    fields = np.array([f"f{i % 5}" for i in range(len(y))])  # every well's fields spread over 5 folds
    leaky = classifier.leave_one_well_out(x, y, fields, ["A", "B", "C"], cfg)
    leaky_acc = (np.array(["A", "B", "C"])[leaky.argmax(1)] == y).mean()
    assert leaky_acc > 0.95 and wells_acc < 0.6


def test_abstention_threshold_keeps_the_fields_right_often_enough():
    prob = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5])
    right = np.array([1, 1, 1, 1, 0, 1, 0], bool)
    assert classifier.abstention_threshold(prob, right, 0.95) == pytest.approx(0.8)
    assert classifier.abstention_threshold(prob, np.ones(7, bool), 0.95) == 0.0
    assert classifier.abstention_threshold(prob, np.zeros(7, bool), 0.95) == 1.0
    # each well counts once: four wrong fields of one well weigh as one
    groups = np.array(["a", "b", "c", "d", "e", "e", "e"])
    assert classifier.abstention_threshold(prob, np.array([1, 1, 1, 1, 0, 0, 0], bool), 0.8, groups) == 0.0


def test_cell_features_are_in_micrometres_whatever_the_pixel_size():
    yy, xx = np.mgrid[:400, :400]
    small = np.zeros((400, 400), np.int32)
    big = np.zeros((800, 800), np.int32)
    yb, xb = np.mgrid[:800, :800]
    for k, (cy, cx) in enumerate([(100, 100), (100, 300), (300, 200)], 1):
        small[(yy - cy) ** 2 + (xx - cx) ** 2 < 30 ** 2] = k
        big[(yb - 2 * cy) ** 2 + (xb - 2 * cx) ** 2 < 60 ** 2] = k
    img_s = np.where(small > 0, 200, 100).astype(np.uint8)
    img_b = np.where(big > 0, 200, 100).astype(np.uint8)
    fs = cell_features(img_s, small, np.full(3, 0.9, np.float32), 1.0)
    fb = cell_features(img_b, big, np.full(3, 0.9, np.float32), 0.5)
    np.testing.assert_allclose(fs, fb, atol=0.05)  # the same cells at twice the magnification
    assert fs[0] == pytest.approx(np.log1p(3 / 0.16))  # three cells in 0.16 mm^2


def test_train_refuses_a_type_seen_in_one_well_only(tmp_path):
    fields = [classifier.Field(f"{t}{k}.tif", t, f"{t}/{w}") for t, ws in (("A", "12"), ("B", "1"))
              for w in ws for k in range(2)]
    with pytest.raises(ValueError, match="two wells or more.*B has one"):
        classifier.train(fields, np.zeros((len(fields), 3)), classifier.ClassifierConfig(), "sha")


def test_the_shipped_classifier_is_plain_data_tied_to_its_model(tmp_path):
    w = models.resolve_classifier(models.CLASSIFIER)
    assert w is not None and w.path.endswith("celltype.json")
    spec = json.loads(open(w.path).read())
    assert spec["features"]["sha256"] == models.resolve("small").sha256
    cv = spec["cross_validation"]
    assert cv["protocol"].startswith("leave one well out") and cv["wells"] >= 20
    changed = tmp_path / "c.json"
    changed.write_text(json.dumps({**spec, "features": {**spec["features"], "sha256": "0" * 64}}))
    assert models.resolve_classifier(str(changed)).path == str(changed)  # no --trust-weights: no pickle
    with pytest.raises(models.WeightsError, match="retrain the classifier"):
        FieldClassifier(models.resolve_classifier(str(changed)))
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(models.WeightsError, match="not a livecell-ray field classifier"):
        FieldClassifier(models.resolve_classifier(str(tmp_path / "x.json")))


def alone(weights: str, path: str) -> np.ndarray:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the replica's thread count: the same sums, the same pixels
    try:
        return Segmenter(models.resolve_map(weights), InferenceConfig())([normalize(read_image(path))])[0].labels
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_route_auto_routes_each_well_once_and_a_rerun_keeps_the_decision(tmp_path, ray_local):
    """Three wells: MCF7's field goes to mcf7.pt by consensus, a plate map names A3's line (BT-474), SkBr3 goes
    to the general model; every stored mask is the routed model's alone. A later timepoint of E4 added to the
    plate is routed as E4 was, without being classified again."""
    plate = tmp_path / "plate"
    plate.mkdir()
    names = ["MCF7_Phase_E4_1_02d16h00m_1.tif", "SkBr3_Phase_E3_2_02d08h00m_1.tif", "BT474_Phase_A3_2_01d12h00m_2.tif"]
    for n in names:
        shutil.copy(EXAMPLES / n, plate / n)
    clf = FieldClassifier(models.resolve_classifier(models.CLASSIFIER))
    expected = {n: clf([normalize(read_image(str(plate / n)))], [1.24])[0] for n in names}
    assert {n: t for n, (t, _, _) in expected.items()} == {names[0]: "MCF7", names[1]: "SkBr3", names[2]: "BT474"}
    out = tmp_path / "out"
    cfg = SegmentConfig(source=str(plate), out=str(out), route="auto", cell_lines=[("", "A3", "BT-474")])
    assert pipeline.run(cfg).fields_done == 3
    o = store.Outputs(str(out))
    f = o.read_table("fields").set_index("well")
    assert f.loc["E4", "routed_to"] == "mcf7" and f.loc["E4", "route_reason"] == route.CONSENSUS
    assert f.loc["E4", "cell_type_predicted"] == "MCF7" and f.loc["E4", "well_cell_type"] == "MCF7"
    assert f.loc["E4", "cell_type_probability"] == pytest.approx(expected[names[0]][1], rel=1e-3)
    assert f.loc["A3", "routed_to"] == "bt474" and f.loc["A3", "route_reason"] == route.PLATE_MAP
    assert f.loc["A3", "well_cell_type"] == "BT-474"
    assert f.loc["E3", "routed_to"] == "small" and f.loc["E3", "well_cell_type"] == "SkBr3"
    for well, model in (("E4", "mcf7"), ("E3", "small"), ("A3", "bt474")):
        r = f.loc[well]
        stored = store.read_labels(o, r.plate, r.zarr_path.split(".zarr/", 1)[1], int(r.t_index))
        np.testing.assert_array_equal(stored, alone(model, r.path), err_msg=f"{well} -> {model}")
    # a later scan of E4: routed by the well's recorded decision
    later = "MCF7_Phase_E4_1_02d20h00m_1.tif"
    shutil.copy(EXAMPLES / names[1], plate / later)  # SkBr3's pixels under E4's name: the well decides
    assert pipeline.run(cfg).fields_done == 1
    f = o.read_table("fields")
    e4 = f[f.well == "E4"].sort_values("timepoint")
    assert list(e4.routed_to) == ["mcf7", "mcf7"] and list(e4.route_reason) == [route.CONSENSUS] * 2
    assert e4.well_cell_type.tolist() == ["MCF7", "MCF7"]


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
    alone_ = Segmenter({models.DEFAULT_KEY: w["MCF7"]})([field])[0]
    general = Segmenter({models.DEFAULT_KEY: w["*"]})([field])[0]
    np.testing.assert_array_equal(got.labels, alone_.labels)
    assert not np.array_equal(got.labels, general.labels)
