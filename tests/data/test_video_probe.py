"""Tests for internvl_lora.data.video_probe (the audit's frame count of a video, without decoding it all)."""

from __future__ import annotations

import pytest
from PIL import Image

from internvl_lora.data.encode import EncodeSettings
from internvl_lora.data.video_probe import probe_video
from internvl_lora.errors import DataError
from internvl_lora.internvl.templates import get_template

SOURCE = ("train.jsonl", 3)


def settings(sample: str, lo: int, hi: int) -> EncodeSettings:
    return EncodeSettings(template=get_template("internvl2_5"), tile_size=28, tokens_per_tile=4, max_dynamic_patch=1,
                          video_sample=sample, min_num_frames=lo, max_num_frames=hi)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "frames"
    d.mkdir()
    for i in range(5):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(d / f"f_{i}.png")
    return d


def test_frame_folder_gives_at_most_its_frames(folder):
    # rand/middle: a folder is not padded, so min(frames in the window, max_num_frames)
    assert probe_video(str(folder), settings("rand", 2, 8), None, SOURCE) == 5
    assert probe_video(str(folder), settings("middle", 2, 3), None, SOURCE) == 3
    # a folder plays at one frame per second: the clip [1, 3] holds frames 1 and 2
    assert probe_video(str(folder), settings("rand", 2, 8), [1, 3], SOURCE) == 2
    # fpsX: the exact count
    assert probe_video(str(folder), settings("fps1", 1, 8), None, SOURCE) == 5


def test_gif_is_padded_to_max_num_frames(tmp_path):
    gif = tmp_path / "a.gif"
    frames = [Image.new("RGB", (8, 8), (0, 50 * i, 0)) for i in range(4)]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert probe_video(str(gif), settings("rand", 2, 6), None, SOURCE) == 6


def test_missing_video_names_the_record_line(tmp_path):
    with pytest.raises(DataError) as e:
        probe_video(str(tmp_path / "nope.mp4"), settings("rand", 2, 6), None, SOURCE)
    assert e.value.kind == "missing_video" and "nope.mp4" in str(e.value) and "train.jsonl" in str(e.value)
