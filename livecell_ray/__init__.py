"""livecell-ray: segment phase-contrast cell plates with YOLOv8 on Ray.

Data flow: plate -> :mod:`manifest` -> shards -> :mod:`segment` (model actors) ->
:mod:`measure` -> :mod:`store` (OME-Zarr masks + Parquet tables) -> :mod:`query`.
"""

from livecell_ray import offline as _offline

_offline.configure()

__version__ = "0.1.0"

__all__ = ["__version__"]
