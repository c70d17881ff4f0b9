"""Media references of converted records: data: URLs decoded into image files (named by content
hash), file:// URLs and paths rewritten against ``source_root`` / ``media_root``."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import urllib.parse
from pathlib import Path

from .stream import Reject


class MediaWriter:
    """Decodes data: URLs into image files (named by content hash) and rewrites media paths."""

    def __init__(self, dst: Path, images_dir: str | os.PathLike | None,
                 media_root: str | os.PathLike | None, source_root: str | os.PathLike | None):
        self.dst_dir = dst.resolve().parent
        self.images_dir = Path(images_dir).resolve() if images_dir is not None else self.dst_dir / "images"
        self.media_root = Path(media_root).resolve() if media_root is not None else None
        self.source_root = Path(source_root) if source_root is not None else None
        self.created: list[Path] = []

    def rewrite(self, path: str) -> str:
        """Apply source_root / media_root to a local path taken from the input."""
        p = path
        if self.source_root is not None and not os.path.isabs(p):
            p = str(self.source_root / p)
        if self.media_root is not None and os.path.isabs(p):
            try:
                p = os.path.relpath(os.path.abspath(p), self.media_root)
            except ValueError:  # another drive on Windows: keep absolute
                pass
        return p

    def local_path(self, ref: str, what: str = "image") -> str:
        """A media reference from the input (path, file:// URL or data: URL) -> output path string."""
        if not isinstance(ref, str) or not ref.strip():
            raise Reject("bad_media", f"{what} reference must be a non-empty string, got {ref!r}")
        low = ref[:16].lower()
        if low.startswith("data:"):
            if what != "image":
                raise Reject("bad_media", f"data: URLs are supported for images only, not for a {what}")
            return self._decode_data_url(ref)
        if low.startswith("file://"):
            parsed = urllib.parse.urlparse(ref)
            return self.rewrite(urllib.parse.unquote(parsed.path))
        if low.startswith(("http://", "https://", "s3://", "gs://", "oss://")):
            raise Reject("remote_media", f"remote {what} {ref[:80]!r} is not supported; download it and give a local path")
        return self.rewrite(ref)

    _EXT = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/webp": ".webp",
            "image/gif": ".gif", "image/bmp": ".bmp", "image/tiff": ".tif"}

    def _decode_data_url(self, url: str) -> str:
        head, sep, payload = url.partition(",")
        if not sep:
            raise Reject("bad_data_url", "data: URL has no ',' before its payload")
        params = head[5:].split(";")
        mediatype = params[0].strip().lower()
        try:
            if "base64" in (p.strip().lower() for p in params[1:]):
                data = base64.b64decode(payload.strip(), validate=False)
            else:
                data = urllib.parse.unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as e:
            raise Reject("bad_data_url", f"data: URL payload cannot be decoded ({e})") from None
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = (im.format or "").lower()
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise Reject("bad_data_url", f"data: URL does not hold a readable image ({type(e).__name__}: {e})") from None
        ext = self._EXT.get(mediatype) or {"jpeg": ".jpg", "png": ".png", "webp": ".webp", "gif": ".gif",
                                            "bmp": ".bmp", "tiff": ".tif"}.get(fmt, "." + (fmt or "img"))
        name = hashlib.sha256(data).hexdigest()[:20] + ext
        target = self.images_dir / name
        if not (target.exists() and target.stat().st_size == len(data)):
            self.images_dir.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
            self.created.append(target)
        base = self.media_root if self.media_root is not None else self.dst_dir
        try:
            return os.path.relpath(target, base)
        except ValueError:
            return str(target)

    def cleanup(self) -> None:
        for p in self.created:
            try:
                p.unlink()
            except OSError:
                pass
