"""Images that arrive in requests, as base64 text or uploaded bytes: size limits are checked on the encoded
bytes and on the header's width and height before a pixel is decoded, so a decompression bomb costs
nothing."""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

from .errors import ApiError, invalid

FORMATS = ("PNG", "JPEG", "WEBP", "BMP")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; `cascade serve` flags can raise them."""
    body_bytes: int = 32 << 20  # a whole request body
    image_bytes: int = 16 << 20  # one encoded input image
    image_pixels: int = 4096 * 4096  # one decoded input image
    side: int = 2048  # an output image's width or height
    images: int = 8  # images per request
    steps: int = 500  # steps per stage


def too_large(field: str, message: str) -> ApiError:
    return ApiError(413, field, message)


def from_base64(text, field: str, limits: Limits) -> bytes:
    """A base64 string, with or without a `data:image/...;base64,` prefix, -> bytes."""
    if not isinstance(text, str) or not text.strip():
        raise invalid(field, "expected a base64-encoded PNG, JPEG or WebP image (or a data: URL)")
    data = text.split(",", 1)[1] if text.startswith("data:") else text
    data = "".join(data.split())
    if len(data) // 4 * 3 > limits.image_bytes:
        raise too_large(field, f"the encoded image is over {limits.image_bytes >> 20} MiB")
    try:
        return base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise invalid(field, "not valid base64") from None


def open_image(raw: bytes, field: str, limits: Limits, mode: str | None = "RGB"):
    """Bytes -> a loaded PIL image in `mode` (None: as stored), after the header's size is checked."""
    import PIL.Image

    if len(raw) > limits.image_bytes:
        raise too_large(field, f"the image file is over {limits.image_bytes >> 20} MiB")
    try:
        image = PIL.Image.open(io.BytesIO(raw), formats=FORMATS)
        width, height = image.size
        if width * height > limits.image_pixels:
            raise too_large(field, f"the image is {width}x{height}; at most {limits.image_pixels} pixels are "
                                   "decoded")
        image.load()
    except PIL.Image.DecompressionBombError:
        raise too_large(field, f"the image is over {limits.image_pixels} pixels") from None
    except (OSError, ValueError, SyntaxError) as error:
        if "too large" in str(error).lower():  # PIL's own cap on decompressed PNG text chunks
            raise too_large(field, "a metadata chunk decompresses to too many bytes") from None
        raise invalid(field, f"expected a PNG, JPEG, WebP or BMP image ({error})") from None
    return image if mode is None or image.mode == mode else image.convert(mode)


def mask_from_alpha(image):
    """An image's transparent pixels as a white-on-black mask (OpenAI's edit convention), or None."""
    if "A" not in image.getbands():
        return None
    alpha = image.getchannel("A")
    if alpha.getextrema()[0] == 255:
        return None
    return alpha.point(lambda a: 255 if a == 0 else 0)
