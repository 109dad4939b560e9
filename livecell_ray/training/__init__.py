"""Training and evaluation: data sets from labelled fields (``dataset``), copy-paste synthesis (``copypaste``),
pseudo-labels (``pseudolabel``), offline ultralytics training (``train``), the field classifier's training
(``classifier``) and COCO metrics by LIVECell's protocol (``evaluate``).

May import: everything below it (plate, model, config). Nothing of a segmentation run imports it.
"""

from livecell_ray import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "TrainConfig": "train", "DataConfig": "train", "prepare_dataset": "train", "LabelledField": "dataset",
    "ClassifierConfig": "classifier", "PseudoConfig": "pseudolabel", "Metrics": "evaluate",
})
