"""Opening image files safely and turning them into RGB: clear errors for missing, unreadable, truncated or
oversized files, the opt-in EXIF transpose and alpha compositing, and the audit's cheap check with warnings
for what the RGB conversion would hide. Every image of training, chat and validate is opened here.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, NamedTuple

from PIL import Image, ImageOps

from ..errors import DataError

if TYPE_CHECKING:
    from .encode import EncodeSettings

ALPHA_BACKGROUNDS = {None: None, "white": (255, 255, 255)}
EXIF_ORIENTATION = 0x0112


def _image_error(path: str, source, e: Exception, when: str) -> DataError:
    file, line = source
    text = str(e)
    if isinstance(e, Image.DecompressionBombError):
        return DataError("huge_image", f"{path}: {text}", file, line)
    if "image file is truncated" in text or "Truncated File Read" in text:
        return DataError("truncated_image", f"image {path} is truncated (the file ends too early): {text}", file, line)
    return DataError("corrupt_image", f"cannot {when} image {path}: {type(e).__name__}: {text}", file, line)


def open_image(path: str, max_pixels: int, source: tuple[str, int], decode: bool = True,
               draft: tuple[int, int] | None = None, settings: EncodeSettings | None = None) -> Image.Image:
    """Open an image safely: a clear error for missing, unreadable, truncated or oversized files.

    `draft=(w, h)`: let a JPEG decoder scale down by a power of two while staying at least that big.
    With `decode` the image is loaded and in RGB mode, converted as `settings` say (`to_rgb`).
    """
    file, line = source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except FileNotFoundError:
        raise DataError("missing_image", f"image not found: {path}", file, line) from None
    except IsADirectoryError:
        raise DataError("missing_image", f"{path} is a folder, not an image", file, line) from None
    except Exception as e:  # PIL raises several types for unreadable files
        raise _image_error(path, source, e, "read") from None
    w, h = img.size
    if w < 1 or h < 1:
        img.close()
        raise DataError("corrupt_image", f"image {path} has size {w}x{h}", file, line)
    if w * h > max_pixels:
        img.close()
        raise DataError("huge_image", f"{path} is {w}x{h} pixels, above the limit of {max_pixels} "
                        "(data.max_image_pixels; a guard against decompression bombs)", file, line)
    return decode_image(img, path, source, draft, settings) if decode else img


def decode_image(img: Image.Image, path: str, source, draft: tuple[int, int] | None,
            settings: EncodeSettings | None) -> Image.Image:
    try:
        if draft is not None and img.format == "JPEG":
            img.draft("RGB", draft)
        img.load()
        return to_rgb(img, settings)
    except Exception as e:
        raise _image_error(path, source, e, "decode") from None


def exif_orientation(img: Image.Image) -> int:
    return int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)


def to_rgb(img: Image.Image, settings: EncodeSettings | None = None) -> Image.Image:
    """A loaded image as RGB. Default: the official `convert("RGB")` (alpha dropped, EXIF orientation
    ignored); `settings.exif_transpose` rotates upright first, `settings.alpha_background` composites
    transparent pixels on that colour."""
    if settings is not None and settings.exif_transpose and exif_orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    bg = ALPHA_BACKGROUNDS[settings.alpha_background] if settings is not None else None
    if bg is not None and _has_alpha(img):
        rgba = img.convert("RGBA")
        out = Image.new("RGBA", rgba.size, (*bg, 255))
        out.alpha_composite(rgba)
        img = out
    return img if img.mode == "RGB" else img.convert("RGB")


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


class ImageCheck(NamedTuple):
    size: tuple[int, int]  # (width, height) as training sees it (after an EXIF transpose when asked for)
    warnings: tuple[tuple[str, str], ...] = ()  # (kind, message)


def check_image(path: str, max_pixels: int, source: tuple[str, int],
                settings: EncodeSettings | None = None) -> ImageCheck:
    """Size of an image after a cheap but complete decode (JPEG draft mode at 1/8 scale), and warnings for
    what the RGB conversion would hide (`image_warnings`), from that same decode."""
    img = open_image(path, max_pixels, source, decode=False)
    w, h = img.size
    try:
        with img:
            if img.format == "JPEG":
                img.draft(None, (max(1, w // 8), max(1, h // 8)))
            img.load()
            turn = settings is not None and settings.exif_transpose and exif_orientation(img) in (5, 6, 7, 8)
            found = tuple(image_warnings(img, path, settings))
    except Exception as e:
        raise _image_error(path, source, e, "decode") from None
    return ImageCheck((h, w) if turn else (w, h), found)


def image_warnings(img: Image.Image, path: str, settings: EncodeSettings | None):
    """(kind, message) for a loaded image that the RGB conversion turns blank, strips of its transparency
    or leaves sideways (only where the settings do not already fix it)."""
    keep_alpha = settings is not None and settings.alpha_background is not None
    if not keep_alpha and _has_alpha(img):
        alpha = (img if "A" in img.getbands() else img.convert("RGBA")).getchannel("A")
        if alpha.getextrema()[0] < 255:
            yield ("alpha_dropped", f"image {path} (mode {img.mode}) has transparent pixels; convert('RGB') drops "
                   "the alpha and shows the colour stored under them (often black); set data.alpha_background: "
                   "white to composite them on white")
    orientation = exif_orientation(img)
    if orientation != 1 and not (settings is not None and settings.exif_transpose):
        yield ("exif_rotated", f"image {path} has EXIF orientation {orientation}: viewers show it turned or "
               "mirrored, training uses the pixels as stored (official); set data.exif_transpose: true to "
               "turn it upright")
    rgb = to_rgb(img, settings)
    if all(lo == hi for lo, hi in rgb.getextrema()):
        why = " (16-bit or 32-bit values clip to white in convert('RGB'))" if img.mode.startswith(("I", "F")) else ""
        yield ("blank_image", f"image {path} (mode {img.mode}) is one flat colour {rgb.getpixel((0, 0))} after "
               f"conversion to RGB{why}: the model sees a blank image")

