"""The model side: a YOLOv8-seg network that turns batches of fields into label images.

Preprocessing is ultralytics' own (LetterBox, rect, stride 32) and so is NMS; the mask step is
our painting (:mod:`livecell_ray.model.labels`), which equals ultralytics' retina masks, each instance
evaluated inside its box only: on a CPU instance by instance, on a GPU the whole batch's instances in
a few tensor operations on the device, so no CPU core is spent on masks. Up to ``max_det`` (3,000 by
default) cells per field.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from livecell_ray.config import InferenceConfig
from livecell_ray.model import labels as labels_mod
from livecell_ray.model import models
from livecell_ray.model import tiles as tiles_mod

if TYPE_CHECKING:
    import torch


@dataclass
class Instances:
    """One field's result: label image (1..K; uint16 or uint32) and each label's class id and confidence."""

    labels: np.ndarray
    class_ids: np.ndarray
    confidences: np.ndarray


#: A pixel size from a file's own metadata may resize its field at most this much either way; beyond it the
#: metadata is taken to be wrong (a resolution tag of 1 px/cm, a PhysicalSizeX in the wrong unit) and the field
#: is refused with the reason, unless --pixel-size (or a manifest column) says the scale.
METADATA_SCALE_LIMIT = 8.0
#: No field is resampled to more pixels than this at its model's scale (4 GB of uint32 labels).
MAX_WORKING_PIXELS = 1_000_000_000


class ScaleError(ValueError):
    """A field whose pixel size would resample it beyond reason; refused before any work is done on it."""


class Segmenter:
    """Holds one network per model key (a cell type, or '*' for all) on one device."""

    def __init__(self, weights: dict[str, models.Weights], inference: InferenceConfig | None = None,
                 device: str | None = None):
        import torch

        # ultralytics' NMS uses torchvision's kernel only when torchvision is already imported, else a
        # Python loop: 17 ms a field on a CPU, and about 100 ms on an H100, where every step synchronises.
        import torchvision  # noqa: F401

        self.cfg = inference or InferenceConfig()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.half = self.cfg.half if self.cfg.half is not None else self.device.startswith("cuda")
        # ONNX Runtime hands back host arrays: its masks are always painted box-local.
        self.paint_on_device = self.cfg.backend == "torch" and (
            self.cfg.paint_on_device if self.cfg.paint_on_device is not None else self.device.startswith("cuda"))
        self.nets = {}
        self.sha256 = {key: w.sha256 for key, w in weights.items()}
        self.names = {key: w.name for key, w in weights.items()}
        self.pixel_sizes = {key: w.working_pixel_size for key, w in weights.items()}  # um/px each model works at
        self.trained_at = {key: w.pixel_size for key, w in weights.items()}  # um/px of each model's training data
        self.imgsz = {key: w.input_size(self.cfg.imgsz) for key, w in weights.items()}
        self.conf = {key: w.confidence(self.cfg.conf) for key, w in weights.items()}
        if self.cfg.backend == "onnx":
            self.device, self.half = "cpu", False
        for key, w in weights.items():
            yolo = models.load(w)
            if self.cfg.backend == "onnx":
                self.nets[key] = (models.onnx_session(w), len(yolo.names))
                continue
            net = yolo.model.fuse() if hasattr(yolo.model, "fuse") else yolo.model
            net = net.to(self.device).eval()
            if self.half:
                net = net.half()
            self.nets[key] = (net, len(yolo.names))
        self._axis: dict[tuple, labels_mod.AxisWeights] = {}  # per (proto size, image size, device)

    def model_key(self, cell_type: str) -> str:
        """Which network serves this cell type (its own, else the default)."""
        return cell_type if cell_type in self.nets else models.DEFAULT_KEY

    def name(self, cell_type: str) -> str:
        """The name of the model that serves this cell type ('small', 'mcf7', a user model's, a file's)."""
        return self.names[self.model_key(cell_type)]

    def __call__(self, images: list[np.ndarray], cell_types: list[str] | None = None,
                 pixel_sizes: list[float | None] | None = None) -> list[Instances]:
        """Segment uint8 grey fields; ``pixel_sizes[i]`` is field i's um/px (None: not known).

        Each field is resampled to its model's working scale (one of unknown pixel size is letterboxed to the
        input, or, beyond ``tiles.LETTERBOX_MAX`` times it, taken at the model's training scale); one larger
        than the network's input is cut into overlapping tiles there (:mod:`livecell_ray.model.tiles`). Whole
        fields and tiles are grouped by model and size into network batches (tiles of all fields together),
        and each field's cells come back merged into one label image of its own pixels.
        """
        n = len(images)
        cell_types = cell_types or [""] * n
        pixel_sizes = pixel_sizes or [None] * n
        units: list[tuple[str, np.ndarray, bool]] = []  # (model, image, may the letterbox enlarge it)
        # (shape at the model's scale, tiles or None, its units; or for a field streamed tile batch by tile
        # batch, its model and image at that scale)
        layout: list[tuple[tuple[int, int], list | None, list[int] | tuple[str, np.ndarray]]] = []
        chunk = max(self.max_batch, n)
        for im, ct, px in zip(images, cell_types, pixel_sizes):
            key, scale = self.field_scale(ct, px, im.shape)
            known = scale is not None
            m = tiles_mod.resample(im, scale or 1.0)
            if self.tiled(key, m.shape, known_scale=known):
                plan = self.tile_plan(key, m.shape)
                if len(plan) > chunk:  # a stitched well: its own batches, merged as they come
                    layout.append((m.shape, plan, (key, m)))
                    continue
                first = len(units)
                units += [(key, _crop(m, t), False) for t in plan]
                layout.append((m.shape, plan, list(range(first, len(units)))))
            else:
                # At a known scale a field smaller than the input is padded, never enlarged: the network sees
                # cells at its own scale. At an unknown one it is letterboxed to the input, as before.
                units.append((key, m, not known))
                layout.append((m.shape, None, [len(units) - 1]))
        res = self._segment_units(units, chunk)
        out = []
        for (shape, plan, idx), im in zip(layout, images):
            if plan is None:
                r = res[idx[0]]
                lab, conf, cls = r.labels, r.confidences, r.class_ids
            elif isinstance(idx, tuple):
                lab, conf, cls = tiles_mod.merge_stream(shape, plan, self._tile_results(*idx, plan, chunk))
            else:
                lab, conf, cls = tiles_mod.merge(shape, plan, [res[i].labels for i in idx],
                                                 [res[i].confidences for i in idx], [res[i].class_ids for i in idx])
            if shape != im.shape:
                lab, conf, cls = tiles_mod.map_back(lab, conf, cls, im.shape)
            out.append(Instances(lab, cls, conf))
        return out

    @property
    def max_batch(self) -> int:
        """Fields or tiles a network batch holds at most (InferenceConfig.max_batch)."""
        return self.cfg.max_batch or (64 if self.device.startswith("cuda") else 4)

    def _tile_results(self, key: str, image: np.ndarray, plan: list, chunk: int
                      ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """One field's tiles cut, segmented and handed on a network batch at a time, in the plan's order."""
        for a in range(0, len(plan), chunk):
            for r in self._predict_same_size(key, [_crop(image, t) for t in plan[a:a + chunk]], False):
                yield r.labels, r.confidences, r.class_ids

    def check_scale(self, cell_type: str, pixel_size: float | None, shape: tuple[int, ...],
                    from_metadata: bool = False) -> None:
        """Refuse, before any work, a field whose pixel size would resample it beyond reason: one from the file's
        own metadata more than :data:`METADATA_SCALE_LIMIT` times from the model's either way (a wrong OME
        PhysicalSizeX or TIFF resolution tag, not the optics: ``--pixel-size`` overrides it), or any that would
        make more than :data:`MAX_WORKING_PIXELS` pixels. Raises :class:`ScaleError`, naming scale and size."""
        key, scale = self.field_scale(cell_type, pixel_size, shape)
        if scale is None:
            return
        model = self.pixel_sizes[key]
        if from_metadata and not 1 / METADATA_SCALE_LIMIT <= scale <= METADATA_SCALE_LIMIT:
            raise ScaleError(f"its metadata says {pixel_size:g} um/px, {scale:.3g}x the model's {model:g} um/px "
                             f"(more than {METADATA_SCALE_LIMIT:g}x either way): refused as a wrong scale; give "
                             f"--pixel-size UM if it is right")
        h, w = tiles_mod.resampled_shape(tuple(shape[-2:]), scale)
        if h * w > MAX_WORKING_PIXELS:
            raise ScaleError(f"at {pixel_size:g} um/px its {shape[-1]}x{shape[-2]} px would be resampled "
                             f"{scale:.3g}x to {w}x{h} px at the model's {model:g} um/px, more than "
                             f"{MAX_WORKING_PIXELS:,} pixels")

    def field_scale(self, cell_type: str, pixel_size: float | None, shape: tuple[int, ...]
                    ) -> tuple[str, float | None]:
        """(model, how much the field is resized to reach that model's working scale; None: letterboxed)."""
        key = self.model_key(cell_type)
        scale = self.scale(key, pixel_size)
        if scale is None and self.tiled(key, shape, known_scale=False):
            # Too large to letterbox: taken to be at its model's training scale, and tiled at the working one
            # (small.pt: enlarged 1.18x, as a letterboxed LIVECell field is).
            scale = self.scale(key, self.trained_at[key])
        return key, scale

    def tiling(self, cell_type: str, pixel_size: float | None, shape: tuple[int, int]
               ) -> tuple[str, float, tuple[int, int], list[tiles_mod.Tile]]:
        """How a field too large to hold whole is segmented (pipeline.stream): its model, scale, shape at that
        scale (as :func:`tiles.resample` makes it) and tile plan, by the rules :meth:`__call__` follows."""
        key, scale = self.field_scale(cell_type, pixel_size, shape)
        scale = scale or 1.0
        working = tiles_mod.resampled_shape(shape, scale)
        return key, scale, working, self.tile_plan(key, working)

    def tile_plan(self, key: str, shape: tuple[int, int]) -> list[tiles_mod.Tile]:
        """The tiles of a field of this shape at model ``key``'s working scale: its input, overlapping by
        ``tile_overlap`` (a quarter of the input when unset)."""
        size = self.imgsz[key]
        return tiles_mod.plan(shape, size, self.cfg.tile_overlap or size // 4)

    def tile_batch(self, key: str, tiles: list[np.ndarray]) -> list[Instances]:
        """Tiles of one size at the working scale of model ``key``, through the network in batches of
        :attr:`max_batch`: each tile's own label image, class ids and confidences."""
        out: list[Instances] = []
        for a in range(0, len(tiles), self.max_batch):
            out += self._predict_same_size(key, tiles[a:a + self.max_batch], False)
        return out

    def tiled(self, key: str, shape: tuple[int, ...], known_scale: bool) -> bool:
        """Whether a field (at the model's scale) is cut into tiles rather than letterboxed whole.

        At a known scale, whenever it is larger than the input. At an unknown one, only beyond
        ``tiles.LETTERBOX_MAX`` times the input: up to there it is letterboxed, as before scales were known,
        and loses at most a third of its resolution.
        """
        limit = self.imgsz[key] * (1.0 if known_scale else tiles_mod.LETTERBOX_MAX)
        return max(shape) > limit

    def scale(self, key: str, pixel_size: float | None) -> float | None:
        """How much a field of this pixel size is resized to reach the model's working scale; None when either
        is unknown."""
        model = self.pixel_sizes.get(key)
        return pixel_size / model if pixel_size and model else None

    def _segment_units(self, units: list[tuple[str, np.ndarray, bool]], chunk: int) -> list[Instances]:
        """Whole fields or tiles, grouped by model and size into network batches of at most ``chunk``."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (key, im, scaleup) in enumerate(units):
            groups[(key, im.shape, scaleup)].append(i)
        out: list[Instances | None] = [None] * len(units)
        for (key, _, scaleup), idx in groups.items():
            for a in range(0, len(idx), chunk):
                part = idx[a:a + chunk]
                for i, res in zip(part, self._predict_same_size(key, [units[i][1] for i in part], scaleup)):
                    out[i] = res
        return out  # type: ignore[return-value]

    def forward(self, key: str, images: list[np.ndarray], scaleup: bool = True):
        """Letterbox, run the network and NMS; returns (input tensor, detections, prototypes)."""
        x, preds, protos = self.network(key, images, scaleup)
        return x, self.nms(key, preds), protos

    def network(self, key: str, images: list[np.ndarray], scaleup: bool = True):
        """Letterbox and run the network: (input tensor, raw predictions, prototypes)."""
        import torch

        net, _ = self.nets[key]
        x = letterbox(images, self.imgsz[key], self.device, scaleup)
        x = x.half() if self.half else x.float()
        x /= 255.0
        with torch.inference_mode():
            if self.cfg.backend == "onnx":
                preds, protos = (torch.from_numpy(a) for a in net.run(None, {"images": x.numpy()}))
            else:
                preds, protos = net(x)[0]
        return x, preds, protos

    def nms(self, key: str, preds) -> list:
        """ultralytics' NMS (torchvision's kernel) over the network's raw predictions, per field."""
        import torch
        from ultralytics.utils.nms import non_max_suppression

        with torch.inference_mode():
            return non_max_suppression(preds, self.conf[key], self.cfg.iou, max_det=self.cfg.max_det,
                                       nc=self.nets[key][1], max_nms=max(30000, 10 * self.cfg.max_det),
                                       max_time_img=60.0)

    def _predict_same_size(self, key: str, images: list[np.ndarray], scaleup: bool = True) -> list[Instances]:
        x, dets, protos = self.forward(key, self.network_batch(images), scaleup)
        return self.paint(x.shape[2:], dets, protos, len(images), images[0].shape)

    def network_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """What the network sees for these fields: the fields, then with TTA their left-right and
        top-bottom mirror images, in the same batch."""
        if not self.cfg.tta:
            return images
        return [*images, *(np.ascontiguousarray(im[:, ::-1]) for im in images),
                *(np.ascontiguousarray(im[::-1]) for im in images)]

    def paint(self, input_hw: tuple[int, int], dets: list[torch.Tensor], protos: torch.Tensor, n: int,
              shape: tuple[int, int]) -> list[Instances]:
        """Label images of the batch's first n fields from :meth:`forward`'s output (with TTA, the rest of
        the batch are their mirror images); on the device or box-local, as configured."""
        from ultralytics.utils import ops

        h, w = shape
        boxes = [ops.scale_boxes(input_hw, d[:, :4].float().clone(), (h, w)) for d in dets]
        twins = [self._twins(i, n, boxes, dets, (h, w)) for i in range(n)]
        if self.paint_on_device:
            return self._paint_on_device(dets[:n], boxes[:n], protos, twins, (h, w))
        results = []
        axis = self.axis_weights(protos.shape[2:], (h, w))
        for det, box, proto, tw in zip(dets[:n], boxes[:n], protos[:n], twins):
            conf = det[:, 4].float().cpu().numpy()
            cls = det[:, 5].cpu().numpy().astype(np.int16)
            mir = tuple(labels_mod.Mirror(protos[j].float().cpu().numpy(), coeffs.float().cpu().numpy(),
                                          matched.cpu().numpy(), ax) for ax, j, coeffs, matched in tw)
            lab, kept = labels_mod.paint(proto.float().cpu().numpy(), det[:, 6:].float().cpu().numpy(),
                                         box.cpu().numpy(), conf, (h, w), axis, self.cfg.mask_threshold, mir)
            results.append(Instances(lab, cls[kept], conf[kept].astype(np.float32)))
        return results

    def _twins(self, i: int, n: int, boxes: list, dets: list, shape: tuple[int, int]) -> list[tuple]:
        """Field i's mirrored passes (TTA) as (axis, batch index of the pass, each instance's twin's
        coefficients, whether it has a twin), matched by box IoU; [] without TTA."""
        import torch
        from torchvision.ops import box_iou

        if not self.cfg.tta:
            return []
        h, w = shape
        out = []
        for axis, j in ((1, n + i), (0, 2 * n + i)):
            b = boxes[j]
            back = (torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1) if axis == 1
                    else torch.stack([b[:, 0], h - b[:, 3], b[:, 2], h - b[:, 1]], 1))
            coeffs = torch.zeros_like(dets[i][:, 6:])
            matched = torch.zeros(len(dets[i]), dtype=torch.bool, device=coeffs.device)
            if len(back) and len(dets[i]):
                best, twin = box_iou(boxes[i], back).max(1)
                matched = best >= self.cfg.tta_match_iou
                coeffs = dets[j][twin, 6:]
            out.append((axis, j, coeffs, matched))
        return out

    def _paint_on_device(self, dets, boxes, protos, twins, shape: tuple[int, int]) -> list[Instances]:
        """Paint every field of the batch on the device in one :func:`labels.paint_batch`, then bring the
        batch back in one copy per array.

        Each copy to the host waits for the GPU: once a batch, not four times a field. Labels come back
        as uint16 when max_det allows (half the bytes; int16 on the device, the same bits).
        """
        import torch

        n = len(dets)
        det = torch.cat(dets).float()
        field = torch.cat([torch.full((len(d),), i, dtype=torch.int64, device=det.device) for i, d in enumerate(dets)])
        # Field i's mirrored passes (TTA) are batch planes i + n and i + 2n: field 0's plane is the offset.
        mirrors = tuple(labels_mod.BatchMirror(field + offset, torch.cat([tw[k][2] for tw in twins]).float(),
                                               torch.cat([tw[k][3] for tw in twins]), axis)
                        for k, (axis, offset, _, _) in enumerate(twins[0]))
        weights = self.axis_weights(protos.shape[2:], shape, protos.device)
        labs, kept = labels_mod.paint_batch(protos, field, det[:, 6:], torch.cat(boxes), det[:, 4], n, shape,
                                            weights, self.cfg.mask_threshold, mirrors)
        small = self.cfg.max_det < 2**15
        stacked = labs.to(torch.int16 if small else torch.int32).cpu().numpy()
        stacked = stacked.view(np.uint16) if small else stacked.astype(np.uint32)
        kept_field = field[kept]
        counts = torch.bincount(kept_field, minlength=n).cpu().numpy()
        conf_np = det[kept, 4].cpu().numpy().astype(np.float32)
        cls_np = det[kept, 5].cpu().numpy().astype(np.int16)
        bounds = np.cumsum([0, *counts])
        return [Instances(stacked[i], cls_np[bounds[i]:bounds[i + 1]], conf_np[bounds[i]:bounds[i + 1]])
                for i in range(n)]

    def axis_weights(self, proto_hw: tuple[int, int], shape: tuple[int, int],
                     device: Any = None) -> labels_mod.AxisWeights:
        """Cached per (prototype size, image size, device): one plate usually has a single size."""
        key = (tuple(proto_hw), tuple(shape), None if device is None else str(device))
        if key not in self._axis:
            self._axis[key] = (labels_mod.axis_weights(tuple(proto_hw), tuple(shape)) if device is None
                               else labels_mod.axis_weights_on(self.axis_weights(proto_hw, shape), device))
        return self._axis[key]


def _crop(image: np.ndarray, t: tiles_mod.Tile) -> np.ndarray:
    """One tile of the image, as its own contiguous array."""
    return np.ascontiguousarray(image[t.y:t.y + t.h, t.x:t.x + t.w])


def letterbox(images: list[np.ndarray], imgsz: int, device: str, scaleup: bool = True):
    """ultralytics' LetterBox (auto, stride 32) of same-size grey fields, as a (B, 3, H, W) uint8 tensor.

    Pixel for pixel what LetterBox gives for the fields as RGB, with a third of the work: a grey plane is
    resized once (cv2, LetterBox's interpolation; channels are resized independently, so three equal ones
    stay equal) and only where it needs it (LIVECell's 704x520 at imgsz 704 only gets 12 rows of
    padding); the planes go to the device as they are and are padded and widened to 3 channels there.
    """
    import cv2
    import torch
    import torch.nn.functional as F
    from ultralytics.data.augment import LetterBox

    lb = LetterBox((imgsz, imgsz), auto=True, stride=32, scaleup=scaleup)
    h, w = images[0].shape
    p = lb.get_params({"img": images[0]})
    size = tuple(p["new_unpad"])
    if size != (w, h):
        images = [cv2.resize(im, size, interpolation=lb.interpolation) for im in images]
    g = torch.from_numpy(np.stack(images)).to(device)
    g = F.pad(g, (p["left"], p["right"], p["top"], p["bottom"]), value=lb.padding_value)
    return g.unsqueeze(1).expand(-1, 3, -1, -1)
