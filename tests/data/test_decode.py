"""Image decoding (``ssl_zoo.data.decode``): every colour mode becomes RGB as PIL renders it, EXIF orientation,
16-bit PNGs, truncated and broken files raise ``BadImageError`` naming the file, and the pixel limit."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image, ImageFile

from ssl_zoo.data import (
    BadImageError,
    load_image,
)
from ssl_zoo.data import decode as image_decode
from tests.data.images import BAD_KINDS, break_file, jpeg_bytes, pixels, save_solid


def test_load_image_grayscale_becomes_three_equal_channels(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png")
    assert image.mode == "RGB" and image.size == (8, 6)
    assert np.array_equal(pixels(image), np.repeat(grey[..., None].astype(np.int64), 3, axis=2))


def test_load_image_cmyk(tmp_path):
    cmyk = [(0, 0, 0, 0), (255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255), (100, 0, 50, 100)]
    image = Image.new("CMYK", (len(cmyk), 1))
    image.putdata(cmyk)
    image.save(tmp_path / "c.tif")
    loaded = pixels(load_image(tmp_path / "c.tif"))[0]  # [6, 3]
    for (c, m, y, k), rgb in zip(cmyk, loaded, strict=True):
        # Subtractive model: each ink absorbs its complement, black scales everything.
        expected = [255 * (1 - ink / 255) * (1 - k / 255) for ink in (c, m, y)]
        assert np.allclose(rgb, expected, atol=1.0), ((c, m, y, k), rgb, expected)


def test_load_image_cmyk_jpeg(tmp_path):
    # CMYK JPEGs (print workflows, Adobe) are the common case on the web, not CMYK TIFFs.
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    image = load_image(tmp_path / "c.jpg")
    assert image.mode == "RGB" and image.size == (8, 8)
    r, g, b = pixels(image).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60  # cyan-free, full magenta + yellow = red


def test_load_image_rgba_composited_on_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [0, 0, 200, 128], [10, 20, 30, 64]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    loaded = pixels(load_image(tmp_path / "a.png"))
    alpha = rgba[..., 3:].astype(np.float64) / 255.0
    expected = alpha * rgba[..., :3] + (1.0 - alpha) * 255.0
    assert np.abs(loaded - expected).max() <= 1.0


def test_load_image_grey_with_alpha(tmp_path):
    la = np.array([[[0, 0], [50, 255], [200, 255]]], dtype=np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    loaded = pixels(load_image(tmp_path / "la.png"))
    assert loaded.tolist() == [[[255] * 3, [50] * 3, [200] * 3]]


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_load_image_palette_with_transparent_index(tmp_path, suffix):
    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    palette.putdata([0, 1, 2])
    palette.info["transparency"] = 0
    palette.save(tmp_path / f"p{suffix}", transparency=0)
    assert Image.open(tmp_path / f"p{suffix}").mode == "P"
    loaded = pixels(load_image(tmp_path / f"p{suffix}"))
    assert loaded.tolist() == [[[255, 255, 255], [0, 255, 0], [0, 0, 255]]]


def test_load_image_palette_without_transparency(tmp_path):
    palette = Image.new("P", (2, 2))
    palette.putpalette([10, 20, 30, 200, 100, 0])
    palette.putdata([0, 1, 1, 0])
    palette.save(tmp_path / "p.png")
    loaded = pixels(load_image(tmp_path / "p.png"))
    assert loaded.tolist() == [[[10, 20, 30], [200, 100, 0]], [[200, 100, 0], [10, 20, 30]]]


def test_load_image_16bit_png_scaled_to_8bit(tmp_path):
    values = np.array([[0, 1, 128, 129, 257], [1000, 32896, 40000, 65279, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    loaded = pixels(load_image(tmp_path / "deep.png"))
    expected = np.rint(values.astype(np.float64) * 255.0 / 65535.0)
    assert np.array_equal(loaded, np.repeat(expected[..., None], 3, axis=2))
    assert loaded[1, -1, 0] == 255 and loaded[0, 0, 0] == 0


def test_load_image_applies_exif_orientation(tmp_path):
    # 40 x 20 (wide): left half red, right half blue.
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    references = {
        1: array,
        3: np.rot90(array, k=2),  # rotated 180 degrees
        6: np.rot90(array, k=-1),  # "rotate 90 CW to display": the left edge goes to the top
        8: np.rot90(array, k=1),  # "rotate 90 CCW to display": the left edge goes to the bottom
    }
    for orientation, reference in references.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.jpg"
        Image.fromarray(array).save(path, quality=95, exif=exif)
        loaded = pixels(load_image(path))
        assert loaded.shape == reference.shape, orientation
        # JPEG is lossy at the colour edge: compare away from it.
        far = np.abs(loaded - reference.astype(np.int64)).max(axis=2)
        assert np.median(far) < 8 and (far < 40).mean() > 0.8, orientation
    assert pixels(load_image(tmp_path / "o6.jpg"))[2, 10].argmax() == 0  # red on top after rotation
    assert pixels(load_image(tmp_path / "o6.jpg"))[-3, 10].argmax() == 2  # blue at the bottom


def test_load_image_owns_its_pixels(tmp_path):
    path = save_solid(tmp_path / "s.png", (1, 2, 3))
    image = load_image(path)
    path.unlink()
    assert pixels(image)[0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_load_image_bad_files_raise_bad_image_error_naming_the_file(tmp_path, kind, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)  # Pillow's default, whatever ran before
    path = tmp_path / f"{kind}.jpg"
    path.write_bytes(b"x")
    break_file(path, kind)
    with pytest.raises(BadImageError) as info:
        load_image(path)
    error = info.value
    assert isinstance(error, OSError) and isinstance(error, ValueError)
    assert error.path == str(path) and str(path) in str(error)
    restored = pickle.loads(pickle.dumps(error))  # DataLoader workers send it to the main process
    assert str(restored) == str(error) and restored.path == error.path


def test_load_image_truncated_jpeg_decodes_when_complete(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(jpeg_bytes())
    assert load_image(tmp_path / "ok.jpg").size == (64, 48)


def test_load_image_pixel_limit(tmp_path, monkeypatch):
    path = save_solid(tmp_path / "s.png", (0, 0, 0), size=(20, 10))
    assert load_image(path, max_pixels=200).size == (20, 10)  # exactly at the limit: accepted
    with pytest.raises(BadImageError, match="exceeds the limit of 199"):
        load_image(path, max_pixels=199)
    monkeypatch.setattr(image_decode, "MAX_IMAGE_PIXELS", 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_image(path)
    image_decode.set_max_image_pixels(50)
    assert image_decode.MAX_IMAGE_PIXELS == 50 and Image.MAX_IMAGE_PIXELS == 50
    with pytest.raises(ValueError, match="pixels"):
        image_decode.set_max_image_pixels(0)


def test_pillow_limit_set_explicitly():
    assert Image.MAX_IMAGE_PIXELS == image_decode.MAX_IMAGE_PIXELS == 2**28


def test_huge_image_is_rejected_from_its_header_without_decoding(tmp_path, monkeypatch):
    # A 1-bit PNG of 20000 x 20000 = 4e8 pixels is ~50 kB on disk and would be 1.2 GB as RGB.
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 200_000

    def decode(self):  # any pixel decode of the bomb is the bug under test
        raise AssertionError("the image was decoded before its size was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)
    with pytest.raises(BadImageError, match=r"20000x20000 = 400000000 pixels exceeds the limit of 268435456") as info:
        load_image(tmp_path / "bomb.png")
    assert "bomb.png" in str(info.value)
