"""Opening untrusted image files and normalising every Pillow mode."""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from convpipe.data import images as I
from convpipe.data.raw import BadFileError, ImageInfo
from tests.helpers import datagen as D

# --------------------------------------------------------------------------- opening files


def reason_of(func, path: Path) -> str:
    with pytest.raises(BadFileError) as caught:
        func(path)
    assert caught.value.path == str(path)
    assert str(path) in str(caught.value)
    return caught.value.reason


def test_open_image_decodes_and_probe_reads_header(tmp_path):
    pixels = D.digit_images(1, 16)[0][0]
    path = D.save_image(pixels, tmp_path / "digit.png")
    assert I.probe_image(path) == ImageInfo(height=16, width=16, mode="L")
    img = I.open_image(path)
    np.testing.assert_array_equal(np.asarray(img), pixels)


@pytest.mark.parametrize("func", [I.open_image, I.probe_image])
def test_zero_byte_file_is_empty(tmp_path, func):
    assert reason_of(func, D.write_zero_byte(tmp_path)) == "empty file"


@pytest.mark.parametrize("func", [I.open_image, I.probe_image])
def test_text_file_is_not_an_image(tmp_path, func):
    assert reason_of(func, D.write_not_an_image(tmp_path)) == "not an image"


def test_truncated_png_passes_probe_but_not_open(tmp_path):
    path = D.write_truncated_png(tmp_path)
    assert I.probe_image(path).width == 64
    assert reason_of(I.open_image, path) == "truncated image"


def test_truncated_loading_is_switched_off_even_if_someone_enabled_it(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert reason_of(I.open_image, D.write_truncated_png(tmp_path)) == "truncated image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("func", [I.open_image, I.probe_image])
def test_decompression_bomb_refused_from_header(tmp_path, func):
    path = D.write_decompression_bomb(tmp_path)  # 400 M pixels declared, ~100 bytes on disk
    assert path.stat().st_size < 200
    reason = reason_of(func, path)
    assert (
        reason
        == f"over Pillow's pixel limit of {Image.MAX_IMAGE_PIXELS} pixels (decompression bomb)"
    )


@pytest.mark.parametrize("func", [I.open_image, I.probe_image])
def test_decompression_bomb_warning_is_an_error(tmp_path, func):
    # Between 1x and 2x the limit Pillow only warns; convpipe refuses the file.
    path = D.write_decompression_bomb(tmp_path, width=10000, height=10000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and nothing leaks out as a warning
        assert "decompression bomb" in reason_of(func, path)


def test_lowered_pixel_limit_applies_to_ordinary_images(tmp_path, monkeypatch):
    path = D.save_image(np.zeros((40, 40), np.uint8), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert reason_of(I.open_image, path) == (
        "over Pillow's pixel limit of 1000 pixels (decompression bomb)"
    )
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # limit disabled: decodes
    assert I.open_image(path).size == (40, 40)


@pytest.mark.parametrize("func", [I.open_image, I.probe_image])
def test_missing_file_disappeared(tmp_path, func):
    assert reason_of(func, tmp_path / "gone.png") == "file disappeared while reading"


def test_file_removed_between_probe_and_load(tmp_path):
    path = D.save_image(np.zeros((4, 4), np.uint8), tmp_path / "a.png")
    assert I.probe_image(path).height == 4
    path.unlink()
    assert reason_of(I.open_image, path) == "file disappeared while reading"


@pytest.mark.parametrize("func", [I.open_image, I.probe_image])
def test_symlink_loop_and_broken_symlink(tmp_path, func):
    self_loop = D.write_symlink_loop(tmp_path)[0]
    assert reason_of(func, self_loop) == "symlink loop"
    dangling = tmp_path / "dangling.png"
    os.symlink(tmp_path / "nowhere.png", dangling)
    assert reason_of(func, dangling) == "broken symlink"


def test_directory_is_not_a_regular_file(tmp_path):
    folder = tmp_path / "dir.png"
    folder.mkdir()
    assert reason_of(I.open_image, folder) == "not a regular file (a folder)"


@pytest.mark.parametrize("func", [I.open_image, I.probe_image])
def test_fifo_is_a_bad_file_not_a_hang(tmp_path, func):
    # open() of a FIFO blocks until a writer comes: the reader must not wait for one
    assert reason_of(func, D.write_fifo(tmp_path)) == "not a regular file (a FIFO)"


def test_socket_and_device_are_bad_files(tmp_path):
    path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        assert reason_of(I.open_image, path) == "not a regular file (a socket)"
    device = tmp_path / "zero.png"
    device.symlink_to("/dev/zero")
    assert reason_of(I.open_image, device) == "not a regular file (a device)"


@pytest.mark.parametrize("func", [I.open_image, I.probe_image])
def test_postscript_named_png_never_reaches_ghostscript(tmp_path, func):
    # Pillow would identify this as EPS and hand it to Ghostscript where installed
    assert reason_of(func, D.write_postscript(tmp_path)) == "not an image"


def test_jpeg_named_png_says_what_it_is(tmp_path):
    jpeg = D.save_image(np.full((8, 8, 3), 90, np.uint8), tmp_path / "x.jpg")
    misnamed = jpeg.rename(tmp_path / "x.png")
    assert reason_of(I.open_image, misnamed) == "not an image: JPEG data in a file named .png"


def test_formats_follow_the_extension():
    assert I.formats_of("a/B.JPG") == ("JPEG",)
    assert I.formats_of("x.tiff") == ("TIFF",)
    assert I.formats_of("x.eps") == ()


def test_corrupt_data_inside_valid_header(tmp_path):
    path = D.save_image(np.full((32, 32), 7, np.uint8), tmp_path / "x.png")
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 4
    data[start : start + 8] = b"\xff" * 8  # garbage zlib stream
    path.write_bytes(bytes(data))
    reason = reason_of(I.open_image, path)
    assert reason.startswith(("corrupt image data", "truncated image"))


def test_opened_image_is_usable_after_its_file_is_closed(tmp_path):
    path = D.save_image(np.full((5, 7), 9, np.uint8), tmp_path / "x.bmp")
    img = I.open_image(path)
    path.unlink()  # the data must already be in memory
    assert np.asarray(img).sum() == 9 * 35


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.png", True),
        ("a.PNG", True),
        ("b.JpEg", True),
        ("c.tiff", True),
        ("d.webp", True),
        ("e.txt", False),
        ("png", False),
        ("f.png.bak", False),
        ("g.svg", False),
    ],
)
def test_is_image_file_case_insensitive(name, expected):
    assert I.is_image_file(name) is expected


# --------------------------------------------------------------------------- channels_of


@pytest.mark.parametrize(
    ("mode", "channels"),
    [(mode, 1) for mode in ("1", "L", "LA", "I", "I;16", "I;16B", "F")]
    + [(mode, 3) for mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "HSV")],
)
def test_channels_of(mode, channels):
    assert I.channels_of(mode) == channels


def test_channels_of_unknown_mode():
    with pytest.raises(ValueError, match="unsupported image mode 'XYZ'"):
        I.channels_of("XYZ")


# --------------------------------------------------------------------------- normalize


@pytest.mark.parametrize("mode", Image.MODES)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_pillow_mode_normalizes(mode, channels):
    out = I.normalize(Image.new(mode, (5, 3)), channels, None)
    assert out.shape == (3, 5, channels) and out.dtype == np.uint8
    assert out.flags.c_contiguous and out.flags.writeable


def test_gray_to_three_channels_replicates():
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = I.normalize(Image.fromarray(pixels), 3, None)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], pixels)


def test_color_to_one_channel_is_pillow_luma():
    rgb = D.colorize(D.digit_images(1, 8)[0][0])
    img = Image.fromarray(rgb)
    out = I.normalize(img, 1, None)
    np.testing.assert_array_equal(out[:, :, 0], np.asarray(img.convert("L")))
    np.testing.assert_array_equal(I.normalize(img, 3, None), rgb)


def test_rgba_composited_over_black(tmp_path):
    out = I.normalize(I.open_image(D.write_rgba_png(tmp_path)), 3, None)
    expected = np.array([[[200, 100, 50], [100, 50, 25]], [[0, 0, 0], [10, 20, 30]]])
    np.testing.assert_array_equal(out, expected)


def test_la_composited_over_black():
    pixels = np.array([[[200, 255], [200, 128], [200, 0]]], dtype=np.uint8)
    out = I.normalize(Image.fromarray(pixels), 1, None)
    np.testing.assert_array_equal(out[:, :, 0], [[200, 100, 0]])


def test_palette_with_transparency(tmp_path):
    img = I.open_image(D.write_palette_png(tmp_path))
    assert img.mode == "P"
    out = I.normalize(img, 3, None)
    # black, red / transparent green -> black, blue
    np.testing.assert_array_equal(out, [[[0, 0, 0], [255, 0, 0]], [[0, 0, 0], [0, 0, 255]]])


def test_cmyk_jpeg_to_rgb(tmp_path):
    img = I.open_image(D.write_cmyk_jpeg(tmp_path))
    assert img.mode == "CMYK"
    out = I.normalize(img, 3, None).astype(int)
    assert np.abs(out[:, :4] - [255, 255, 255]).max() <= 3  # white half
    assert np.abs(out[:, -4:] - [255, 0, 0]).max() <= 3  # red half


def test_one_bit_image_is_0_or_255():
    img = Image.fromarray(np.array([[True, False, True]]))
    assert img.mode == "1"
    np.testing.assert_array_equal(I.normalize(img, 1, None)[:, :, 0], [[255, 0, 255]])


def test_16bit_png_scaled_not_clipped(tmp_path):
    values = [[0, 128, 257, 32896], [32767, 65278, 65407, 65535]]
    img = I.open_image(D.write_16bit_png(tmp_path, values))
    assert img.mode.startswith("I")
    out = I.normalize(img, 1, None)[:, :, 0]
    np.testing.assert_array_equal(out, [[0, 0, 1, 128], [127, 254, 255, 255]])
    assert out.tolist() == [[round(v / 257) for v in row] for row in values]


def test_32bit_int_and_float_modes():
    as_int = Image.fromarray(np.array([[-5, 32896, 65535, 100000]], dtype=np.int32))
    assert as_int.mode == "I"
    np.testing.assert_array_equal(I.normalize(as_int, 1, None)[:, :, 0], [[0, 128, 255, 255]])
    as_float = Image.fromarray(np.array([[-1.0, 0.4, 127.6, 300.0, np.nan]], dtype=np.float32))
    assert as_float.mode == "F"
    np.testing.assert_array_equal(I.normalize(as_float, 1, None)[:, :, 0], [[0, 0, 128, 255, 0]])


def test_resize_non_square_is_height_width():
    # Top third white, the rest black, 30 wide x 12 high.
    pixels = np.zeros((12, 30), dtype=np.uint8)
    pixels[:4] = 255
    out = I.normalize(Image.fromarray(pixels), 1, (6, 20))
    assert out.shape == (6, 20, 1)
    assert out[0].min() == 255 and out[-1].max() == 0  # the stripe stayed horizontal, on top


def test_resize_color_and_no_resize_when_size_matches():
    rgb = D.colorize(np.full((10, 4), 200, np.uint8))
    out = I.normalize(Image.fromarray(rgb), 3, (5, 8))
    assert out.shape == (5, 8, 3)
    np.testing.assert_array_equal(out[2, 3], [200, 100, 55])
    same = I.normalize(Image.fromarray(rgb), 3, (10, 4))
    np.testing.assert_array_equal(same, rgb)


def test_downscale_is_antialiased():
    # A 1-pixel checkerboard averages to mid gray when shrunk 4x, instead of aliasing to
    # all-black or all-white as nearest-neighbour sampling would.
    board = (np.indices((32, 32)).sum(axis=0) % 2 * 255).astype(np.uint8)
    out = I.normalize(Image.fromarray(board), 1, (8, 8))
    assert np.abs(out.astype(int) - 128).max() <= 2


@pytest.mark.parametrize("channels", [0, 2, 4])
def test_bad_channel_count(channels):
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        I.normalize(Image.new("L", (2, 2)), channels, None)


def test_bad_size():
    with pytest.raises(ValueError, match="size_hw must be positive"):
        I.normalize(Image.new("L", (2, 2)), 1, (0, 3))


# --------------------------------------------------------------------------- fitting a size


def _ramp(width: int, height: int) -> Image.Image:
    """An RGB photo whose red channel is the column's position (0..255) across the width."""
    column = np.linspace(0, 255, width).round().astype(np.uint8)
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, :, 0] = column[None, :]
    pixels[:, :, 1] = 200
    return Image.fromarray(pixels)


def test_crop_keeps_the_aspect_and_cuts_the_centre() -> None:
    out = I.normalize(_ramp(100, 50), 3, (32, 32), "crop")
    assert out.shape == (32, 32, 3)
    # scaled to 64x32, the middle 32 columns kept: the original's 25 %..75 % of the width
    assert abs(int(out[16, 0, 0]) - 64) <= 6 and abs(int(out[16, -1, 0]) - 191) <= 6
    assert (out[:, :, 1] == 200).all()  # no border anywhere


def test_pad_keeps_the_aspect_and_adds_black_bars() -> None:
    out = I.normalize(_ramp(100, 50), 3, (32, 32), "pad")
    # scaled to 32x16, centred: 8 black rows above and below, the whole width kept
    assert (out[:8] == 0).all() and (out[24:] == 0).all()
    assert (out[8:24, :, 1] == 200).all()
    assert out[16, 0, 0] <= 6 and out[16, -1, 0] >= 249


def test_stretch_squashes_the_whole_image() -> None:
    out = I.normalize(_ramp(100, 50), 3, (32, 32), "stretch")
    assert (out[:, :, 1] == 200).all()
    assert out[16, 0, 0] <= 6 and out[16, -1, 0] >= 249


@pytest.mark.parametrize("mode", ["crop", "pad", "stretch"])
@pytest.mark.parametrize("size", [(50, 100), (100, 50), (33, 33), (7, 300)])
def test_every_mode_gives_exactly_the_size_asked_for(mode, size) -> None:
    height, width = size
    assert I.normalize(_ramp(width, height), 1, (24, 40), mode).shape == (24, 40, 1)


def test_an_unknown_resize_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="resize must be one of stretch, crop, pad"):
        I.normalize(_ramp(8, 8), 3, (4, 4), "zoom")
