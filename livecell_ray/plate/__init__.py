"""The plate: its files become a manifest of fields (plate, well, field, timepoint, cell type), read and decoded.

``manifest`` parses names (LIVECell's convention, ``--pattern``, ``--manifest`` CSVs) and lists a plate through
fsspec; ``loaddata`` reads CellProfiler LoadData CSVs as manifests; ``layouts`` holds the instruments' naming
presets; ``platemap`` reads and checks plate maps; ``imaging`` decodes a field's plane (TIFF, OME-TIFF, PNG,
JPEG) and normalises it for the model.

May import: config, retry, store (a plate map is saved beside a run's results). Never Ray, torch or the
model side: a plate is listed and read on any CPU worker.
"""

from livecell_ray import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "Manifest": "manifest", "ManifestError": "manifest", "build": "manifest", "parse_name": "manifest",
    "parse_well": "manifest", "Layout": "layouts", "LayoutError": "layouts", "PlateMapError": "platemap",
    "ImageError": "imaging", "read_image": "imaging", "read_image_with_info": "imaging", "normalize": "imaging",
})
