"""Which frames of a video training uses: the official InternVL ``get_frame_indices`` (``'rand'``,
``'middle'``, ``'fpsX'``) with its quirks, and the clip window in seconds. Pure index arithmetic: the
frames are read by `data.video`, and docs/data-convert.md ("Video frames") lists the differences from
the official code.

    get_frame_indices(8, 40, "middle")  ->  [2, 7, 12, 17, 22, 27, 32, 37]
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..errors import DataError

__all__ = ["get_frame_indices", "clip_window", "parse_sample", "check_counts", "as_rng"]


def as_rng(rng: Any) -> np.random.Generator:
    if rng is None:
        return np.random.default_rng()
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator, an int seed or None, got {type(rng).__name__}")


def parse_sample(sample: str) -> float | None:
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


def check_counts(min_num_frames: int, max_num_frames: int) -> None:
    if min_num_frames < 1 or max_num_frames < min_num_frames:
        raise ValueError(f"need 1 <= min_num_frames <= max_num_frames, got {min_num_frames} and {max_num_frames}")


def clip_window(clip: Sequence[float] | None, vlen: int, fps: float | None) -> tuple[int, int]:
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
    out_fps = parse_sample(sample)
    if out_fps is None:
        check_counts(min_num_frames, max_num_frames)
    elif max_num_frames < 1:
        raise ValueError(f"max_num_frames must be >= 1, got {max_num_frames}")
    if vlen < 1:
        raise DataError("empty_video", "the video has no frames")
    if fps is not None and (not math.isfinite(fps) or fps <= 0):
        raise DataError("bad_fps", f"frame rate must be positive, got {fps}")
    start, n = clip_window(clip, vlen, fps)
    gen = as_rng(rng)

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
