"""Image files fewstep must refuse, written byte for byte, for the data tests and the hostile-input tests.

`BAD_IMAGES` maps a case to (writer, suffix, the problem `teachers.vision.open_image` reports); a writer takes the
path to write (the "missing" one writes nothing).
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

from PIL import Image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_truncated_png(path: Path) -> None:
    """The first half of a 64x64 PNG of noise: the header opens, the pixels do not decode."""
    noise = bytes(random.Random(0).randrange(256) for _ in range(64 * 64 * 3))
    data = png_bytes(Image.frombytes("RGB", (64, 64), noise))
    path.write_bytes(data[: len(data) // 2])


def write_zero_width_png(path: Path) -> None:
    """A well-formed PNG whose header says 0x8 pixels (Pillow refuses it at open, as not an image it identifies)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 0, 8, 8, 2, 0, 0, 0)  # width 0, height 8, 8-bit RGB
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


BAD_IMAGES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "missing": (lambda path: None, "png", "image file {image} does not exist"),
    "truncated": (write_truncated_png, "png", "the image cannot be decoded (image file is truncated"),
    "16-bit": (lambda path: Image.new("I;16", (8, 8)).save(path), "png", "image mode 'I;16' is not an 8-bit"),
    "float": (lambda path: Image.new("F", (8, 8)).save(path), "tiff", "image mode 'F' is not an 8-bit"),
    "zero-size": (write_zero_width_png, "png", "not a readable image (cannot identify image file"),
    "not an image": (lambda path: path.write_text("hello"), "png", "not a readable image"),
}
