"""livecell-ray: segment phase-contrast cell plates with YOLOv8 on Ray.

The package reads as the data flow, one folder a stage:

    plate/      a plate's files -> a manifest of fields (names, layouts, plate maps, pixel decoding)
    pipeline/   the run: Ray's start-up and model replicas, the shard task, the driver's loop and watchdog
    model/      the networks: weights, segmentation, tiles, label painting, the replica actor, the classifier
    measure.py  per-cell and per-field measurements
    store/      OME-Zarr masks, Parquet tables, commits, compaction
    answers/    what finished outputs answer: queries, growth, dose-response, the HTML report
    training/   training and evaluation, never imported by a segmentation run

``cli`` (the ``livecell-ray`` command), ``config`` (every setting, typed), ``offline`` and ``retry`` sit
beside them. Each folder's ``__init__`` says what it may import; tests/test_layers.py checks it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable
from typing import Any

from livecell_ray import offline as _offline

_offline.configure()

__version__ = "0.4.0"

__all__ = ["__version__", "open_results"]


def open_results(out: str, storage_options: dict | None = None, copy_limit_mb: float = 1024):
    """Open a run's OUT for querying (see :mod:`livecell_ray.answers.query`)."""
    from livecell_ray.answers.query import open_results as _open

    return _open(out, storage_options, copy_limit_mb)


def lazy_exports(package: str, exports: dict[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """A stage folder's ``__getattr__``, ``__dir__`` and ``__all__`` for names re-exported from its modules
    (``exports``: name -> module), imported on first use (PEP 562): importing a folder for one of its modules
    (a shard worker for the imaging module, say) then costs nothing of the others (pandas, torch)."""
    clash = set(exports) & set(exports.values())
    if clash:  # a submodule's name as an export would be replaced by the module once it is imported
        raise ValueError(f"{package}: {sorted(clash)} are modules and exports at once")

    def __getattr__(name: str) -> Any:  # noqa: N807 - PEP 562's name
        mod = exports.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{mod}"), name)

    def __dir__() -> list[str]:  # noqa: N807
        return sorted(set(exports) | set(sys.modules[package].__dict__))

    return __getattr__, __dir__, sorted(exports)


#: Modules moved into stage folders after 0.2.0: their old paths import the new module, with a warning,
#: for one more release (CHANGELOG.md).
MOVED = {
    **dict.fromkeys(("manifest", "layouts", "platemap", "imaging"), "plate"),
    **dict.fromkeys(("models", "segment", "tiles", "labels", "replica", "classify"), "model"),
    **dict.fromkeys(("query", "growth", "dose_response", "report"), "answers"),
    **dict.fromkeys(("train", "dataset", "copypaste", "pseudolabel", "evaluate"), "training"),
    **dict.fromkeys(("stream", "jobs", "credentials"), "pipeline"),
    "compact": "store",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import livecell_ray.query`` (an old path) gives ``livecell_ray.answers.query`` itself, not a copy."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        parent, _, name = fullname.rpartition(".")
        if parent != __name__ or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> Any:
        name = spec.name.rpartition(".")[2]
        new = f"{__name__}.{MOVED[name]}.{name}"
        warnings.warn(f"{spec.name} is now {new}; the old path goes after the next release", DeprecationWarning,
                      stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module: Any) -> None:
        """The module is the new one, executed already."""


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())


def __getattr__(name: str) -> Any:
    """``livecell_ray.query`` (an old module path) as an attribute: the moved module, with the same warning."""
    if name in MOVED:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
