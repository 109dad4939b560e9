"""The model side: which network segments a field, and how.

``models`` resolves and checksums weights (shipped and user files); ``segment`` runs YOLOv8-seg on a field
(letterbox, the model's pixel size, tiles); ``tiles`` plans overlapping tiles and merges their seams;
``labels`` paints instance masks into label images; ``replica`` is the Ray actor that holds the networks;
``classify`` applies the field cell-type classifier.

May import: config, offline, torch and ultralytics. Never the CLI, the pipeline's driver, the store or the
training side: a replica's process loads only what segmenting needs.
"""

from livecell_ray import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "Weights": "models", "WeightsError": "models", "resolve": "models", "resolve_map": "models",
    "Segmenter": "segment", "Instances": "segment", "SegmentActor": "replica", "FieldClassifier": "classify",
})
