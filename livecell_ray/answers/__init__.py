"""What finished outputs answer: DuckDB views and per-well aggregates (``query``), growth rates and doubling
times (``growth``), dose-response fits (``dose_response``), the HTML plate report (``report``) and exports in
other tools' shapes (``export``: CytoTable/pycytominer, Incucyte).

May import: config, store, plate (well names, plate maps). Never Ray, torch or the model side: a query on a
laptop reads Parquet and Zarr only (tests/test_layers.py checks it in a fresh process).
"""

from livecell_ray import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "Results": "query", "open_results": "query", "growth_table": "growth", "dose_response_table": "dose_response",
})
