"""HTML thumbnails of image files: a small base64 JPEG data URI in a <figure>, or a placeholder naming
the path when the file is missing or unreadable. Used by the self-contained HTML report."""

from __future__ import annotations

import base64
import html
import io
import os
from typing import Any

#: Longest side of an embedded image thumbnail, in pixels.
THUMB_MAX_PX = 160


def _e(x: Any) -> str:
    """Escape anything for HTML text or a quoted attribute."""
    return html.escape("" if x is None else str(x), quote=True)


def _thumbnail_uri(path: str | os.PathLike, max_px: int = THUMB_MAX_PX) -> tuple[str, int, int]:
    """Base64 JPEG data URI of a thumbnail (longest side <= max_px) and its size; raises on failure."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft("RGB", (max_px * 2, max_px * 2))  # decode at reduced scale: fast for big photos
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            rgb = Image.new("RGB", rgba.size, (255, 255, 255))
            rgb.paste(rgba, mask=rgba.getchannel("A"))
        else:
            rgb = im.convert("RGB")
    rgb.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=85, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), rgb.width, rgb.height


class Thumbs:
    """Per-report cache: the same image used by several samples is encoded once."""

    def __init__(self) -> None:
        self._cache: dict[str, str] = {}

    def html(self, path: Any) -> str:
        key = str(path)
        if key not in self._cache:
            self._cache[key] = self._render(key)
        return self._cache[key]

    @staticmethod
    def _render(path: str) -> str:
        name = os.path.basename(path) or path
        try:
            uri, w, h = _thumbnail_uri(path)
        except FileNotFoundError:
            return f'<div class="missing"><b>image not found</b><br>{_e(path)}</div>'
        except Exception as exc:  # unreadable, truncated, not an image, decompression bomb...
            why = f"{type(exc).__name__}: {exc}"
            if len(why) > 160:
                why = why[:157] + "..."
            return f'<div class="missing"><b>image unreadable</b><br>{_e(path)}<br><i>{_e(why)}</i></div>'
        return (
            f'<figure><img src="{uri}" width="{w}" height="{h}" alt="{_e(name)}" title="{_e(path)}">'
            f"<figcaption>{_e(name)}</figcaption></figure>"
        )

