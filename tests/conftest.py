"""Fixtures shared by several test modules."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Training tests run single-threaded: steadier timings on the 2-core CI machine, no oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A tiny model + 16 synthetic training samples + train.yaml (internvl_lora.demo.prepare)."""
    from internvl_lora.demo import prepare

    return prepare(tmp_path_factory.mktemp("demo"), n_train=16, n_heldout=4)


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory) -> Path:
    """A tiny model, its synthetic data and an LLM-LoRA run (16 steps, 2 tiles per image at most),
    built once per test session and shared by tests/test_chat.py and tests/test_validate.py."""
    from internvl_lora.config import load_config
    from internvl_lora.demo import prepare
    from internvl_lora.train import train

    root = tmp_path_factory.getbasetemp() / "shared-llm-lora-run"
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        cfg = prepare(root, n_train=16, n_heldout=8)
        train(load_config(cfg, ["train.max_steps=16", "train.report_to=[]", "train.per_device_batch_size=4",
                                "train.logging_steps=1", "train.save_steps=1000", "data.max_dynamic_patch=2"]))
        (root / "done").touch()
    return root


class OfficialPixels:
    """An independent re-statement of the official image pipeline (spec §3.1, §3.3), PIL + numpy + torch
    only, for bit-identity tests: `load_image` = `Image.open(path).convert("RGB")`, `dynamic_preprocess`
    (PIL `resize` with its default filter, crop boxes, thumbnail), then per tile the transform:
    convert, optional JPEG re-encode, `Resize((S, S), BICUBIC)`, `ToTensor`, `Normalize` (written out
    with torchvision's float32 operations, since torchvision is not installed)."""

    @staticmethod
    def dynamic_preprocess(image, min_num: int, max_num: int, image_size: int, use_thumbnail: bool) -> list:
        w, h = image.size
        aspect = w / h
        ratios = sorted({(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1)
                         for j in range(1, n + 1) if min_num <= i * j <= max_num}, key=lambda r: r[0] * r[1])
        best_diff, best = float("inf"), (1, 1)
        for r in ratios:
            diff = abs(aspect - r[0] / r[1])
            if diff < best_diff:
                best_diff, best = diff, r
            elif diff == best_diff and w * h > 0.5 * image_size * image_size * r[0] * r[1]:
                best = r
        tw, th = image_size * best[0], image_size * best[1]
        resized = image.resize((tw, th))  # the official call: Pillow's default filter
        per_row = tw // image_size
        out = []
        for i in range(best[0] * best[1]):
            x0, y0 = (i % per_row) * image_size, (i // per_row) * image_size
            out.append(resized.crop((x0, y0, x0 + image_size, y0 + image_size)))
        if use_thumbnail and len(out) != 1:
            out.append(image.resize((image_size, image_size)))
        return out

    @staticmethod
    def transform(tile, image_size: int, mean, std, jpeg_quality: int | None = None) -> torch.Tensor:
        import io

        import numpy as np
        from PIL import Image

        tile = tile.convert("RGB")
        if jpeg_quality is not None:
            buf = io.BytesIO()
            tile.save(buf, format="JPEG", quality=jpeg_quality)
            buf.seek(0)
            tile = Image.open(buf).convert("RGB")
        tile = tile.resize((image_size, image_size), Image.BICUBIC)  # T.Resize on a PIL image
        t = torch.from_numpy(np.array(tile, np.uint8, copy=True)).view(image_size, image_size, 3)
        t = t.permute(2, 0, 1).contiguous().to(dtype=torch.float32).div(255)  # T.ToTensor
        m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        return t.sub_(m).div_(s)  # T.Normalize

    def image(self, path, image_size: int, max_num: int, min_num: int = 1, use_thumbnail: bool = True,
              mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), qualities=None) -> torch.Tensor:
        from PIL import Image

        tiles = self.dynamic_preprocess(Image.open(path).convert("RGB"), min_num, max_num, image_size, use_thumbnail)
        qualities = qualities or [None] * len(tiles)
        return torch.stack([self.transform(t, image_size, mean, std, q) for t, q in zip(tiles, qualities)])


@pytest.fixture(scope="session")
def official_pixels() -> OfficialPixels:
    return OfficialPixels()
