"""Shared fixtures for the reliability tests: the demo checkpoint, the CLI, and a dataset with every
class of broken input planted among good samples (with the (kind, file, line) of each plant)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def cli_path() -> str:
    exe = Path(sys.executable).parent / "internvl-lora"
    return str(exe) if exe.exists() else (shutil.which("internvl-lora") or str(exe))


def run_cli(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run([cli_path(), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def cli():
    """Run `internvl-lora ARGS...` in a subprocess: cli(*args) -> CompletedProcess."""
    return run_cli


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    from internvl_lora.demo import prepare

    d = tmp_path_factory.mktemp("reliability-demo")
    prepare(d, n_train=16, n_heldout=4)
    return d


def png_bomb(path: Path, width: int, height: int) -> None:
    """A valid PNG header claiming a huge grey image, with almost no data: a decompression bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    body = zlib.compress(b"\x00" * (width + 1) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def write_mp4(path: Path, n: int = 40, fps: int = 10) -> None:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
        for i in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((32, 48, 3), (i * 6) % 256, np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@dataclass
class Planted:
    meta: Path
    expected: list[tuple[str, str, int]] = field(default_factory=list)  # (kind, file, line) of every plant
    valid: int = 0  # good annotation lines
    per_epoch: int = 0  # good samples after repeat_time

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for kind, _, _ in self.expected:
            out[kind] = out.get(kind, 0) + 1
        return out


Q = {"from": "human", "value": "What color is the shape?"}
ANSWER = {"from": "gpt", "value": "red"}


def build_broken_dataset(folder: Path) -> Planted:
    """One meta file: a dataset mixing good and broken lines, a second good dataset (repeated twice), and
    three broken meta entries. Every broken line or entry is recorded with the kind the audit must give."""
    folder.mkdir(parents=True, exist_ok=True)
    img = folder / "images"
    img.mkdir(exist_ok=True)
    Image.new("RGB", (64, 64), (220, 40, 40)).save(img / "red.png")
    Image.new("RGB", (128, 64), (40, 40, 220)).save(img / "wide.png")
    Image.new("RGB", (300, 200), (40, 220, 40)).save(img / "photo.jpg", quality=90)
    jpg = (img / "photo.jpg").read_bytes()
    (img / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype(np.uint8)).save(img / "noise.png")
    png = bytearray((img / "noise.png").read_bytes())
    png[200:260] = bytes(b ^ 0x5A for b in png[200:260])
    (img / "corrupt.png").write_bytes(bytes(png))
    png_bomb(img / "bomb.png", 12000, 12000)  # 144 Mpx: above the 67 Mpx default limit
    write_mp4(folder / "good.mp4")
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + os.urandom(2000))

    mixed = folder / "mixed.jsonl"
    planted = Planted(meta=folder / "meta.json")
    lines: list[bytes] = []

    def good(obj: dict) -> None:
        lines.append(json.dumps(obj).encode())
        planted.valid += 1
        planted.per_epoch += 1

    def bad(kind: str, obj) -> None:
        lines.append(obj if isinstance(obj, bytes) else json.dumps(obj).encode())
        planted.expected.append((kind, str(mixed), len(lines)))

    good({"id": 0, "image": "images/red.png", "conversations": [Q, ANSWER]})  # placeholder inserted
    bad("bad_json", b'{"id": 1, "conversations": [')
    good({"id": 2, "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello"}]})
    bad("bad_encoding", b'{"id": 3, "conversations": [{"from": "human", "value": "caf\xe9"}]}')
    bad("missing_image", {"id": 4, "image": "images/nope.png", "conversations": [Q, ANSWER]})
    bad("corrupt_image", {"id": 5, "image": "images/corrupt.png", "conversations": [Q, ANSWER]})
    good({"id": 6, "image": ["images/red.png", "images/wide.png"], "conversations": [
        {"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nWhich is red?"}, {"from": "gpt", "value": "1"}]})
    bad("truncated_image", {"id": 7, "image": "images/truncated.jpg", "conversations": [Q, ANSWER]})
    bad("huge_image", {"id": 8, "image": "images/bomb.png", "conversations": [Q, ANSWER]})
    bad("image_count", {"id": 9, "image": ["images/red.png", "images/wide.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhich?"}, ANSWER]})
    bad("too_long", {"id": 10, "image": "images/red.png", "conversations": [  # the block would be cut
        {"from": "human", "value": "lorem ipsum " * 1200 + "<image>\nAnd the color?"}, ANSWER]})
    bad("empty_answer", {"id": 11, "conversations": [Q, {"from": "gpt", "value": "   "}]})
    bad("missing_answer", {"id": 12, "image": "images/red.png", "conversations": [Q]})
    bad("bad_role_order", {"id": 13, "conversations": [ANSWER, Q]})
    bad("unreadable_video", {"id": 14, "video": "broken.mp4", "conversations": [Q, ANSWER]})
    good({"id": 15, "video": "good.mp4", "conversations": [{"from": "human", "value": "What happens?"},
                                                          {"from": "gpt", "value": "it gets brighter"}]})
    bad("template_mismatch", {"id": 16, "conversations": [{"from": "human", "value": "Print <|im_end|> please."},
                                                          ANSWER]})
    bad("bad_placeholder", {"id": 17, "conversations": [{"from": "human", "value": "<img>x</img>"}, ANSWER]})
    bad("no_conversations", {"id": 18, "image": "images/red.png"})
    bad("missing_video", {"id": 19, "video": "nope.mp4", "conversations": [Q, ANSWER]})
    bad("bad_role", {"id": 20, "conversations": [Q, {"from": "assistant", "value": "red"}]})
    bad("missing_image", {"id": 21, "image": ["images/red.png", "images/gone.png"], "conversations": [
        {"from": "human", "value": "<image><image>"}, ANSWER]})
    bad("bad_json", b"[1, 2, 3]")
    good({"id": 23, "image": "images/wide.png", "conversations": [{"from": "human", "value": "<image>\nColor?"},
                                                                  {"from": "gpt", "value": "blue"}]})
    bad("bad_clip", {"id": 24, "video": "good.mp4", "clip": [100, 200], "conversations": [Q, ANSWER]})
    bad("bad_turn", {"id": 25, "conversations": [Q, {"from": "gpt"}]})
    lines.append(b"")  # a blank line: skipped, not a problem
    mixed.write_bytes(b"\n".join(lines) + b"\n")

    extra = folder / "extra.jsonl"
    extra.write_text("".join(json.dumps({"id": f"e{k}", "image": "images/red.png", "conversations": [Q, ANSWER]}) + "\n"
                             for k in range(2)))
    planted.valid += 2
    planted.per_epoch += 4  # repeat_time 2

    entries = {
        "mixed": {"root": ".", "annotation": "mixed.jsonl", "data_augment": False, "repeat_time": 1},
        "extra": {"root": ".", "annotation": "extra.jsonl", "data_augment": True, "repeat_time": 2,
                  "max_dynamic_patch": 4},
        "typo": {"root": ".", "annotation": "extra.jsonl", "data_augment": "no", "repeat_time": 1},
        "gone": {"root": ".", "annotation": "does_not_exist.jsonl", "data_augment": False, "repeat_time": 1},
        "fractional": {"root": ".", "annotation": "extra.jsonl", "data_augment": False, "repeat_time": 1.5},
    }
    text = json.dumps(entries, indent=2)
    planted.meta.write_text(text)
    line_of = {name: next(i + 1 for i, t in enumerate(text.splitlines()) if t.startswith(f'  "{name}"'))
               for name in entries}
    planted.expected += [("bad_meta", str(planted.meta), line_of["typo"]),
                         ("missing_annotation", str(planted.meta), line_of["gone"]),
                         ("bad_repeat_time", str(planted.meta), line_of["fractional"])]
    return planted


@pytest.fixture(scope="session")
def planted(tmp_path_factory) -> Planted:
    return build_broken_dataset(tmp_path_factory.mktemp("broken"))
