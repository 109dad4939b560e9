"""livecell-ray: segment phase-contrast cell plates with YOLOv8 on Ray.

Data flow: plate -> :mod:`manifest` -> shards -> :mod:`segment` (model actors) ->
:mod:`measure` -> :mod:`store` (OME-Zarr masks + Parquet tables) -> :mod:`query`.
"""

from livecell_ray import offline as _offline

_offline.configure()

__version__ = "0.2.0"

__all__ = ["__version__", "open_results"]


def open_results(out: str, storage_options: dict | None = None, copy_limit_mb: float = 1024):
    """Open a run's OUT for querying (see :mod:`livecell_ray.query`)."""
    from livecell_ray.query import open_results as _open

    return _open(out, storage_options, copy_limit_mb)
