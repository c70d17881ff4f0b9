"""Video frames for training, read the way the official InternVL training code reads them.

A record's ``video`` is a video file (decoded with PyAV, ``pip install av``), a folder of frame
images (a path ending in ``/`` or an existing directory), or a ``.gif`` (read with Pillow).

`load_video` reads the frames that `data.frame_indices.get_frame_indices` picks; `frame_prompt` builds
the text that replaces ``<video>\\n`` in the first question. The audit's cheaper check (frame count
without decoding) is `data.video_probe`. Differences from the official code are listed in
docs/data-convert.md ("Video frames").
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import DataError
from ..internvl.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from .frame_indices import as_rng, check_counts, clip_window, get_frame_indices, parse_sample

__all__ = [
    "FRAME_EXTENSIONS",
    "SampledVideo",
    "sample_video",
    "load_video",
    "frame_prompt",
    "expand_video_placeholder",
    "sort_frame_files",
]

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
FOLDER_FPS = 1.0  # frame folders carry no timing; 'fpsX' and clip assume one frame per second
GIF_DEFAULT_FRAME_MS = 100  # what browsers use for a GIF frame with no (or zero) delay


@dataclass
class SampledVideo:
    """Frames picked from one video, with how they were picked."""

    frames: list = field(default_factory=list)  # PIL.Image.Image, RGB, in index order
    indices: list[int] = field(default_factory=list)  # frame numbers in the source
    fps: float | None = None
    vlen: int = 0  # frames in the source
    kind: str = "video"  # "video" | "folder" | "gif"


_NUM_SUFFIX = re.compile(r"_(\d+)\.[A-Za-z0-9]+$")
_DIGITS = re.compile(r"(\d+)")


def _natural_key(name: str) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p.lower()) for p in _DIGITS.split(name) if p]


def sort_frame_files(names: Sequence[str]) -> list[str]:
    """Frame files in temporal order: by the number in a ``_<n>.<ext>`` suffix like the official
    loader (names without one first, as the official key gives them -1), ties in natural order."""
    def key(name: str):
        m = _NUM_SUFFIX.search(os.path.basename(name))
        return (int(m.group(1)) if m else -1, _natural_key(os.path.basename(name)))

    return sorted(names, key=key)


def _unreadable(path: str, detail: str) -> DataError:
    return DataError("unreadable_video", detail, path=path)


def _with_path(err: DataError, path: str) -> DataError:
    return DataError(err.kind, err.detail, path=path)


def video_error(e: DataError, source) -> DataError:
    """A video's DataError located at the record line `source` (file, line) that names the video."""
    where = f"{e.path}: " if e.path else ""
    return DataError(e.kind, where + e.detail, *source)


def _open_image_rgb(fp: str, video: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(fp) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise _unreadable(fp, f"frame of {video} cannot be read ({type(e).__name__}: {e})") from None


def _sample_folder(path: str, choose: Callable[[int, float | None, bool], list[int]]) -> SampledVideo:
    try:
        names = [n for n in os.listdir(path) if not n.startswith(".") and n.lower().endswith(FRAME_EXTENSIONS)
                 and os.path.isfile(os.path.join(path, n))]
    except OSError as e:
        raise _unreadable(path, f"frame folder cannot be listed ({e.strerror or e})") from None
    if not names:
        raise _unreadable(path, f"frame folder holds no frame images ({', '.join(FRAME_EXTENSIONS)})")
    names = sort_frame_files(names)
    vlen = len(names)
    indices = choose(vlen, FOLDER_FPS, True)
    frames = [_open_image_rgb(os.path.join(path, names[i]), path) for i in indices]
    return SampledVideo(frames, indices, FOLDER_FPS, vlen, "folder")


def _sample_gif(path: str, choose: Callable[[int, float | None, bool], list[int]]) -> SampledVideo:
    from PIL import Image, ImageSequence

    try:
        with Image.open(path) as im:
            vlen = int(getattr(im, "n_frames", 1))
            durations = []
            for fr in ImageSequence.Iterator(im):
                d = fr.info.get("duration") or 0
                durations.append(d if d > 0 else GIF_DEFAULT_FRAME_MS)
            fps = vlen / (sum(durations) / 1000.0) if durations else None
            indices = choose(vlen, fps, False)
            wanted = set(indices)
            picked = {}
            for i, fr in enumerate(ImageSequence.Iterator(im)):
                if i in wanted:
                    picked[i] = fr.convert("RGB")
                    if len(picked) == len(wanted):
                        break
    except DataError:
        raise
    except Exception as e:  # PIL raises many types on corrupt files
        raise _unreadable(path, f"GIF cannot be read ({type(e).__name__}: {e})") from None
    missing = wanted - set(picked)
    if missing:
        raise _unreadable(path, f"GIF ended before frame {min(missing)}")
    return SampledVideo([picked[i] for i in indices], indices, fps, vlen, "gif")


def import_av():
    try:
        import av  # noqa: F401
    except ImportError:
        raise DataError("missing_dependency", "reading video files needs PyAV: run `pip install av` "
                                              "(or `pip install internvl-lora[video]`)") from None
    return av


def _sample_pyav(path: str, choose: Callable[[int, float | None, bool], list[int]], snapshot: Callable[[], Any],
                 restore: Callable[[Any], None]) -> SampledVideo:
    av = import_av()

    def open_stream():
        container = av.open(path)
        if not container.streams.video:
            container.close()
            raise _unreadable(path, "file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return container, stream

    def count_frames() -> int:
        container, stream = open_stream()
        try:
            return sum(1 for _ in container.decode(stream))
        finally:
            container.close()

    def grab(indices: list[int]) -> tuple[dict, int, bool]:
        """Decode up to the last wanted index; (images, frames decoded, reached end)."""
        wanted = set(indices)
        last = max(indices)
        picked, n = {}, 0
        container, stream = open_stream()
        try:
            for n, frame in enumerate(container.decode(stream), start=1):
                i = n - 1
                if i in wanted:
                    picked[i] = frame.to_image().convert("RGB")
                if i >= last:
                    return picked, n, False
            return picked, n, True
        finally:
            container.close()

    try:
        container, stream = open_stream()
        try:
            vlen = int(stream.frames or 0)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else None
            duration = None
            if stream.duration and stream.time_base:
                duration = float(stream.duration * stream.time_base)
            elif container.duration:
                duration = container.duration / 1_000_000
        finally:
            container.close()
        if vlen <= 0:
            vlen = count_frames()
        if vlen <= 0:
            raise _unreadable(path, "video has no decodable frames")
        if not fps and duration:
            fps = vlen / duration
        state = snapshot()
        indices = choose(vlen, fps, False)
        picked, decoded, ended = grab(indices)
        if len(picked) < len(set(indices)):
            # The container's frame count was too high; sample again on the frames that exist.
            if ended and decoded > 0:
                restore(state)
                vlen = decoded
                indices = choose(vlen, fps, False)
                picked, decoded, ended = grab(indices)
            if len(picked) < len(set(indices)):
                raise _unreadable(path, f"video ended after {decoded} frame(s), before frame {max(indices)}")
    except DataError as e:
        raise e if e.path else _with_path(e, path)
    except Exception as e:  # av.FFmpegError and friends: corrupt or unsupported file
        raise _unreadable(path, f"video cannot be decoded ({type(e).__name__}: {e})") from None
    return SampledVideo([picked[i] for i in indices], indices, fps, vlen, "video")


def sample_video(
    path: str | os.PathLike,
    sample: str = "rand",
    min_num_frames: int = 8,
    max_num_frames: int = 32,
    clip: Sequence[float] | None = None,
    rng: Any = None,
    num_frames: int | None = None,
) -> SampledVideo:
    """Like `load_video`, but also returns the picked indices, the frame rate and the length."""
    p = os.fspath(path)
    by_fps = parse_sample(sample) is not None
    if not by_fps:
        check_counts(min_num_frames, max_num_frames)
    gen = as_rng(rng)

    def choose(vlen: int, fps: float | None, folder: bool) -> list[int]:
        try:
            if folder and not by_fps:
                # Official: a folder is subsampled only when it has more frames than T (no padding).
                t = num_frames if num_frames is not None else int(gen.integers(min_num_frames, max_num_frames + 1))
                start, n = clip_window(clip, vlen, fps)
                if n > t:
                    return get_frame_indices(t, vlen, sample, fps=fps, clip=clip, rng=gen,
                                             min_num_frames=min_num_frames, max_num_frames=max_num_frames)
                return list(range(start, start + n))
            return get_frame_indices(num_frames, vlen, sample, fps=fps, clip=clip, rng=gen,
                                     min_num_frames=min_num_frames, max_num_frames=max_num_frames)
        except DataError as e:
            raise _with_path(e, p) from None

    is_dir = os.path.isdir(p)
    if p.endswith(("/", os.sep)) or is_dir:
        if not is_dir:
            raise DataError("missing_video", "frame folder not found", path=p)
        return _sample_folder(p, choose)
    if not os.path.exists(p):
        raise DataError("missing_video", "video file not found", path=p)
    if p.lower().endswith(".gif"):
        return _sample_gif(p, choose)
    return _sample_pyav(p, choose, lambda: gen.bit_generator.state, lambda s: setattr(gen.bit_generator, "state", s))


def load_video(
    path: str | os.PathLike,
    sample: str = "rand",
    min_num_frames: int = 8,
    max_num_frames: int = 32,
    clip: Sequence[float] | None = None,
    rng: Any = None,
    *,
    num_frames: int | None = None,
) -> list:
    """The training frames of one video as RGB PIL images, in temporal order.

    ``path``: a video file (PyAV), a frame folder (ends in ``/`` or is a directory) or a ``.gif``.
    The frame count is drawn from ``[min_num_frames, max_num_frames]`` unless ``num_frames`` is
    given; see `get_frame_indices` for ``sample`` and ``clip``. Frame folders return all their
    frames when they hold no more than that count (official behaviour); videos and GIFs repeat the
    last frame to reach it. Raises `DataError` ``missing_video``, ``unreadable_video``, ``bad_clip``
    or ``missing_dependency`` (PyAV not installed), naming the file.
    """
    return sample_video(path, sample, min_num_frames, max_num_frames, clip, rng, num_frames).frames


def frame_prompt(num_frames: int) -> str:
    """The text that replaces ``<video>\\n`` in the first question (official training format).

    >>> frame_prompt(3)
    'Frame-1: <image>\\nFrame-2: <image>\\nFrame-3: <image>\\n'
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return "\n".join(f"Frame-{i}: {IMAGE_PLACEHOLDER}" for i in range(1, num_frames + 1)) + "\n"


def expand_video_placeholder(text: str, num_frames: int) -> str:
    """Put the frame lines in place of the video tag of a first question.

    As the official loader: a question without ``<video>`` first gets ``<video>\\n`` in front, then
    ``<video>\\n`` is replaced by `frame_prompt`. Unlike it, a ``<video>`` not followed by a newline
    is replaced too (the official code leaves it as literal text, so the sample has no image tokens).

    >>> expand_video_placeholder("What happens?", 2)
    'Frame-1: <image>\\nFrame-2: <image>\\nWhat happens?'
    """
    if VIDEO_PLACEHOLDER not in text:
        text = VIDEO_PLACEHOLDER + "\n" + text
    frames = frame_prompt(num_frames)
    if VIDEO_PLACEHOLDER + "\n" in text:
        return text.replace(VIDEO_PLACEHOLDER + "\n", frames)
    return text.replace(VIDEO_PLACEHOLDER, frames)
