"""Images in fewstep (Dimple's prompts): reading and checking them, their content hash, and vision-input batches.

Every image a record carries goes through `check_image` once, where it enters fewstep (a generated task, a user's
data file), so a bad one is a one-line `ImageError` naming the file and row before any work starts; later stages
take it as a valid RGB-convertible picture. Records keep their images as PIL images (stored by `datasets` with
its `Image` feature, PNG bytes in Arrow); an image is named by `image_sha256`, a hash of its decoded pixels (not
of a file's bytes: the same picture saved twice is one image).

The prompt side (chat template, `<|image_pad|>` count, Qwen2-VL preprocessing) is `Teacher.encode_prompt`;
`VisionInputs` is what it returns per prompt and `collate_vision` stacks them for a batch in row order, which is
the order the model consumes them in.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from teachers.backbones.diffusion_generation import IMAGE_INPUTS

# The chat template's vision block of one image is VISION_START + IMAGE_PAD x (merged patches) + VISION_END.
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
VISION_TOKENS = (VISION_START, VISION_END, "<|vision_pad|>", IMAGE_PAD, "<|video_pad|>")
# 8-bit colour or grey modes, which RGB conversion keeps meaningful; 16-bit, 32-bit integer and float images
# (depth maps, scientific data) would be silently clipped, so they are refused.
IMAGE_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
MAX_ASPECT_RATIO = 200  # Qwen2-VL's resize refuses longer sides than this


def written_vision_token(text: str) -> str | None:
    """The first vision token a text holds as written characters, or None. Vision tokens are placed by
    `Teacher.encode_prompt` for a record's images; one written into a prompt would be image tokens without an image."""
    return next((token for token in VISION_TOKENS if token in text), None)


class ImageError(ValueError):
    """An image that cannot be used; the message is one line naming the file or record."""


def check_image(image: Image.Image, where: str) -> Image.Image:
    """`image`, fully decoded, if fewstep can feed it to a vision tower; else `ImageError` naming `where`."""
    if not isinstance(image, Image.Image):
        raise ImageError(f"{where}: expected an image, got {type(image).__name__}")
    try:
        image.load()  # a truncated file fails here, not at the first forward
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageError(f"{where}: the image cannot be decoded ({_first_line(error)})") from None
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageError(f"{where}: the image has zero size ({width}x{height})")
    if image.mode not in IMAGE_MODES:
        raise ImageError(
            f"{where}: image mode {image.mode!r} is not an 8-bit colour or grey mode ({', '.join(IMAGE_MODES)})"
        )
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ImageError(f"{where}: the image is {width}x{height}, an aspect ratio above {MAX_ASPECT_RATIO}")
    return image


def open_image(source: str | Path | bytes, where: str) -> Image.Image:
    """Read an image file (a path) or encoded bytes, decoded and checked (`check_image`)."""
    try:
        if isinstance(source, bytes):
            image = Image.open(io.BytesIO(source))
        else:
            path = Path(source)
            if not path.is_file():
                raise ImageError(f"{where}: image file {path} does not exist")
            image = Image.open(path)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ImageError(f"{where}: not a readable image ({_first_line(error)})") from None
    return check_image(image, where)


def image_sha256(image: Image.Image) -> str:
    """Content hash of an image: its mode, size and decoded pixels."""
    digest = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


@dataclass
class VisionInputs:
    """One prompt's images after Qwen2-VL preprocessing."""

    pixel_values: torch.Tensor  # [Σ t·h·w, 3·2·14·14] patches of its images, in order
    image_grid_thw: torch.Tensor  # [n_images, 3]


def collate_vision(items: list[VisionInputs | None]) -> dict[str, torch.Tensor]:
    """Model inputs (`pixel_values`, `image_grid_thw`) of a batch whose rows hold `items` (None: a text row), or
    {} when no row has an image. Images are concatenated in row order, the order the model reads them in."""
    present = [item for item in items if item is not None]
    if not present:
        return {}
    return {
        "pixel_values": torch.cat([item.pixel_values for item in present]),
        "image_grid_thw": torch.cat([item.image_grid_thw for item in present]),
    }


def vision_of(batch: dict) -> dict[str, torch.Tensor]:
    """The vision inputs a batch dict carries (none for text batches), to pass on to the model's forward."""
    return {name: batch[name] for name in IMAGE_INPUTS if name in batch}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
