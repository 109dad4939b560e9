"""Decoding 8-bit, 16-bit and RGB inputs, and the shared normalisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from livecell_ray.plate import imaging
from livecell_ray.plate.imaging import ImageError, decode, normalize, read_image

from .conftest import EXAMPLES

A172 = EXAMPLES / "A172_Phase_A7_1_00d00h00m_1.tif"


def test_real_livecell_tif_reads_as_uint8_2d():
    img = read_image(str(A172))
    assert img.shape == (520, 704) and img.dtype == np.uint8


def test_uint16_and_rgb_normalise_like_uint8():
    g8 = read_image(str(A172))
    buf16 = io.BytesIO()
    tifffile.imwrite(buf16, g8.astype(np.uint16) * 257 + 3)
    g16 = decode(buf16.getvalue(), "x16.tif")
    assert g16.dtype == np.uint16
    rgb = io.BytesIO()
    Image.fromarray(np.repeat(g8[..., None], 3, 2)).save(rgb, format="PNG")
    grgb = decode(rgb.getvalue(), "rgb.png")
    assert grgb.shape == g8.shape
    n8, n16, nrgb = normalize(g8), normalize(g16), normalize(grgb)
    assert np.abs(n8.astype(int) - n16.astype(int)).max() <= 1
    assert np.abs(n8.astype(int) - nrgb.astype(int)).max() <= 1


def test_normalize_percentiles_and_constant_image():
    x = np.arange(10000, dtype=np.float32).reshape(100, 100)
    y = normalize(x)
    assert y.dtype == np.uint8 and y.min() == 0 and y.max() == 255
    assert np.all(normalize(np.full((50, 50), 7, np.uint16)) == 0)


@pytest.mark.parametrize("dtype,top,shape", [(np.uint8, 255, (520, 704)), (np.uint16, 4095, (300, 200)),
                                               (np.uint16, 65535, (1100, 1000)), (np.uint8, 40, (1024, 1030))])
def test_integer_images_take_the_histogram_path_with_the_float_path_s_result(dtype, top, shape):
    """The lookup-table path (integer images) gives exactly the per-pixel float scaling, percentiles
    included, also where percentiles come from a subsample (over a million pixels) that misses the maximum."""
    from livecell_ray.config import NormalizeConfig

    rng = np.random.default_rng(7)
    img = rng.gamma(2.0, top / 8, shape).clip(0, top).astype(dtype)
    img[1, 1] = top  # off the ::4 subsample: must still map like the float path (to 255)
    for cfg in (NormalizeConfig(), NormalizeConfig(0.0, 100.0), NormalizeConfig(5.0, 95.0)):
        fast, reference = normalize(img, cfg), normalize(img.astype(np.float32), cfg)
        assert fast.dtype == np.uint8 and fast.shape == img.shape
        assert np.array_equal(fast, reference), cfg
    lo, hi = np.percentile(img.astype(np.float64), [1.0, 99.8]) if img.size <= 1_000_000 else (None, None)
    if lo is not None:  # against numpy directly, not only against ourselves
        expect = np.clip((img.astype(np.float64) - lo) * (255.0 / (hi - lo)), 0, 255) + 0.5
        assert np.array_equal(normalize(img), expect.astype(np.uint8))
    assert normalize(img)[1, 1] == 255


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"this is text, not an image", "cannot decode"),
    (b"II*\x00" + b"\x00" * 20, "cannot decode"),
])
def test_bad_bytes_give_clear_errors(data, reason):
    with pytest.raises(ImageError, match=reason) as err:
        decode(data, "plate/bad.tif")
    assert "plate/bad.tif" in str(err.value)


def test_stack_and_tiny_images_are_rejected():
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((5, 64, 64), np.uint8))
    with pytest.raises(ImageError, match=r"stack.tif: holds 5 planes \(QYX \(5, 64, 64\)\), never averaged.*--channel"):
        decode(buf.getvalue(), "stack.tif")
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((1, 1), np.uint8))
    with pytest.raises(ImageError, match="too small"):
        decode(buf.getvalue(), "dot.tif")


def test_pixel_limit():
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((100, 100), np.uint8))
    with pytest.raises(ImageError, match="exceeds the limit"):
        decode(buf.getvalue(), "big.tif", max_pixels=5000)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        read_image(str(tmp_path / "nope.tif"))


def test_lzw_tiff_reads_without_imagecodecs(monkeypatch):
    """LIVECell's own TIFFs are LZW-compressed; where tifffile lacks imagecodecs, Pillow decodes them."""
    ref = read_image(str(A172))
    data = A172.read_bytes()
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.LZW

    def no_codecs(self, *args, **kwargs):
        raise ValueError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", no_codecs)
    monkeypatch.setattr(imaging, "_libtiff_decode", no_codecs)
    assert np.array_equal(decode(data, "a172.tif"), ref)
    # A TIFF neither decoder can read still names the file and tifffile's reason.
    with pytest.raises(ImageError, match=r"^broken\.tif: cannot decode image \(IndexError"):
        decode(data[:4000], "broken.tif")


@pytest.mark.parametrize("kind", ["livecell_lzw", "uint16_deflate", "float32", "rgb", "big_endian", "tiled"])
def test_tiff_decodes_to_tifffile_s_pixels(kind):
    """Single-image TIFFs go through libtiff (faster), others through tifffile: the pixels are the same."""
    rng = np.random.default_rng(1)
    if kind == "livecell_lzw":
        data = A172.read_bytes()
    else:
        img = {"uint16_deflate": rng.integers(0, 65535, (37, 53), dtype=np.uint16),
               "float32": rng.normal(size=(37, 53)).astype(np.float32),
               "rgb": rng.integers(0, 255, (37, 53, 3), dtype=np.uint8),
               "big_endian": rng.integers(0, 65535, (37, 53)).astype(">u2"),
               "tiled": rng.integers(0, 65535, (70, 90), dtype=np.uint16)}[kind]
        buf = io.BytesIO()
        tifffile.imwrite(buf, img, compression="zlib" if kind == "uint16_deflate" else None,
                         tile=(32, 32) if kind == "tiled" else None, byteorder=">" if kind == "big_endian" else None)
        data = buf.getvalue()
    ref = tifffile.imread(io.BytesIO(data))
    got, _ = imaging._decode_tiff(data, "x.tif", 10**8, imaging.Planes())
    assert got.shape == ref.shape and got.dtype.kind == ref.dtype.kind and got.dtype.itemsize == ref.dtype.itemsize
    np.testing.assert_array_equal(got, ref)
