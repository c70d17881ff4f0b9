"""Fixtures shared by the data tests."""

import pytest

from internvl_lora.internvl.checkpoint import load_tokenizer


@pytest.fixture(scope="module")
def tok(demo_folder):
    return load_tokenizer(demo_folder(4, 2) / "model")


@pytest.fixture(scope="session")
def write_video():
    """write_video(path, frames, fps=10, codec="mpeg4", options=None) -> path: encode RGB uint8 frames
    (H x W x 3 arrays, even sizes) into a video file with PyAV; tests that need it skip without PyAV."""
    av = pytest.importorskip("av")

    def write(path, frames, fps=10, codec="mpeg4", options=None):
        frames = list(frames)
        with av.open(str(path), "w") as c:
            s = c.add_stream(codec, rate=fps)
            s.height, s.width = frames[0].shape[:2]
            s.pix_fmt = "yuv420p"
            if options:
                s.options = options
            for f in frames:
                for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        return path

    return write
