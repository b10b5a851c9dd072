"""Decode stage: image bytes → an upright RGB PIL image, refusing what is not a sane image.

Refusals (``UndecodableImage``, with a short ``reason``): zero bytes, not an image, truncated pixel
data, a damaged or unsupported variant of a format, and images with more pixels than ``max_pixels``.
Any error Pillow raises for the bytes (its plugins raise ``NotImplementedError``, ``RuntimeError``,
``struct.error``, ``IndexError``, ``TypeError``, ... besides ``OSError``) is a refusal naming the
exception; only ``MemoryError`` passes through, since it says nothing about these bytes. The pixel count is read from the header, before any pixel is decoded,
so a decompression bomb (e.g. a 50,000 × 50,000 PNG of a few KB) is refused without allocating it.
"""
from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

# Reasons, as the index's failures rows carry them.
EMPTY = "empty"  # zero bytes
NOT_AN_IMAGE = "not_an_image"  # Pillow cannot identify the format
TRUNCATED = "truncated"  # the header parses but the pixel data is cut short or corrupt
TOO_MANY_PIXELS = "too_many_pixels"  # over the pixel limit: a decompression bomb, refused unloaded
# Pillow raised something else: a damaged or unsupported variant (a DDS pixel format, a BLP compression
# it does not implement, an AVIF item libavif cannot decode, a mode with no RGB conversion, ...)
CORRUPT = "corrupt"
# What Pillow raises for a truncated or damaged file: "image file is truncated", "broken data stream",
# a bad EXIF block, a cut header.
_TRUNCATION = (OSError, SyntaxError, ValueError, EOFError)


class UndecodableImage(ValueError):
    """Bytes that cannot become an image, for a permanent ``reason``; ``detail`` names the input."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_image(body: bytes, max_pixels: int, *, name: str = "image") -> Image.Image:
    """Decode ``body`` to an RGB image, rotated upright per its EXIF orientation tag.

    The one decoder of the project: the encode workers and SQL's ``hash_image`` both call it, so a
    query image gets the code its stored copy got. Always at full resolution (no JPEG draft mode).
    ``name`` only appears in error messages.
    """
    if not body:
        raise UndecodableImage(EMPTY, f"{name} is zero bytes")
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces Pillow's process-wide one (a warning, or an error at 2×).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(body))
    except UnidentifiedImageError:
        raise UndecodableImage(NOT_AN_IMAGE, f"{name}: not an image format Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise UndecodableImage(TOO_MANY_PIXELS, f"{name}: {exc}") from None
    except MemoryError:
        raise
    except _TRUNCATION as exc:  # damaged headers raise any of these
        raise UndecodableImage(TRUNCATED, f"{name}: unreadable header ({_named(exc)})") from None
    except Exception as exc:  # a plugin's own error (NotImplementedError, struct.error, ...)
        raise UndecodableImage(CORRUPT, f"{name}: unreadable header ({_named(exc)})") from None

    width, height = image.size
    if width * height > max_pixels:
        raise UndecodableImage(TOO_MANY_PIXELS, f"{name} is {width}×{height} = {width * height} pixels, "
                                             f"over the limit of {max_pixels} (Settings.max_image_pixels)")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except MemoryError:
        raise
    except _TRUNCATION as exc:
        raise UndecodableImage(TRUNCATED, f"{name}: pixel data unreadable ({_named(exc)})") from None
    except Exception as exc:  # e.g. libavif's RuntimeError, a DDS pixel format's NotImplementedError
        raise UndecodableImage(CORRUPT, f"{name}: pixel data unreadable ({_named(exc)})") from None
    try:
        return to_rgb(image)
    except MemoryError:
        raise
    except Exception as exc:  # a mode Pillow cannot convert ("conversion from La to L not supported")
        raise UndecodableImage(CORRUPT, f"{name}: no RGB conversion from mode {image.mode} ({_named(exc)})") from None


def _named(exc: BaseException) -> str:
    """``ValueError: broken data stream``: the exception's type and message, for a failure's detail."""
    return f"{exc.__class__.__name__}: {exc}"


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
