"""The user's own models, beside the shipped ones: a name, a .pt file, its sha256, the cell type it serves, the
pixel size of its training data and its own confidence threshold, kept in one JSON file (``$LIVECELL_RAY_MODELS``, else
``$XDG_CONFIG_HOME/livecell-ray/models.json``, else ``~/.config/livecell-ray/models.json``).

Registering a file is trusting it: ``--model NAME`` then loads it without ``--trust-weights``, but only while its
bytes are those registered (a changed file is refused, as a shipped one whose checksum differs), and
``--model auto`` sends the fields of its cell type to it (a user's model wins over a shipped one of that type).
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from livecell_ray.model.models import AUTO, CLASSIFIER, SHIPPED, Weights, WeightsError, check_checkpoint, sha256

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def models_file() -> Path:
    """Where the user's models are listed (see the module)."""
    env = os.environ.get("LIVECELL_RAY_MODELS")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "livecell-ray" / "models.json"


def entries() -> dict[str, dict[str, Any]]:
    """name -> its record ({} when the user has registered none)."""
    p = models_file()
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{p}: the user models file cannot be read ({exc}); fix or remove it") from None
    return dict(data.get("models", {}))


def _write(models: dict[str, dict[str, Any]]) -> None:
    p = models_file()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"models": models}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, p)  # atomic: a reader sees the old list or the new one


def add(name: str, path: str | Path, cell_type: str | None = None, pixel_size: float | None = None,
        data: str = "", figures: str = "", conf: float | None = None) -> dict[str, Any]:
    """Register (or replace) a model under ``name``; returns its record."""
    if not _NAME.match(name):
        raise WeightsError(f"model name {name!r}: use letters, digits, '.', '_' and '-'")
    if name in (*SHIPPED, AUTO, CLASSIFIER):
        raise WeightsError(f"model name {name!r} is a shipped model's; choose another")
    if pixel_size is not None and not pixel_size > 0:
        raise WeightsError(f"--pixel-size must be a positive number of micrometres, got {pixel_size}")
    if conf is not None and not 0 < conf < 1:
        raise WeightsError(f"--conf must be a confidence threshold between 0 and 1, got {conf}")
    p = Path(path).expanduser().resolve()
    if not p.is_file() or p.suffix != ".pt":
        raise WeightsError(f"{path}: no such PyTorch .pt file")
    check_checkpoint(p)
    record = {"path": str(p), "sha256": sha256(p), "cell_type": cell_type or None, "pixel_size_um": pixel_size,
              "conf": conf, "data": data, "figures": figures,
              "added": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    models = entries()
    models[name] = record
    _write(models)
    return record


def remove(name: str) -> None:
    models = entries()
    if name not in models:
        raise WeightsError(f"no user model {name!r} (livecell-ray models list)")
    del models[name]
    _write(models)


def resolve(name: str) -> Weights | None:
    """The registered model ``name`` as verified weights (None: no such user model)."""
    record = entries().get(name)
    if record is None:
        return None
    p = Path(record["path"])
    if not p.exists():
        raise WeightsError(f"user model {name!r}: {p} is gone (livecell-ray models add {name} NEW_PATH)")
    digest = sha256(p)
    if digest != record["sha256"]:
        raise WeightsError(f"user model {name!r}: {p} has changed since it was added (sha256 {digest[:12]}..., "
                           f"registered {record['sha256'][:12]}...); refusing to unpickle: add it again if you "
                           f"trust the new file")
    check_checkpoint(p)
    px = record.get("pixel_size_um")
    conf = record.get("conf")
    return Weights(name, str(p), digest, float(px) if px else None, None, None, float(conf) if conf else None)


def type_models() -> dict[str, str]:
    """Cell type -> user model name, for the registered models that serve one."""
    return {str(r["cell_type"]): name for name, r in sorted(entries().items()) if r.get("cell_type")}
