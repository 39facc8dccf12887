"""Image decoding: the single place in the project where PIL opens a file.

Every image the pipeline reads (validation at download time, datasets at
train/feature time) goes through `load_rgb`, so colour handling is the
same everywhere:

* grayscale (`1`, `L`), 16-bit (`I;16`, `I`) and float (`F`) images
  are scaled to 8 bits, not clipped (a 16-bit PNG would otherwise be white);
* palette, `LA` and `RGBA` images are composited on a solid background,
  so transparent pixels do not become black;
* CMYK (and other colour spaces) are converted to RGB, through the embedded
  ICC profile when there is one;
* the EXIF orientation tag is applied, so phone photos are upright;
* decompression bombs and absurd dimensions are refused *before* decoding,
  with `ImageTooLargeError`.

`probe_image` is the validation entry point used when a source is
materialised: it reads the bytes once, hashes them (for duplicate / leakage
detection) and fully decodes the image, raising an `ImageError` whose
`reason` is a short machine-readable code that the data report counts.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from transfer.pipeline.errors import UserError

# File extensions treated as images when scanning folders. Anything else is
# ignored (and counted as "non_image" in the data report). Lower-case, with dot.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

# Refuse images above this many pixels (width * height). 64 MP is far beyond
# what a classifier needs and keeps a single decode well under 1 GiB of RAM.
DEFAULT_MAX_PIXELS = 64_000_000
# Refuse absurd aspect ratios / sides even when the pixel count is modest
# (e.g. a 1 x 10_000_000 strip), which break resizing and cropping.
DEFAULT_MAX_SIDE = 30_000
# Background used when flattening transparency (white, like most viewers).
DEFAULT_BACKGROUND: tuple[int, int, int] = (255, 255, 255)


class ImageError(UserError, ValueError):
    """An image file that cannot be used; `reason` is a short report code."""

    reason = "corrupt"

    def __init__(self, path: str | os.PathLike, message: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class EmptyImageError(ImageError):
    """Zero-byte file."""

    reason = "empty"


class UnreadableImageError(ImageError):
    """The file could not be read at all (permissions, broken link, loop, ...)."""

    reason = "unreadable"


class NotAnImageError(ImageError):
    """The bytes are not in any image format PIL knows (e.g. text named .jpg)."""

    reason = "not_image"


class CorruptImageError(ImageError):
    """A recognised format whose data is truncated or damaged."""

    reason = "corrupt"


class ImageTooLargeError(ImageError):
    """Decompression bomb or absurd dimensions; refused before decoding."""

    reason = "too_large"


@dataclass(frozen=True)
class ImageProbe:
    """What validation learned about one image file."""

    width: int
    height: int
    mode: str
    format: str
    sha256: str
    n_bytes: int


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has an image extension (content is not checked)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _check_size(path: str | os.PathLike, size: tuple[int, int], max_pixels: int, max_side: int) -> None:
    """Raise ImageTooLargeError for bombs / absurd sizes, using header-only size."""
    width, height = size
    if width <= 0 or height <= 0:
        raise CorruptImageError(path, f"invalid image size {width}x{height}")
    if width * height > max_pixels or max(width, height) > max_side:
        raise ImageTooLargeError(
            path,
            f"image is {width}x{height} ({width * height:,} pixels); the limit is "
            f"{max_pixels:,} pixels and {max_side:,} per side. Resize the image or "
            "leave it out (it may be a decompression bomb).",
        )


def _scale_to_uint8(image: Image.Image) -> Image.Image:
    """Map a high-bit-depth single-channel image (I;16*, I, F) to 8-bit `L`.

    PIL's own `convert("L")` clips 16-bit values at 255, which turns almost
    every real 16-bit image white; scale by the type's range instead.
    """
    arr = np.asarray(image)
    if image.mode.startswith("I;16"):
        scaled = arr.astype(np.float64) / 257.0
    elif image.mode == "I":
        # 32-bit ints: PNG 16-bit data decoded as "I" stays within 0..65535.
        hi = float(arr.max()) if arr.size else 0.0
        scaled = arr.astype(np.float64) / (257.0 if hi > 255 else 1.0)
    else:  # "F": floats in [0, 1] are common; otherwise assume 0..255.
        hi = float(arr.max()) if arr.size else 0.0
        scaled = arr.astype(np.float64) * (255.0 if hi <= 1.0 else 1.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """Convert CMYK to RGB, through the embedded ICC profile when present."""
    icc = image.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(image, src, dst, outputMode="RGB")
        except Exception:  # noqa: BLE001 - a broken profile must not lose the image
            pass
    return image.convert("RGB")


def _flatten(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Composite an image with alpha onto an opaque background."""
    rgba = image.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = DEFAULT_BACKGROUND) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB (see module doc)."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode.startswith("I") or mode == "F":
        return _scale_to_uint8(image).convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        return _flatten(image, background)
    return image.convert("RGB")


def _open_decoded(
    source: str | os.PathLike | io.BytesIO,
    path: str | os.PathLike,
    max_pixels: int,
    max_side: int,
    draft_size: int | None = None,
) -> tuple[Image.Image, str]:
    """Open, size-check from the header, then decode. Returns (image, format).

    ``draft_size``: a JPEG at least twice that on both sides is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's
    DCT scaling, PIL's draft mode), never below ``draft_size`` per side: a 12-megapixel photo wanted at
    256 px decodes in a fraction of the time and memory.
    """
    try:
        # PIL's own bomb guard warns at MAX_IMAGE_PIXELS and raises at twice
        # that; we check our own limit from the header first, and turn its
        # warning into an error so nothing is ever decoded past the limit.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
            _check_size(path, image.size, max_pixels, max_side)
            fmt = image.format or "unknown"
            if draft_size is not None and fmt == "JPEG":
                image.draft(None, (draft_size, draft_size))
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(
            path, f"refused as a decompression bomb ({exc}); resize the image or remove it."
        ) from exc
    except UnidentifiedImageError as exc:
        raise NotAnImageError(
            path, "not a recognised image format (wrong extension, or not an image); delete or rename it."
        ) from exc
    # struct.error / IndexError come from some PIL plugins on damaged headers.
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        raise CorruptImageError(
            path, f"corrupt or truncated image ({exc}); re-export or re-download it, or delete it."
        ) from exc
    return image, fmt


def load_rgb(
    path: str | os.PathLike,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode `path` into an upright 8-bit RGB PIL image, detached from the file.

    With `draft_size`, large JPEGs may decode at reduced scale, never below `draft_size` per side
    (for callers that resize to that size anyway: the image cache).

    Raises an `ImageError` subclass (a `ValueError`) naming the file
    when it is empty, unreadable, not an image, corrupt or too large.
    """
    try:
        if os.path.getsize(path) == 0:
            raise EmptyImageError(path, "file is empty (0 bytes); delete it or re-download it.")
        with open(path, "rb") as fh:
            image, _ = _open_decoded(fh, path, max_pixels, max_side, draft_size)
            with image:
                upright = ImageOps.exif_transpose(image)
                return to_rgb(upright, background)
    except ImageError:
        raise
    except OSError as exc:
        raise UnreadableImageError(
            path, f"cannot read file ({exc.strerror or exc}); check it exists and is readable."
        ) from exc


def load_rgb_bytes(
    data: bytes,
    name: str = "<image bytes>",
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
    draft_size: int | None = None,
) -> Image.Image:
    """`load_rgb` for an encoded image held in memory (an upload, a request body); `name` goes in errors."""
    if not data:
        raise EmptyImageError(name, "no image data (0 bytes).")
    image, _ = _open_decoded(io.BytesIO(data), name, max_pixels, max_side, draft_size)
    with image:
        return to_rgb(ImageOps.exif_transpose(image), background)


def probe_image(
    path: str | os.PathLike,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
) -> ImageProbe:
    """Validate one image file: read it once, hash the bytes, fully decode it.

    The returned sha256 is of the file bytes, so byte-identical copies (the
    same photo under two labels, or in train and test) can be detected.
    Raises an `ImageError` subclass with a `reason` code on failure.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UnreadableImageError(
            path, f"cannot read file ({exc.strerror or exc}); check it exists and is readable."
        ) from exc
    if not data:
        raise EmptyImageError(path, "file is empty (0 bytes); delete it or re-download it.")
    image, fmt = _open_decoded(io.BytesIO(data), path, max_pixels, max_side)
    with image:
        # Orientation may swap width/height; report the upright size.
        width, height = image.size
        if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            width, height = height, width
        return ImageProbe(width, height, image.mode, fmt, hashlib.sha256(data).hexdigest(), len(data))
