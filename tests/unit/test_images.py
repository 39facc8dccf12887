"""load_rgb / probe_image on real files of every awkward kind, written by the tests."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transfer.data.images import (
    CorruptImageError,
    EmptyImageError,
    ImageTooLargeError,
    NotAnImageError,
    UnreadableImageError,
    is_image_file,
    load_rgb,
    probe_image,
)


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def test_rgb_jpeg_round_trip(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (20, 10), (10, 200, 30)), tmp_path / "a.jpg", quality=95)
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (20, 10)
    assert np.allclose(image.getpixel((5, 5)), (10, 200, 30), atol=4)


def test_rgba_is_composited_on_white_not_black(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    image = load_rgb(save(rgba, tmp_path / "a.png"))
    assert image.getpixel((1, 1)) == (255, 255, 255)
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert load_rgb(tmp_path / "a.png", background=(0, 128, 0)).getpixel((1, 1)) == (0, 128, 0)


def test_palette_with_transparency(tmp_path: Path) -> None:
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 1)
    image = load_rgb(save(pal, tmp_path / "p.png", transparency=0))
    assert image.getpixel((0, 0)) == (0, 0, 255) and image.getpixel((2, 2)) == (255, 255, 255)


def test_grayscale_and_la(tmp_path: Path) -> None:
    assert load_rgb(save(Image.new("L", (3, 3), 77), tmp_path / "g.png")).getpixel((0, 0)) == (77, 77, 77)
    la = Image.new("LA", (3, 3), (0, 0))
    assert load_rgb(save(la, tmp_path / "la.png")).getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    path = save(Image.fromarray(arr), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    pixels = [load_rgb(path).getpixel((x, 0))[0] for x in range(3)]
    assert pixels == [0, 128, 255]


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    image = load_rgb(path)
    assert image.mode == "RGB"
    assert np.allclose(image.getpixel((4, 4)), (255, 0, 0), atol=6)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    path = save(image, tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_rgb(path).size == (20, 40)
    assert (probe_image(path).width, probe_image(path).height) == (20, 40)


def test_truncated_jpeg_is_corrupt(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(CorruptImageError, match="cut.jpg.*truncated"):
        load_rgb(path)
    with pytest.raises(CorruptImageError) as err:
        probe_image(path)
    assert err.value.reason == "corrupt"


def test_zero_byte_text_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("this is not a JPEG")
    for fn in (load_rgb, probe_image):
        with pytest.raises(EmptyImageError, match="empty.png"):
            fn(tmp_path / "empty.png")
        with pytest.raises(NotAnImageError, match="notes.jpg"):
            fn(tmp_path / "notes.jpg")
        with pytest.raises(UnreadableImageError, match="missing.png"):
            fn(tmp_path / "missing.png")


def test_symlink_loop_is_unreadable(tmp_path: Path) -> None:
    os.symlink(tmp_path / "b.png", tmp_path / "a.png")
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")
    with pytest.raises(UnreadableImageError) as err:
        probe_image(tmp_path / "a.png")
    assert err.value.reason == "unreadable"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims a huge size; PIL reads the size without decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decompression_bomb_and_absurd_sizes_are_refused(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(100_000, 100_000))
    with pytest.raises(ImageTooLargeError, match="bomb.png.*decompression bomb"):
        load_rgb(bomb)
    strip = tmp_path / "strip.png"
    strip.write_bytes(png_header_only(1_000_000, 1))
    with pytest.raises(ImageTooLargeError, match="per side"):
        probe_image(strip)
    small = save(Image.new("RGB", (30, 30)), tmp_path / "s.png")
    with pytest.raises(ImageTooLargeError):
        load_rgb(small, max_pixels=100)


def test_probe_hashes_bytes_and_non_ascii_names(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (5, 6), (1, 2, 3)), tmp_path / "café_猫.png")
    probe = probe_image(path)
    twin = tmp_path / "copy.png"
    twin.write_bytes(path.read_bytes())
    assert probe.sha256 == probe_image(twin).sha256 and (probe.width, probe.height) == (5, 6)
    assert probe.format == "PNG" and probe.n_bytes == path.stat().st_size


def test_is_image_file() -> None:
    assert is_image_file("a/B.JPG") and is_image_file("x.webp")
    assert not is_image_file("README.txt") and not is_image_file("labels.csv")
