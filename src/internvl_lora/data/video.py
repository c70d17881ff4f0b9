"""Video frames for training, sampled the way the official InternVL training code samples them.

A record's ``video`` is a video file (decoded with PyAV, ``pip install av``), a folder of frame
images (a path ending in ``/`` or an existing directory), or a ``.gif`` (read with Pillow).

`get_frame_indices` reproduces the official ``get_frame_indices`` (``'rand'``, ``'middle'``,
``'fpsX'``) including its quirks; `load_video` picks the frames; `frame_prompt` builds the text
that replaces ``<video>\\n`` in the first question. Differences from the official code are listed
in docs/data-convert.md ("Video frames").
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import DataError
from ..internvl.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

__all__ = [
    "FRAME_EXTENSIONS",
    "SampledVideo",
    "get_frame_indices",
    "sample_video",
    "load_video",
    "frame_prompt",
    "expand_video_placeholder",
    "sort_frame_files",
]

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
FOLDER_FPS = 1.0  # frame folders carry no timing; 'fpsX' and clip assume one frame per second
GIF_DEFAULT_FRAME_MS = 100  # what browsers use for a GIF frame with no (or zero) delay



def _as_rng(rng: Any) -> np.random.Generator:
    if rng is None:
        return np.random.default_rng()
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator, an int seed or None, got {type(rng).__name__}")


def _parse_sample(sample: str) -> float | None:
    """None for 'rand'/'middle'; the output fps for 'fpsX'."""
    if sample in ("rand", "middle"):
        return None
    if isinstance(sample, str) and sample.startswith("fps"):
        try:
            out = float(sample[3:])
        except ValueError:
            out = float("nan")
        if not math.isfinite(out) or out <= 0:
            raise ValueError(f"bad sampling {sample!r}: write fps followed by a positive number, e.g. 'fps1' or 'fps0.5'")
        return out
    raise ValueError(f"unknown frame sampling {sample!r}; use 'rand', 'middle' or 'fpsX' (e.g. 'fps1')")


def _check_counts(min_num_frames: int, max_num_frames: int) -> None:
    if min_num_frames < 1 or max_num_frames < min_num_frames:
        raise ValueError(f"need 1 <= min_num_frames <= max_num_frames, got {min_num_frames} and {max_num_frames}")


def _clip_window(clip: Sequence[float] | None, vlen: int, fps: float | None) -> tuple[int, int]:
    """(start_index, number of frames) of the clip window, like the official code:
    start = int(start_s * fps), length = int((end_s - start_s) * fps), clamped to the video."""
    if clip is None:
        return 0, vlen
    if len(clip) != 2:
        raise DataError("bad_clip", f"clip must be [start_seconds, end_seconds], got {list(clip)!r}")
    start_s, end_s = float(clip[0]), float(clip[1])
    if not (math.isfinite(start_s) and math.isfinite(end_s)) or start_s < 0 or end_s <= start_s:
        raise DataError("bad_clip", f"clip [{start_s}, {end_s}] must satisfy 0 <= start < end")
    if not fps or fps <= 0:
        raise DataError("bad_clip", "the video has no frame rate, so a clip in seconds cannot be used")
    # 1e-9 guards float error such as 2.3 * 10 = 22.999999999999996
    start = int(start_s * fps + 1e-9)
    length = int((end_s - start_s) * fps + 1e-9)
    if start >= vlen:
        raise DataError("bad_clip", f"clip starts at {start_s}s but the video is only {vlen / fps:.3f}s long")
    length = min(length, vlen - start)
    if length < 1:
        raise DataError("bad_clip", f"clip [{start_s}, {end_s}] is shorter than one frame at {fps:g} fps")
    return start, length


def get_frame_indices(
    num_frames: int | None,
    vlen: int,
    sample: str = "rand",
    fps: float | None = None,
    clip: Sequence[float] | None = None,
    rng: Any = None,
    min_num_frames: int = 8,
    max_num_frames: int = 32,
) -> list[int]:
    """Indices of the frames to use, as the official training code picks them.

    * ``num_frames`` None: the frame count T is drawn uniformly from ``[min_num_frames, max_num_frames]``
      (``rng.integers(min, max + 1)``, the official ``np.random.randint(min, max + 1)``); this
      happens for every sampling mode, as in the official loader.
    * ``'rand'``: the window is cut into ``min(T, vlen)`` intervals at
      ``linspace(0, vlen, n + 1).astype(int)``; one index is drawn from ``[start, next_start - 2]``
      of each interval. If an interval is too short for that (``next_start - start < 2``) the whole
      draw falls back to the sorted first ``n`` entries of a random permutation of the window.
    * ``'middle'``: ``(start + next_start - 1) // 2`` of each interval.
    * Both: when the window has fewer than T frames, the list is padded with its last index.
    * ``'fpsX'``: X frames per second of video time: centres ``(k + 0.5) / X`` seconds, converted with
      ``fps`` and rounded half-to-even (numpy ``around``); indices past the window are dropped and the
      list is cut to ``max_num_frames``. T is not used. A window shorter than one period gives its
      middle frame (the official code would return nothing).
    * ``clip=[start_s, end_s]``: the window starts at ``int(start_s * fps)`` and holds
      ``int((end_s - start_s) * fps)`` frames (clamped to the video); indices are offset by the start.

    ``rng``: a ``numpy.random.Generator``, an int seed, or None (fresh entropy).

    >>> get_frame_indices(8, 40, "middle")
    [2, 7, 12, 17, 22, 27, 32, 37]
    >>> get_frame_indices(4, 2, "middle")
    [0, 1, 1, 1]
    >>> get_frame_indices(None, 40, "fps2", fps=10)
    [2, 8, 12, 18, 22, 28, 32, 38]
    """
    out_fps = _parse_sample(sample)
    if out_fps is None:
        _check_counts(min_num_frames, max_num_frames)
    elif max_num_frames < 1:
        raise ValueError(f"max_num_frames must be >= 1, got {max_num_frames}")
    if vlen < 1:
        raise DataError("empty_video", "the video has no frames")
    if fps is not None and (not math.isfinite(fps) or fps <= 0):
        raise DataError("bad_fps", f"frame rate must be positive, got {fps}")
    start, n = _clip_window(clip, vlen, fps)
    gen = _as_rng(rng)

    if out_fps is None:
        if num_frames is None:
            t = int(gen.integers(min_num_frames, max_num_frames + 1))
        else:
            t = int(num_frames)
            if t < 1:
                raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        k = min(t, n)
        bounds = np.linspace(0, n, k + 1).astype(int)
        ranges = [(int(bounds[i]), int(bounds[i + 1]) - 1) for i in range(k)]
        if sample == "rand":
            if all(hi > lo for lo, hi in ranges):
                idx = [int(gen.integers(lo, hi)) for lo, hi in ranges]
            else:
                perm = gen.permutation(n)[:k]
                idx = sorted(int(x) for x in perm)
        else:
            idx = [(lo + hi) // 2 for lo, hi in ranges]
        if len(idx) < t:
            idx = idx + [idx[-1]] * (t - len(idx))
    else:
        if fps is None:
            raise DataError("bad_fps", f"sampling {sample!r} needs the video frame rate")
        duration = n / fps
        delta = 1.0 / out_fps
        seconds = np.arange(delta / 2, duration + delta / 2, delta)
        idx = [int(i) for i in np.around(seconds * fps).astype(int) if i < n]
        if not idx:
            idx = [(n - 1) // 2]
        idx = idx[:max_num_frames]
    return [i + start for i in idx]


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


def _import_av():
    try:
        import av  # noqa: F401
    except ImportError:
        raise DataError("missing_dependency", "reading video files needs PyAV: run `pip install av` "
                                              "(or `pip install internvl-lora[video]`)") from None
    return av


def _sample_pyav(path: str, choose: Callable[[int, float | None, bool], list[int]], snapshot: Callable[[], Any],
                 restore: Callable[[Any], None]) -> SampledVideo:
    av = _import_av()

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
    by_fps = _parse_sample(sample) is not None
    if not by_fps:
        _check_counts(min_num_frames, max_num_frames)
    gen = _as_rng(rng)

    def choose(vlen: int, fps: float | None, folder: bool) -> list[int]:
        try:
            if folder and not by_fps:
                # Official: a folder is subsampled only when it has more frames than T (no padding).
                t = num_frames if num_frames is not None else int(gen.integers(min_num_frames, max_num_frames + 1))
                start, n = _clip_window(clip, vlen, fps)
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
