"""The audit's check of a video: can it be read, and how many frames can training draw from it, without
decoding every frame (a video file is demuxed and its first frame decoded, a frame folder listed, a GIF's
frames counted). The frames themselves are read by `data.video`.

    n_frames = probe_video("clips/a.mp4", settings, clip=None, source=("train.jsonl", 12))
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import DataError, UserError
from .frame_indices import clip_window, get_frame_indices
from .images import check_image
from .video import FOLDER_FPS, FRAME_EXTENSIONS, GIF_DEFAULT_FRAME_MS, import_av, sort_frame_files, video_error

if TYPE_CHECKING:
    from .encode import EncodeSettings


def probe_video(path: str, settings: EncodeSettings, clip, source: tuple[str, int]) -> int:
    """The largest number of frames training can draw from this video, checking that it can be read,
    without decoding every frame: a video file is demuxed to the end (packets counted) and its first
    frame decoded; a frame folder is listed and its first frame decoded; a GIF's frames are counted.

    'rand' and 'middle' draw T frames, T uniform in [min_num_frames, max_num_frames], and a video file
    or GIF is padded to T, so the worst case is max_num_frames; a frame folder gives min(frames, T).
    'fpsX' is deterministic: the exact count.
    """
    sample = settings.video_sample
    try:
        return _probe_video(path, settings, clip, source, sample)
    except DataError as e:
        raise video_error(e if e.path else DataError(e.kind, e.detail, path=path), source) from None
    except ValueError as e:  # a bad sampling setting
        raise UserError(f"video sampling: {e}") from None


def _probe_video(path: str, settings: EncodeSettings, clip, source, sample: str) -> int:
    is_dir = os.path.isdir(path)
    if path.endswith(("/", os.sep)) or is_dir:
        if not is_dir:
            raise DataError("missing_video", "frame folder not found", path=path)
        try:
            names = [n for n in os.listdir(path) if not n.startswith(".") and n.lower().endswith(FRAME_EXTENSIONS)
                     and os.path.isfile(os.path.join(path, n))]
        except OSError as e:
            raise DataError("unreadable_video", f"frame folder cannot be listed ({e.strerror or e})", path=path) from None
        if not names:
            raise DataError("unreadable_video", "frame folder holds no frame images", path=path)
        names = sort_frame_files(names)
        try:
            check_image(os.path.join(path, names[0]), settings.max_image_pixels, source)
        except DataError as e:
            raise DataError("unreadable_video", f"first frame {names[0]}: {e.detail}", path=path) from None
        vlen, fps, folder = len(names), FOLDER_FPS, True
    elif not os.path.exists(path):
        raise DataError("missing_video", "video file not found", path=path)
    elif path.lower().endswith(".gif"):
        vlen, fps = _probe_gif(path)
        folder = False
    else:
        vlen, fps = _probe_av(path)
        folder = False
    if sample.startswith("fps"):
        return len(get_frame_indices(None, vlen, sample, fps=fps, clip=clip, rng=0,
                                       min_num_frames=settings.min_num_frames,
                                       max_num_frames=settings.max_num_frames))
    idx = get_frame_indices(settings.max_num_frames, vlen, sample, fps=fps, clip=clip, rng=0,
                              min_num_frames=settings.min_num_frames, max_num_frames=settings.max_num_frames)
    if folder:
        _, window = clip_window(clip, vlen, fps)
        return min(window, settings.max_num_frames)
    return len(idx)


def _probe_gif(path: str) -> tuple[int, float | None]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            vlen = int(getattr(im, "n_frames", 1))
            total = 0
            for k in range(vlen):
                im.seek(k)
                d = im.info.get("duration") or 0
                total += d if d > 0 else GIF_DEFAULT_FRAME_MS
            im.seek(0)
            im.convert("RGB")
    except Exception as e:
        raise DataError("unreadable_video", f"GIF cannot be read ({type(e).__name__}: {e})", path=path) from None
    return vlen, (vlen / (total / 1000.0) if total else None)


def _probe_av(path: str) -> tuple[int, float | None]:
    av = import_av()
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise DataError("unreadable_video", "file has no video stream", path=path)
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else None
            packets, decoded = 0, False
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                packets += 1
                if not decoded and packets <= 64:
                    decoded = bool(packet.decode())
            if packets and not decoded:
                decoded = bool(stream.codec_context.decode(None))
    except DataError:
        raise
    except Exception as e:  # av.FFmpegError and friends: corrupt or unsupported file
        raise DataError("unreadable_video", f"video cannot be decoded ({type(e).__name__}: {e})", path=path) from None
    if packets == 0 or not decoded:
        raise DataError("unreadable_video", "video has no decodable frames", path=path)
    if not fps and stream.duration and stream.time_base:
        fps = packets / float(stream.duration * stream.time_base)
    return packets, fps
