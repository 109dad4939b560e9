"""Shipped weights, their checksums, and loading a YOLOv8-seg model safely and offline.

A ``.pt`` file is a pickle: loading one runs code. Shipped weights are verified against
``weights/SHA256SUMS`` before unpickling; any other file needs ``trust_weights=True``.
A model spec may also map cell types to models (``A172=a172.pt,*=small``), so that
classify-then-segment can route each field to its own model.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from livecell_ray import offline
from livecell_ray.config import DEFAULT_CONF, DEFAULT_IMGSZ
from livecell_ray.retry import one_line

SHIPPED = ("small", "big", "bt474", "mcf7")
DEFAULT_KEY = "*"
#: The model spec that gives each field its cell type's shipped model where there is one (weights/models.json:
#: ``cell_type``), small.pt otherwise; segment's default. The type is the file name's, or with --route auto
#: the one the field classifier predicts.
AUTO = "auto"
#: The shipped field cell-type classifier (weights/celltype.json: a head over the general model's cells), when
#: there is one.
CLASSIFIER = "celltype"


class WeightsError(ValueError):
    """Unknown model name, missing file or a checksum mismatch."""


def weights_dir() -> Path:
    """weights/ of the checkout (editable install, Ray working_dir) or the copy inside the wheel."""
    env = os.environ.get("LIVECELL_RAY_WEIGHTS")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parents[1]
    for cand in (package.parent / "weights", package / "_weights"):
        if (cand / "SHA256SUMS").exists():
            return cand
    return package.parent / "weights"


def sha256(path: str | Path) -> str:
    """Hex digest of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def known_checksums(directory: Path | None = None) -> dict[str, str]:
    """file name -> sha256 from weights/SHA256SUMS (``sha256sum`` format)."""
    p = (directory or weights_dir()) / "SHA256SUMS"
    out: dict[str, str] = {}
    if p.exists():
        for line in p.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                out[parts[1].lstrip("*")] = parts[0]
    return out


@dataclass(frozen=True)
class Weights:
    """A verified weights file ready to load."""

    name: str
    path: str
    sha256: str
    # Micrometres per pixel of its training data (weights/models.json for shipped files; None: not known, and
    # every field is taken to be at the model's scale).
    pixel_size: float | None = None
    # The scale it segments best at, when not its training data's: a field of known pixel size is resampled to
    # this before the network (small.pt: LIVECell's fields enlarged 832/704 times; weights/README.md).
    input_pixel_size: float | None = None
    # Its network input size (long side) when the run does not set one (see :meth:`input_size`).
    imgsz: int | None = None
    # Its confidence threshold when the run sets none (a user model's `models add --conf`).
    conf: float | None = None

    def confidence(self, requested: float | None = None) -> float:
        """The threshold a run uses: the one it asks for, else the model's own, else DEFAULT_CONF."""
        return requested if requested is not None else self.conf if self.conf is not None else DEFAULT_CONF

    @property
    def working_pixel_size(self) -> float | None:
        """The pixel size (um/px) fields are resampled to before this model's network."""
        return self.input_pixel_size or self.pixel_size

    def input_size(self, requested: int | None = None) -> int:
        """The network input a run uses: the one it asks for, else the model's own, else DEFAULT_IMGSZ."""
        return requested or self.imgsz or DEFAULT_IMGSZ


def resolve(spec: str, trust: bool = False) -> Weights:
    """'small' / 'big' / a user model's name (``livecell-ray models add``) / a path -> verified weights; raises
    :class:`WeightsError` with the reason."""
    from livecell_ray.model import registry

    wdir = weights_dir()
    sums = known_checksums(wdir)
    if spec not in SHIPPED:
        user = registry.resolve(spec)
        if user is not None:
            return user
    if spec in SHIPPED:
        path = wdir / f"{spec}.pt"
        if not path.exists():
            raise WeightsError(f"model {spec!r}: {path} is missing (see weights/README.md to train it)")
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            names = ", ".join([*SHIPPED, *registry.entries()])
            raise WeightsError(f"unknown model {spec!r}: not one of {names} and no such file")
        if path.is_dir():
            raise WeightsError(f"model {spec!r}: {path} is a folder, not a PyTorch .pt file")
        if path.suffix != ".pt":
            raise WeightsError(f"model {spec!r}: expected a PyTorch .pt file")
    digest = sha256(path)
    expected = sums.get(path.name) if path.resolve().parent == wdir.resolve() else None
    if expected is not None and expected != digest:
        raise WeightsError(f"{path}: sha256 {digest[:12]}... does not match weights/SHA256SUMS "
                           f"({expected[:12]}...); refusing to unpickle")
    if expected is None and digest not in sums.values() and not trust:
        raise WeightsError(f"{path}: not a shipped model (sha256 {digest[:12]}... unknown); "
                           f"pass --trust-weights to load your own file")
    check_checkpoint(path)
    shipped = {v: k for k, v in sums.items()}.get(digest)
    return shipped_weights(spec, path, digest, shipped, wdir)


def check_checkpoint(path: Path) -> None:
    """Refuse, naming the user's own path, a file that cannot be a PyTorch checkpoint (empty, truncated, or
    another kind of file): torch saves a zip archive, whose directory sits at its end."""
    import zipfile

    try:
        size = path.stat().st_size
        ok = size > 0 and zipfile.is_zipfile(path)
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read the weights ({exc.strerror or exc})") from None
    if not ok:
        why = "an empty file" if size == 0 else "truncated, or another kind of file"
        raise WeightsError(f"{path}: not a PyTorch checkpoint ({why})")


def shipped_weights(spec: str, path: Path, digest: str, file_name: str | None,
                    directory: Path | None = None) -> Weights:
    """Verified weights with their scale and input size from weights/models.json (none for a file of one's own)."""
    entry = (model_entries(directory).get(file_name) or {}) if file_name else {}

    def number(key: str) -> float | None:
        return float(entry[key]) if entry.get(key) else None

    imgsz = number("imgsz")
    return Weights(spec, str(path.resolve()), digest, number("pixel_size_um"), number("input_pixel_size_um"),
                   int(imgsz) if imgsz else None)


def model_entries(directory: Path | None = None) -> dict[str, Any]:
    """weights/models.json: each shipped file's scale, input size and cell type ({} where there is none)."""
    import json

    p = (directory or weights_dir()) / "models.json"
    return json.loads(p.read_text()) if p.exists() else {}


def type_models(directory: Path | None = None) -> dict[str, str]:
    """Cell type -> shipped per-type model ('MCF7': 'mcf7'), for those whose file this install has."""
    wdir = directory or weights_dir()
    return {str(e["cell_type"]): name.removesuffix(".pt") for name, e in model_entries(wdir).items()
            if isinstance(e, dict) and e.get("cell_type") and (wdir / name).exists()}


def resolve_map(spec: str, trust: bool = False) -> dict[str, Weights]:
    """'small', 'auto' (:data:`AUTO`) or 'A172=a.pt,BV2=b.pt,*=small' -> {cell type or '*': weights}."""
    if spec == AUTO:  # the user's model for a cell type wins over a shipped one (livecell-ray models add)
        from livecell_ray.model import registry

        types = {**type_models(), **registry.type_models()}
        return {DEFAULT_KEY: resolve("small"), **{t: resolve(name) for t, name in types.items()}}
    if "=" not in spec:
        return {DEFAULT_KEY: resolve(spec, trust)}
    out: dict[str, Weights] = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        if not key.strip() or not value.strip():
            raise WeightsError(f"model map {spec!r}: each entry must be CELLTYPE=MODEL")
        out[key.strip()] = resolve(value.strip(), trust)
    return out


def where() -> str:
    """This process's host, and its Ray node when inside Ray: named in errors raised on a cluster's nodes."""
    import socket

    node = ""
    try:
        import ray

        if ray.is_initialized():
            node = f", Ray node {ray.get_runtime_context().get_node_id()[:12]}"
    except Exception:  # outside Ray, or a runtime without a context
        pass
    return f"host {socket.gethostname()}{node}"


def resolve_classifier(spec: str | None, trust: bool = False) -> Weights | None:
    """The field classifier: 'celltype' (shipped; None when this install has none), a path, or None.

    A classifier's ``.json`` (``train-classifier``) is plain data and needs no ``--trust-weights``; the model
    whose cells it reads is resolved (and verified) where it is loaded. A ``.pt`` (a YOLOv8-cls network, the
    first version) is a pickle and is verified or trusted like any weights."""
    if not spec or spec == "none":
        return None
    if spec == CLASSIFIER:
        path = weights_dir() / f"{CLASSIFIER}.json"
        if not path.exists():
            return None
        expected = known_checksums().get(path.name)
        digest = sha256(path)
        if expected != digest:
            raise WeightsError(f"{path}: sha256 {digest[:12]}... does not match weights/SHA256SUMS")
        return shipped_weights(spec, path, digest, path.name)
    path = Path(spec).expanduser()
    if path.suffix == ".json":
        if not path.is_file():
            raise WeightsError(f"classifier {spec!r}: no such file")
        return Weights(path.stem, str(path.resolve()), sha256(path))
    return resolve(spec, trust)


def load(weights: Weights, task: str = "segment"):
    """An ultralytics YOLO model from verified weights, offline.

    The driver resolved and hashed the file, but this may run later and on another node (a model
    actor), where the file could differ: its bytes are read once, checked against the driver's
    checksum, and the model is unpickled from exactly those bytes (a private copy), so nothing can
    change between the check and the load.
    """
    import shutil
    import tempfile
    import weakref

    offline.configure()
    from ultralytics import YOLO

    try:
        data = Path(weights.path).read_bytes()
    except OSError as exc:
        raise WeightsError(f"{weights.path} on {where()}: cannot read the weights ({exc})") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != weights.sha256:
        raise WeightsError(f"{weights.path} on {where()}: sha256 {digest[:12]}... is not the {weights.sha256[:12]}... "
                           f"the driver checked; refusing to unpickle (the file changed, or differs on this node)")
    tmp = tempfile.mkdtemp(prefix="livecell-ray-weights-")
    try:
        private = Path(tmp) / Path(weights.path).name
        private.write_bytes(data)
        model = YOLO(str(private), task=task)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        # Named by the user's path, not the private copy it was unpickled from.
        why = one_line(exc).replace(str(private), weights.path)
        raise WeightsError(f"{weights.path}: cannot load the model ({why})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The copy lives as long as the model (ultralytics reads its checkpoint path again, e.g. to export).
    weakref.finalize(model, shutil.rmtree, tmp, True)
    if getattr(model, "task", task) != task:
        raise WeightsError(f"{weights.path}: a {model.task} model, not {task}")
    return model


def onnx_path(weights: Weights, cache: str | Path | None = None) -> Path:
    """The ONNX export of verified weights, made once by ultralytics and cached by checksum."""
    import shutil
    import tempfile

    cache = Path(cache or os.environ.get("LIVECELL_RAY_CACHE") or Path.home() / ".cache" / "livecell-ray" / "onnx")
    target = cache / f"{weights.sha256}.onnx"  # keyed by the whole checksum of the weights it came from
    stamp = cache / f"{weights.sha256}.onnx.sha256"  # the export's own checksum, written after it
    if target.exists() and stamp.exists() and stamp.read_text().strip() == sha256(target):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        pt = Path(tmp) / "model.pt"
        shutil.copyfile(weights.path, pt)
        yolo = load(Weights(weights.name, str(pt), weights.sha256))  # verified against the driver's checksum
        exported = Path(yolo.export(format="onnx", dynamic=True, simplify=True, verbose=False))
        digest = sha256(exported)
        os.replace(exported, target)  # atomic: concurrent actors never see a half-written file
        (Path(tmp) / "stamp").write_text(digest)
        os.replace(Path(tmp) / "stamp", stamp)
    return target


def onnx_session(weights: Weights):
    """An ONNX Runtime CPU session for the weights (exported on first use)."""
    import onnxruntime as ort

    try:
        path = onnx_path(weights)
    except Exception as exc:
        raise WeightsError(f"{weights.path}: ONNX export failed ({type(exc).__name__}: {exc}); "
                           f"install the 'onnx' extra or use --backend torch") from exc
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
