"""Images for vision chat: read a path, bytes or data URL, check its size, decode to RGB.

Limits apply before decoding: the encoded size first (`MAX_IMAGE_BYTES`), then the
pixel count the header declares (`MAX_IMAGE_PIXELS`), so a small file that would
expand into gigabytes (a decompression bomb) is refused without being expanded.
Pillow decodes (JPEG, PNG and WebP; other formats are refused); the key that
identifies an image in the KV prefix cache is the SHA-256 of its encoded bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from .._errors import InvalidRequestError, PayloadTooLargeError
from .._types import MAX_IMAGE_BYTES, decode_image_data_url
from ._mtmd import RgbImage

__all__ = ["FORMATS", "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "load_image", "read_image_bytes"]

MAX_IMAGE_PIXELS = 40_000_000  # e.g. 8000 x 5000
FORMATS = ("JPEG", "PNG", "WEBP")


def read_image_bytes(
    item: str | bytes | os.PathLike[str], max_bytes: int = MAX_IMAGE_BYTES
) -> bytes:
    """The encoded image: `item` itself, a data URL's payload, or a file's content."""
    if isinstance(item, bytes):
        data = item
    elif isinstance(item, str) and item[:5].lower() == "data:":
        data = decode_image_data_url(item, max_bytes=max_bytes)
    else:
        path = Path(item)
        try:
            size = path.stat().st_size
            if size > max_bytes:
                raise PayloadTooLargeError(f"image {path} is larger than {max_bytes} bytes")
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidRequestError(
                f"cannot read image {path}: {exc.strerror or exc}", field="images"
            ) from None
    if len(data) > max_bytes:
        raise PayloadTooLargeError(f"image is larger than {max_bytes} bytes")
    return data


def load_image(
    item: str | bytes | os.PathLike[str],
    *,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> RgbImage:
    """Decode one image to 8-bit RGB, or raise a typed error saying what is wrong with it."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise InvalidRequestError(
            "images need Pillow: pip install 'sipppy[vision]'", field="images"
        ) from None
    data = read_image_bytes(item, max_bytes)
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise PayloadTooLargeError(
                    f"image is {width}x{height} pixels; at most {max_pixels} are accepted"
                )
            rgb = img.convert("RGB")
            pixels = rgb.tobytes()
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise InvalidRequestError(
            f"the image cannot be decoded as {', '.join(FORMATS)}: {exc}", field="images"
        ) from None
    if width < 1 or height < 1:
        raise InvalidRequestError("the image has no pixels", field="images")
    return RgbImage(width, height, pixels, hashlib.sha256(data).hexdigest())
