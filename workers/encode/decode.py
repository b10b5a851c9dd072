"""Decode stage: image bytes → an upright RGB PIL image, refusing what is not a sane image.

Refusals (``ImageRejected``): not an image, truncated or corrupt pixel data, and images with more
pixels than ``max_pixels``. The pixel count is read from the header, before any pixel is decoded,
so a decompression bomb (e.g. a 50,000 × 50,000 PNG of a few KB) is refused without allocating it.
"""
from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from workers.encode.rejects import EMPTY, NOT_AN_IMAGE, TOO_MANY_PIXELS, TRUNCATED, ImageRejected


def decode_image(body: bytes, max_pixels: int, *, name: str = "image") -> Image.Image:
    """Decode ``body`` to an RGB image, rotated upright per its EXIF orientation tag.

    Always at full resolution (no JPEG draft mode): a query image hashed elsewhere through
    ``prepare_images`` must get the same code as the worker gives the stored one.
    ``name`` only appears in error messages.
    """
    if not body:
        raise ImageRejected(EMPTY, f"{name} is zero bytes")
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces Pillow's process-wide one (a warning, or an error at 2×).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(body))
    except UnidentifiedImageError:
        raise ImageRejected(NOT_AN_IMAGE, f"{name}: not an image format Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise ImageRejected(TOO_MANY_PIXELS, f"{name}: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # damaged headers raise any of these
        raise ImageRejected(TRUNCATED, f"{name}: unreadable header ({exc})") from None

    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected(TOO_MANY_PIXELS, f"{name} is {width}×{height} = {width * height} pixels, "
                                             f"over the limit of {max_pixels} (Settings.max_image_pixels)")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # "image file is truncated", "broken data stream", a corrupt EXIF block, ...
        raise ImageRejected(TRUNCATED, f"{name}: pixel data unreadable ({exc})") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode → RGB. Transparent pixels (RGBA, LA, palette with transparency) keep their colour
    channels: the alpha is dropped, not composited, so the same image always gives the same code."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # avoids Pillow's warning on palette transparency
    if image.mode.startswith("I;16"):
        image = image.convert("I")
    if image.mode == "I":
        # 16-bit grey (PNG) as 32-bit ints: scale to 8 bit; convert("RGB") would clip above 255
        image = image.point(lambda v: v * (255.0 / 65535.0)).convert("L")
    return image.convert("RGB")
