"""Decode images from any fsspec URL into one 2-D plane, with the file's own metadata.

The plane's normalisation for the model (one way, shared by training and inference) is
:mod:`livecell_ray.plate.normalize`, re-exported here.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from livecell_ray.plate.normalize import SAMPLE_ABOVE, normalize, normalizer, to_rgb  # noqa: F401 (re-exported)


class ImageError(ValueError):
    """A file that cannot become a 2-D phase-contrast field; the message names file and reason."""


class PlaneError(ImageError):
    """A multi-plane file read without saying which plane is the field (or a plane it does not have): the
    whole plate is usually exported so, so a run checks its first file before it writes anything."""


@dataclass(frozen=True)
class Planes:
    """Which plane of a multi-plane file is the field: a channel (index or OME name) and/or a stack plane.

    A file of several planes that are not the colours of one RGB picture (channels, a time-lapse, a
    z-stack) is never averaged into one: without a choice here it is refused, naming the flags.
    """

    channel: str | None = None  # "0", "1"... or an OME channel name ("Phase")
    plane: int | None = None  # the index along the stack axis (--stack-axis t: one timepoint a plane)


@dataclass
class ImageInfo:
    """What the file says about itself: pixel size (um/px, None when it does not say), axes, channel names."""

    pixel_size: float | None = None
    axes: str = "YX"
    shape: tuple[int, ...] = ()
    channels: tuple[str, ...] = ()
    interval_h: float | None = None  # hours between timepoints (OME TimeIncrement), when recorded


def decode(data: bytes, path: str, max_pixels: int = 64_000_000, planes: Planes | None = None) -> np.ndarray:
    """Decode TIFF/PNG/JPEG bytes into one 2-D plane, with clear errors."""
    return decode_with_info(data, path, max_pixels, planes)[0]


def decode_with_info(data: bytes, path: str, max_pixels: int = 64_000_000, planes: Planes | None = None
                     ) -> tuple[np.ndarray, ImageInfo]:
    """:func:`decode`, plus what the file's metadata says (OME-XML, ImageJ and TIFF resolution tags)."""
    if len(data) == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    head = data[:8]
    info = ImageInfo()
    try:
        if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            try:
                arr, info = _decode_tiff(data, path, max_pixels, planes or Planes())
            except ImageError:
                raise
            except Exception as exc:
                # tifffile needs imagecodecs for LZW and most other compressions; Pillow reads the
                # common ones (LZW, deflate, packbits) natively, so a lean install still reads them.
                try:
                    arr = _decode_pil(data, path, max_pixels)
                except Exception:
                    raise exc from None
        else:
            arr = _decode_pil(data, path, max_pixels)
    except ImageError:
        raise
    except Exception as exc:  # every decoder has its own exception zoo
        raise ImageError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    return to_gray(arr, path, max_pixels), info


STACK_FLAGS = ("--channel N (or a channel name) picks one plane of a multi-channel file; "
               "--stack-axis t --interval HOURS reads each plane of a time-lapse stack as a timepoint")


def _decode_tiff(data: bytes, path: str, max_pixels: int, planes: Planes) -> tuple[np.ndarray, ImageInfo]:
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        series = tif.series[0]
        shapes = list(dict.fromkeys(tuple(s.shape) for s in tif.series))
        if len(shapes) > 1 and planes.plane is None and planes.channel is None:
            # A thumbnail or preview page beside the field, or pages of different images: never guessed at.
            raise ImageError(f"{path}: holds {len(tif.series)} images of different sizes "
                             f"({', '.join('x'.join(map(str, sh)) for sh in shapes)}): not one field or a stack of "
                             f"equal planes (a thumbnail or preview beside it?); export the field alone")
        n = int(np.prod(series.shape))
        if n > max_pixels * 4 and planes.plane is None and planes.channel is None:
            raise ImageError(f"{path}: image of {n} values exceeds the limit of {max_pixels} pixels")
        info = tiff_info(tif)
        page = series.pages[0] if series.pages else tif.pages[0]
        colour = int(getattr(page, "photometric", 1)) in (2, 3, 6)  # RGB, palette, YCbCr: one picture
        colour = colour and planes.channel is None and planes.plane is None  # unless a plane of it is asked for
        extra = [i for i, a in enumerate(series.axes) if a not in "YX" and not (a == "S" and colour)
                 and series.shape[i] > 1]
        if int(getattr(page, "photometric", 1)) == 3 and getattr(page, "colormap", None) is not None:
            # A palette image: its pixels are indices into the colormap, not intensities.
            return _palette_rgb(series.asarray(), page.colormap, path), info
        if not extra and len(tif.pages) == 1:
            # One image (the usual microscope export): libtiff decodes it in half tifffile's time (1.25 vs
            # 2.7 ms a LIVECell field); its answer is kept only when it is the series tifffile describes.
            try:
                arr = _libtiff_decode(data)
            except Exception:
                arr = None
            if arr is not None and arr.shape == tuple(series.shape) and arr.dtype == series.dtype:
                return arr, info
        arr = series.asarray()
        if extra:
            arr = _select_plane(arr, series.axes, extra, info, planes, path)
        elif planes.channel not in (None, "0") or planes.plane not in (None, 0):
            raise PlaneError(f"{path}: holds one plane ({series.axes} {tuple(series.shape)}), but "
                             f"{'--channel ' + str(planes.channel) if planes.channel not in (None, '0') else ''}"
                             f"{'--stack-axis plane ' + str(planes.plane) if planes.plane not in (None, 0) else ''}"
                             f" asks for another")
        return arr, info


def _palette_rgb(index: np.ndarray, colormap: np.ndarray, path: str) -> np.ndarray:
    """A palette TIFF's pixels through its colormap (3 x 2**bits): the RGB picture it shows."""
    lut = np.moveaxis(np.asarray(colormap), 0, -1)
    if index.max(initial=0) >= len(lut):
        raise ImageError(f"{path}: palette index {int(index.max())} beyond its colormap of {len(lut)} entries")
    return lut[index]


def _select_plane(arr: np.ndarray, axes: str, extra: list[int], info: ImageInfo, planes: Planes,
                  path: str) -> np.ndarray:
    """The one plane the flags name, out of a file with several (channels C, time T, or unnamed S/I/Q/Z)."""
    shape = f"{axes} {tuple(arr.shape)}"
    index: dict[int, int] = {}
    if planes.channel is not None:
        ax = next((i for i in extra if axes[i] == "C"), None)
        if ax is None:
            ax = next((i for i in extra if axes[i] in "SIQ"), None) if len(extra) == 1 else None
        if ax is None:
            raise PlaneError(f"{path}: --channel {planes.channel}: the file has no channel axis ({shape})")
        names = list(info.channels)
        c = planes.channel
        k = int(c) if c.lstrip("-").isdigit() else (names.index(c) if c in names else None)
        if k is None:
            raise PlaneError(f"{path}: --channel {c}: no channel of that name (channels: "
                             f"{', '.join(names) or 'unnamed'}; or give an index 0-{arr.shape[ax] - 1})")
        if not 0 <= k < arr.shape[ax]:
            raise PlaneError(f"{path}: --channel {c} is out of range: the file has {arr.shape[ax]} channels "
                             f"({shape})")
        index[ax] = k
    if planes.plane is not None:
        ax = time_axis(axes, [i for i in extra if i not in index])
        if ax is None:
            raise PlaneError(f"{path}: --stack-axis t: no single time axis among {shape}")
        if not 0 <= planes.plane < arr.shape[ax]:
            raise PlaneError(f"{path}: plane {planes.plane} asked for, the stack has {arr.shape[ax]} ({shape})")
        index[ax] = planes.plane
    left = [i for i in extra if i not in index]
    if left:
        raise PlaneError(f"{path}: holds {int(np.prod([arr.shape[i] for i in extra]))} planes ({shape}), "
                         f"never averaged into one field: {STACK_FLAGS}")
    sl = tuple(index.get(i, slice(None)) for i in range(arr.ndim))
    return arr[sl]


def time_axis(axes: str, candidates: list[int]) -> int | None:
    """Which of a file's plane axes is its time axis: T, else the only one when it is unnamed (S, I, Q) or Z."""
    ax = next((i for i in candidates if axes[i] == "T"), None)
    if ax is None and len(candidates) == 1 and axes[candidates[0]] in "SIQZ":
        ax = candidates[0]
    return ax


def tiff_info(tif: Any) -> ImageInfo:
    """Pixel size, channel names and time increment from OME-XML (tifffile's parser), ImageJ metadata or
    resolution tags."""
    import tifffile

    series = tif.series[0]
    info = ImageInfo(axes=series.axes, shape=tuple(series.shape))
    if tif.is_ome and tif.ome_metadata:
        try:
            ome = tifffile.xml2dict(tif.ome_metadata)["OME"]
            image = ome["Image"][0] if isinstance(ome["Image"], list) else ome["Image"]
            px = image["Pixels"]
            ch = px.get("Channel", [])
            ch = ch if isinstance(ch, list) else [ch]
            info.channels = tuple(str(c.get("Name", "")) for c in ch if isinstance(c, dict))
            if "PhysicalSizeX" in px:
                info.pixel_size = float(px["PhysicalSizeX"]) * _UNIT_UM.get(str(px.get("PhysicalSizeXUnit", "µm")), 0)
            if "TimeIncrement" in px:
                unit = _UNIT_H.get(str(px.get("TimeIncrementUnit", "s")))
                info.interval_h = float(px["TimeIncrement"]) * unit if unit else None
        except (KeyError, TypeError, ValueError, IndexError):
            pass
    if info.pixel_size is None:
        info.pixel_size = _resolution_um(tif)
    if info.pixel_size is not None and not (info.pixel_size > 0):
        info.pixel_size = None
    return info


#: Length units (OME's spellings) in micrometres.
_UNIT_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
#: Time units (OME's spellings) in hours.
_UNIT_H = {"s": 1 / 3600, "ms": 1 / 3.6e6, "min": 1 / 60, "h": 1.0}


def _resolution_um(tif: Any) -> float | None:
    """um/px from the TIFF XResolution tag when its unit is real: centimetres, or ImageJ's micron. An inch
    unit is nearly always a default of 72 or 96 dpi, not the optics, and is ignored."""
    page = tif.pages[0]
    tag = page.tags.get("XResolution")
    if tag is None:
        return None
    num, den = tag.value
    if not num or not den:
        return None
    per_unit = num / den  # pixels per unit
    unit = int(page.tags["ResolutionUnit"].value) if "ResolutionUnit" in page.tags else 2
    ij = tif.imagej_metadata or {}
    if ij.get("unit") in ("micron", "um", "\\u00B5m", "µm"):
        return 1.0 / per_unit
    if unit == 3:  # centimetre
        return 1e4 / per_unit
    return None


def _libtiff_decode(data: bytes) -> np.ndarray:
    import imagecodecs

    return imagecodecs.tiff_decode(data)


def _decode_pil(data: bytes, path: str, max_pixels: int) -> np.ndarray:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = max_pixels
    with Image.open(io.BytesIO(data)) as im:
        if im.width * im.height > max_pixels:
            raise ImageError(f"{path}: image of {im.width}x{im.height} exceeds the limit of {max_pixels} pixels")
        if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            # Palette indices, ink densities or other colour spaces are not intensities: the picture as RGB.
            im = im.convert("RGB")
        elif im.mode == "LA":
            im = im.convert("L")
        return np.asarray(im)


def to_gray(arr: np.ndarray, path: str = "<array>", max_pixels: int = 64_000_000) -> np.ndarray:
    """Reduce to one 2-D plane: RGB(A) by luminance, singleton axes squeezed; reject stacks."""
    arr = np.asarray(arr)
    while arr.ndim > 2 and 1 in arr.shape:  # drop singleton axes (TZCYX stacks of one plane)
        arr = np.squeeze(arr, axis=arr.shape.index(1))
    rgb = None
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] > 4:
        rgb = arr[..., :3]
    elif arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] > 4:
        rgb = np.moveaxis(arr[:3], 0, -1)
    if rgb is not None:
        if not _grey_picture(rgb):
            raise PlaneError(f"{path}: holds {arr.shape} whose planes differ: not a grey field saved as RGB, and "
                             f"never averaged into one field: {STACK_FLAGS}")
        arr = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if arr.ndim != 2:
        raise ImageError(f"{path}: expected a 2-D image (or RGB), got an array of shape {arr.shape}")
    if arr.shape[0] < 16 or arr.shape[1] < 16:
        raise ImageError(f"{path}: image of {arr.shape[1]}x{arr.shape[0]} px is too small to segment")
    if arr.size > max_pixels:
        raise ImageError(f"{path}: image of {arr.shape[1]}x{arr.shape[0]} px exceeds the limit of "
                         f"{max_pixels} pixels")
    if arr.dtype.kind not in "uif" and arr.dtype != bool:
        raise ImageError(f"{path}: unsupported pixel type {arr.dtype}")
    finite = arr
    if arr.dtype.kind == "f":
        ok = np.isfinite(arr)
        if not ok.all():
            if not ok.any():
                raise ImageError(f"{path}: no finite pixel (every pixel is NaN or infinite); nothing to segment")
            finite = arr[ok]  # NaN and inf pixels are left out of the normalisation (normalizer)
    lo, hi = finite.min(), finite.max()
    if lo == hi:  # a blank frame (shutter, focus or camera failure) has nothing to segment
        raise ImageError(f"{path}: blank image (every pixel is {lo.item()}); nothing to segment")
    return arr


def _grey_picture(rgb: np.ndarray) -> bool:
    """Whether an RGB array is a picture of one grey field (equal, or tinted: perfectly correlated planes)
    rather than three planes of different things (channels, timepoints) stored as colours."""
    x = rgb[::4, ::4].reshape(-1, 3).astype(np.float64)
    if (x[:, 0] == x[:, 1]).all() and (x[:, 1] == x[:, 2]).all():
        return True
    sd = x.std(axis=0)
    if (sd == 0).any():
        return bool((sd == 0).all())
    r = np.corrcoef(x.T)
    return bool(r[np.triu_indices(3, 1)].min() >= 0.99)


def read_image(url: str, storage_options: dict[str, Any] | None = None,
               max_pixels: int = 64_000_000, planes: Planes | None = None) -> np.ndarray:
    """Read one image through fsspec; raise :class:`ImageError` naming the file on any failure."""
    return read_image_with_info(url, storage_options, max_pixels, planes)[0]


class TooLarge(Exception):
    """A file of ``stream_bytes`` or more: not read whole, but a band of rows at a time (pipeline.stream)."""

    def __init__(self, url: str, size: int):
        super().__init__(f"{url}: {size} bytes")
        self.url, self.size = url, size


def read_image_with_info(url: str, storage_options: dict[str, Any] | None = None, max_pixels: int = 64_000_000,
                         planes: Planes | None = None, stream_bytes: int | None = None
                         ) -> tuple[np.ndarray, ImageInfo]:
    """:func:`read_image`, plus the file's own metadata (pixel size, axes, channel names).

    ``stream_bytes``: a file at least this large raises :class:`TooLarge` before anything is read (its size
    comes with the open file: no request more).
    """
    from livecell_ray.retry import retry

    def fetch() -> bytes | int:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            size = getattr(f, "size", None)
            if stream_bytes and size is not None and size >= stream_bytes:
                return int(size)
            return f.read()

    try:
        data = retry(fetch)  # object-store hiccups are retried with backoff
    except FileNotFoundError as exc:
        raise ImageError(f"{url}: file not found") from exc
    except PermissionError as exc:
        raise ImageError(f"{url}: permission denied") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"{url}: is a directory") from exc
    except OSError as exc:
        raise ImageError(f"{url}: cannot read ({type(exc).__name__}: {exc})") from exc
    if isinstance(data, int):
        raise TooLarge(url, data)
    return decode_with_info(data, url, max_pixels, planes)
