"""Tests for internvl_lora.data.video (frames read as the official InternVL training code reads them)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from internvl_lora.data.video import (
    expand_video_placeholder,
    frame_prompt,
    load_video,
    sample_video,
    sort_frame_files,
)
from internvl_lora.errors import DataError

av = pytest.importorskip("av")

N_FRAMES = 40
FPS = 10
BITS = 6  # frame number written as 6 black/white stripes, 8 px wide: survives lossy coding


def frame_array(i: int) -> np.ndarray:
    arr = np.zeros((16, 8 * BITS, 3), np.uint8)
    for b in range(BITS):
        if (i >> b) & 1:
            arr[:, 8 * b: 8 * b + 8] = 255
    return arr


def frame_number(img: Image.Image) -> int:
    a = np.asarray(img.convert("L"), dtype=np.float32)
    return sum(1 << b for b in range(BITS) if a[4:12, 8 * b + 2: 8 * b + 6].mean() > 128)


def numbers(frames) -> list[int]:
    return [frame_number(f) for f in frames]


@pytest.fixture(scope="module")
def media(tmp_path_factory, write_video):
    d = tmp_path_factory.mktemp("media")
    frames = [frame_array(i) for i in range(N_FRAMES)]
    mp4 = write_video(d / "clip.mp4", frames, fps=FPS, options={"qscale": "2"})
    mkv = write_video(d / "clip.mkv", frames, fps=FPS, options={"qscale": "2"})
    folder = d / "frames"
    folder.mkdir()
    for i in range(12):  # frame_1 .. frame_12: lexicographic order would put frame_10 before frame_2
        Image.fromarray(frame_array(i)).save(folder / f"frame_{i + 1}.png")
    (folder / ".DS_Store").write_bytes(b"junk")
    (folder / "notes.txt").write_text("not a frame")
    gif = d / "anim.gif"
    imgs = [Image.fromarray(frame_array(i)) for i in range(10)]
    imgs[0].save(gif, save_all=True, append_images=imgs[1:], duration=50, loop=0)
    return {"mp4": mp4, "mkv": mkv, "folder": folder, "gif": gif, "dir": d}


# ------------------------------------------------------------------------------ video files


def test_video_middle_picks_expected_frames(media):
    frames = load_video(media["mp4"], "middle", min_num_frames=8, max_num_frames=8)
    assert len(frames) == 8 and all(f.mode == "RGB" and f.size == (48, 16) for f in frames)
    assert numbers(frames) == [2, 7, 12, 17, 22, 27, 32, 37]


def test_video_rand_is_deterministic_and_matches_indices(media):
    a = sample_video(media["mp4"], "rand", 4, 12, rng=np.random.default_rng(3))
    b = sample_video(media["mp4"], "rand", 4, 12, rng=np.random.default_rng(3))
    assert a.indices == b.indices and 4 <= len(a.indices) <= 12
    assert numbers(a.frames) == a.indices
    assert (a.vlen, a.fps, a.kind) == (40, 10.0, "video")


def test_video_fps_clip_and_padding(media):
    assert numbers(load_video(media["mp4"], "fps2", rng=0)) == [2, 8, 12, 18, 22, 28, 32, 38]
    clip = load_video(media["mp4"], "middle", 5, 5, clip=[1.0, 2.5])
    assert numbers(clip) == [11, 14, 17, 20, 23]
    padded = load_video(media["mp4"], "middle", num_frames=45)
    assert len(padded) == 45 and numbers(padded[:40]) == list(range(40)) and numbers(padded[40:]) == [39] * 5


def test_video_without_frame_count_metadata(media):
    sv = sample_video(media["mkv"], "middle", 4, 4)
    assert sv.vlen == 40 and numbers(sv.frames) == sv.indices == [4, 14, 24, 34]


def test_video_errors(media, tmp_path, monkeypatch):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x01not a video at all" * 50)
    with pytest.raises(DataError) as ei:
        load_video(bad)
    assert ei.value.kind == "unreadable_video" and ei.value.path == str(bad) and str(bad) in str(ei.value)

    with pytest.raises(DataError) as ei:
        load_video(tmp_path / "missing.mp4")
    assert ei.value.kind == "missing_video"

    with pytest.raises(DataError) as ei:
        load_video(media["mp4"], "middle", clip=[10, 12])
    assert ei.value.kind == "bad_clip" and ei.value.path == str(media["mp4"])

    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(DataError) as ei:
        load_video(media["mp4"])
    assert ei.value.kind == "missing_dependency" and "pip install av" in str(ei.value)


def test_truncated_video_is_unreadable(media, tmp_path):
    cut = tmp_path / "cut.mp4"
    data = media["mp4"].read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError) as ei:
        load_video(cut, "middle", 8, 8)
    assert ei.value.kind == "unreadable_video" and ei.value.path == str(cut)


# ------------------------------------------------------------------------------ frame folders and GIFs


def test_sort_frame_files():
    names = ["f_10.jpg", "f_2.jpg", "f_1.png", "cover.jpg", "img9.jpg", "img10.jpg"]
    assert sort_frame_files(names) == ["cover.jpg", "img9.jpg", "img10.jpg", "f_1.png", "f_2.jpg", "f_10.jpg"]


def test_frame_folder(media):
    folder = media["folder"]
    # 12 frames > T = 4: subsampled ('middle' of linspace(0, 12, 5) -> 1, 4, 7, 10), in numeric order
    sv = sample_video(str(folder) + "/", "middle", 4, 4)
    assert sv.kind == "folder" and sv.vlen == 12 and numbers(sv.frames) == [1, 4, 7, 10]
    # no more frames than T: all of them, not padded (official behaviour); a directory path works too
    assert numbers(load_video(folder, "rand", 12, 20, rng=0)) == list(range(12))
    # folders are taken as 1 frame per second for 'fpsX' and clips
    assert numbers(load_video(folder, "fps0.5", rng=0)) == [1, 3, 5, 7, 9, 11]
    assert numbers(load_video(folder, "middle", 20, 20, clip=[2, 5])) == [2, 3, 4]


def test_frame_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as ei:
        load_video(str(empty) + "/")
    assert ei.value.kind == "unreadable_video" and "no frame images" in str(ei.value)
    with pytest.raises(DataError) as ei:
        load_video(str(tmp_path / "nope") + "/")
    assert ei.value.kind == "missing_video"
    broken = tmp_path / "broken"
    broken.mkdir()
    Image.fromarray(frame_array(1)).save(broken / "f_1.png")
    (broken / "f_2.png").write_bytes(b"garbage")
    with pytest.raises(DataError) as ei:
        load_video(broken, "middle", 4, 4)
    assert ei.value.kind == "unreadable_video" and ei.value.path == str(broken / "f_2.png")


def test_gif(media, tmp_path):
    sv = sample_video(media["gif"], "middle", 5, 5)
    assert (sv.kind, sv.vlen, sv.fps) == ("gif", 10, 20.0)  # 50 ms per frame
    assert numbers(sv.frames) == sv.indices == [0, 2, 4, 6, 8]
    assert numbers(load_video(media["gif"], "fps10", rng=0)) == [1, 3, 5, 7, 9]
    padded = load_video(media["gif"], "middle", 12, 12)  # like a video file: padded with the last frame
    assert numbers(padded) == list(range(10)) + [9, 9]
    bad = tmp_path / "bad.gif"
    bad.write_bytes(b"GIF89a" + b"\x00" * 20)
    with pytest.raises(DataError) as ei:
        load_video(bad)
    assert ei.value.kind == "unreadable_video" and ei.value.path == str(bad)


# ------------------------------------------------------------------------------ prompt


def test_frame_prompt_exact_string():
    assert frame_prompt(1) == "Frame-1: <image>\n"
    assert frame_prompt(3) == "Frame-1: <image>\nFrame-2: <image>\nFrame-3: <image>\n"
    with pytest.raises(ValueError):
        frame_prompt(0)


def test_expand_video_placeholder():
    assert expand_video_placeholder("<video>\nWhat happens?", 2) == "Frame-1: <image>\nFrame-2: <image>\nWhat happens?"
    assert expand_video_placeholder("What happens?", 1) == "Frame-1: <image>\nWhat happens?"
    assert expand_video_placeholder("Look: <video>\nnow", 1) == "Look: Frame-1: <image>\nnow"
    assert expand_video_placeholder("<video>What?", 1) == "Frame-1: <image>\nWhat?"


def test_video_whose_frame_count_metadata_is_too_high(media, monkeypatch):
    """A container that claims more frames than it holds: sampled again on the frames that exist,
    with the same random draws as for an honest file."""
    real_open = av.open

    class StreamProxy:
        frames = 60

        def __init__(self, real):
            object.__setattr__(self, "_real", real)

        def __getattr__(self, name):
            return getattr(self._real, name)

        def __setattr__(self, name, value):
            setattr(self._real, name, value)

    class ContainerProxy:
        def __init__(self, real):
            self._real = real
            self.streams = type("Streams", (), {"video": [StreamProxy(real.streams.video[0])]})()
            self.duration = real.duration

        def decode(self, stream):
            return self._real.decode(stream._real)

        def close(self):
            self._real.close()

    honest = sample_video(media["mp4"], "rand", 4, 12, rng=5)
    monkeypatch.setattr(av, "open", lambda path, *a, **k: ContainerProxy(real_open(path, *a, **k)))
    sv = sample_video(media["mp4"], "middle", 4, 4)
    assert sv.vlen == 40 and numbers(sv.frames) == sv.indices == [4, 14, 24, 34]
    lying = sample_video(media["mp4"], "rand", 4, 12, rng=5)
    assert lying.indices == honest.indices and numbers(lying.frames) == honest.indices
