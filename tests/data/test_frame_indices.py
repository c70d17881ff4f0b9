"""Tests for internvl_lora.data.frame_indices (which frames, as the official InternVL training code picks them)."""

from __future__ import annotations

import numpy as np
import pytest

from internvl_lora.data.frame_indices import get_frame_indices
from internvl_lora.errors import DataError


def test_middle_indices_exact():
    assert get_frame_indices(8, 40, "middle") == [2, 7, 12, 17, 22, 27, 32, 37]
    # linspace(0, 10, 4).astype(int) = [0, 3, 6, 10] -> ranges (0,2) (3,5) (6,9)
    assert get_frame_indices(3, 10, "middle") == [1, 4, 7]
    # shorter than T: one index per frame, padded with the last one
    assert get_frame_indices(6, 3, "middle") == [0, 1, 2, 2, 2, 2]


def test_rand_one_index_per_interval_excluding_interval_end():
    for seed in range(50):
        idx = get_frame_indices(8, 40, "rand", rng=seed)
        assert len(idx) == 8
        for k, i in enumerate(idx):
            assert 5 * k <= i <= 5 * k + 3  # official draws from [start, next_start - 2]


def test_rand_seeded_rng_is_deterministic():
    a = get_frame_indices(None, 300, "rand", rng=np.random.default_rng(7))
    b = get_frame_indices(None, 300, "rand", rng=np.random.default_rng(7))
    assert a == b and a == sorted(a)
    assert get_frame_indices(None, 300, "rand", rng=7) == a


def test_frame_count_drawn_from_min_max():
    rng = np.random.default_rng(0)
    counts = {len(get_frame_indices(None, 1000, "rand", rng=rng, min_num_frames=4, max_num_frames=7)) for _ in range(200)}
    assert counts == {4, 5, 6, 7}
    # 'middle' draws T too (as the official loader), so a fixed count needs min == max or num_frames
    assert len(get_frame_indices(None, 100, "middle", rng=1, min_num_frames=5, max_num_frames=5)) == 5


def test_rand_falls_back_to_sorted_permutation_when_intervals_are_too_short():
    # linspace(0, 10, 9).astype(int) has intervals of length 1 -> the official fallback
    for seed in range(20):
        idx = get_frame_indices(8, 10, "rand", rng=seed)
        assert len(idx) == 8 and idx == sorted(set(idx)) and all(0 <= i < 10 for i in idx)
    # shorter than T: permutation of all frames, padded with the last index
    assert get_frame_indices(5, 3, "rand", rng=0) == [0, 1, 2, 2, 2]


def test_fps_sampling():
    # centres 0.25 s, 0.75 s, ... at 10 fps -> 2.5, 7.5, ... rounded half-to-even like numpy
    assert get_frame_indices(None, 40, "fps2", fps=10) == [2, 8, 12, 18, 22, 28, 32, 38]
    assert get_frame_indices(None, 40, "fps1", fps=10) == [5, 15, 25, 35]
    assert get_frame_indices(None, 40, "fps2", fps=10, max_num_frames=3) == [2, 8, 12]
    assert get_frame_indices(None, 40, "fps0.5", fps=10) == [10, 30]
    # shorter than one period: the middle frame instead of nothing
    assert get_frame_indices(None, 3, "fps0.1", fps=30) == [1]
    with pytest.raises(DataError, match="frame rate"):
        get_frame_indices(None, 40, "fps1")


def test_clip_window():
    # clip [1.0, 2.5] s at 10 fps: start 10, 15 frames; middle of 5 intervals, offset by the start
    assert get_frame_indices(5, 40, "middle", fps=10, clip=[1.0, 2.5]) == [11, 14, 17, 20, 23]
    assert get_frame_indices(None, 40, "fps1", fps=10, clip=[2, 4]) == [25, 35]
    # float error guard: 2.3 s * 10 fps is 22.999... in floating point
    assert get_frame_indices(1, 40, "middle", fps=10, clip=[0, 2.3]) == [11]
    # end past the video: clamped
    assert get_frame_indices(2, 40, "middle", fps=10, clip=[3, 100]) == [32, 37]
    for seed in range(10):
        assert all(30 <= i < 40 for i in get_frame_indices(4, 40, "rand", fps=10, clip=[3, 9], rng=seed))
    for bad in ([5, 9], [2, 1], [-1, 2], [1]):
        with pytest.raises(DataError) as ei:
            get_frame_indices(2, 40, "middle", fps=10, clip=bad)
        assert ei.value.kind == "bad_clip"
    with pytest.raises(DataError, match="frame rate"):
        get_frame_indices(2, 40, "middle", clip=[0, 1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown frame sampling"):
        get_frame_indices(4, 10, "uniform")
    with pytest.raises(ValueError, match="fps followed by"):
        get_frame_indices(4, 10, "fpsx", fps=10)
    with pytest.raises(ValueError, match="min_num_frames"):
        get_frame_indices(None, 10, "rand", min_num_frames=9, max_num_frames=4)
    with pytest.raises(DataError) as ei:
        get_frame_indices(4, 0, "rand")
    assert ei.value.kind == "empty_video"
    with pytest.raises(TypeError):
        get_frame_indices(4, 10, "rand", rng="seed")
