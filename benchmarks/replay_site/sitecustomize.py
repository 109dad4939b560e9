"""benchmarks/replay.py's hook, imported by every Python process started with this folder on PYTHONPATH.

When LIVECELL_RAY_REPLAY names recorded model answers, the module that defines the model replica's actor
(``livecell_ray.model.replica``; ``livecell_ray.replica`` or ``livecell_ray.pipeline`` in older code) gets
its constructor swapped for the replaying one as it is imported; nothing is imported ahead of that. Carried by the
environment rather than a Ray runtime_env (whose workers Ray starts afresh rather than take the one it
prestarted), so the pipeline's start-up is measured as `livecell-ray segment` runs it.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

_MODULES = ("livecell_ray.model.replica", "livecell_ray.replica", "livecell_ray.pipeline")


class _ReplayFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 - the import protocol's
        if name not in _MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        load = spec.loader.exec_module

        def exec_module(module):  # noqa: ANN001, ANN202
            load(module)
            actor = getattr(module, "SegmentActor", None)
            if actor is not None and actor.__module__ == module.__name__:
                import replay  # benchmarks/, on PYTHONPATH beside this folder

                replay.patch(actor)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("LIVECELL_RAY_REPLAY"):
    sys.meta_path.insert(0, _ReplayFinder())
