"""Fixtures shared by several test modules."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

# torch is imported inside the fixtures: the pure-Python test modules (config, records, templates, metrics...)
# must collect and run without loading it.


@pytest.fixture(scope="module")
def one_thread():
    """Training tests run single-threaded: steadier timings on the 2-core CI machine, no oversubscription."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory):
    """demo_folder(n_train=16, n_heldout=4, copy_to=None) -> folder: the tiny demo (model/, data/, train.yaml
    of internvl_lora.demo.prepare), built once per size per test session. Without copy_to the shared folder,
    for tests that only read it; with copy_to a private copy there (train.yaml pointing at the copy), for tests
    that write into the folder (edit the data, train or merge into it)."""
    built: dict[tuple[int, int], Path] = {}

    def get(n_train: int = 16, n_heldout: int = 4, copy_to: Path | None = None) -> Path:
        if (n_train, n_heldout) not in built:
            from internvl_lora.demo import prepare

            folder = tmp_path_factory.mktemp(f"demo-{n_train}-{n_heldout}")
            prepare(folder, n_train=n_train, n_heldout=n_heldout)
            built[n_train, n_heldout] = folder.resolve()
        folder = built[n_train, n_heldout]
        if copy_to is None:
            return folder
        copy_to = Path(copy_to).resolve()
        shutil.copytree(folder, copy_to, dirs_exist_ok=True)
        config = copy_to / "train.yaml"  # the only file holding absolute paths (meta files use root ".")
        config.write_text(config.read_text().replace(str(folder), str(copy_to)))
        return copy_to

    return get


@pytest.fixture(scope="module")
def demo(demo_folder, tmp_path_factory) -> Path:
    """train.yaml of a private copy (per test module) of the tiny demo: 16 training samples, 4 held out."""
    return demo_folder(16, 4, copy_to=tmp_path_factory.mktemp("demo")) / "train.yaml"


@pytest.fixture(scope="session")
def shared_run(demo_folder, tmp_path_factory) -> Path:
    """A tiny model, its synthetic data and an LLM-LoRA run (16 steps, 2 tiles per image at most),
    built once per test session and shared by tests/test_chat.py, tests/test_infer.py and tests/test_validate.py."""
    from internvl_lora.config import load_config
    from internvl_lora.train import train

    root = tmp_path_factory.getbasetemp() / "shared-llm-lora-run"
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        cfg = demo_folder(16, 8, copy_to=root) / "train.yaml"
        train(load_config(cfg, ["train.max_steps=16", "train.report_to=[]", "train.per_device_batch_size=4",
                                "train.logging_steps=1", "train.save_steps=1000", "data.max_dynamic_patch=2"]))
        (root / "done").touch()
    return root


@pytest.fixture(scope="module")
def merged_run(shared_run, tmp_path_factory, request):
    """The shared run's adapter merged into a folder, and both loaded for inference (fresh per test module,
    as a module may change what it loaded); `images`: three single-image held-out samples."""
    from types import SimpleNamespace

    from internvl_lora.infer import load_for_inference
    from internvl_lora.merge import merge

    d = shared_run
    adapter = d / "run" / "adapter"
    merged = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]) / "merged"
    merge(adapter, merged)
    rows = [json.loads(x) for x in (d / "data" / "heldout.jsonl").read_text().splitlines()]
    single = [r for r in rows if isinstance(r.get("image"), str)]
    images = [str(d / "data" / r["image"]) for r in single[:3]]
    return SimpleNamespace(dir=d, base=d / "model", adapter=adapter, merged=merged, images=images,
                           adapter_model=load_for_inference(adapter), merged_model=load_for_inference(merged))


def _lora_block_class():
    """_LoraBlock: three projections of one input (like q/k/v) and one of a wider input (like down_proj).
    Defined on first use (torch stays unimported until a test needs it) as a module-level name, so that
    the test pickling a whole model finds the class by name."""
    global _LoraBlock
    if "_LoraBlock" in globals():
        return _LoraBlock
    import torch

    class _LoraBlock(torch.nn.Module):
        def __init__(self, d=24, wide=40):
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(d, d, bias=False) for _ in range(3))
            self.up = torch.nn.Linear(d, wide, bias=False)
            self.down = torch.nn.Linear(wide, d, bias=False)

        def forward(self, x):
            h = self.q(x) * self.k(x).sigmoid() + self.v(x)
            return self.down(torch.nn.functional.silu(self.up(h)))

    _LoraBlock.__qualname__ = "_LoraBlock"
    return _LoraBlock


def _peft_block(dropout, seed=0, dtype=None):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = _lora_block_class()().to(torch.float32 if dtype is None else dtype)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                            target_modules=["q", "k", "v", "up", "down"], init_lora_weights="gaussian"))
    for name, p in model.named_parameters():  # B != 0 so that every gradient path is exercised
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.fixture
def peft_block():
    """peft_block(dropout, seed=0, dtype=torch.float32): a small PEFT model, LoRA (r=4) on five plain
    projections, seeded; used by the fused-LoRA tests (tests/lora/test_fused.py) and the speed-option tests."""
    return _peft_block


@pytest.fixture(scope="module")
def tiny_items(demo_folder, tmp_path_factory):
    """(folder, tokenizer, 8 encoded samples) of a tiny model and its synthetic data, for the collator,
    attention and loss tests."""
    from internvl_lora.data.audit import audit
    from internvl_lora.data.dataset import SupervisedDataset
    from internvl_lora.data.encode import EncodeSettings
    from internvl_lora.data.meta import load_meta
    from internvl_lora.internvl.checkpoint import inspect_checkpoint, load_tokenizer

    d = demo_folder(12, 4, copy_to=tmp_path_factory.mktemp("fast"))  # a copy: tests write trainer output into it
    info = inspect_checkpoint(d / "model")
    tok = load_tokenizer(d / "model")
    s = EncodeSettings.from_checkpoint(info)
    ds = SupervisedDataset(audit(load_meta(d / "data/meta.json"), tok, s), tok, s, train=False)
    items = [ds[i] for i in range(8)]
    return d, tok, items


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
        import torch
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
        import torch
        from PIL import Image

        tiles = self.dynamic_preprocess(Image.open(path).convert("RGB"), min_num, max_num, image_size, use_thumbnail)
        qualities = qualities or [None] * len(tiles)
        return torch.stack([self.transform(t, image_size, mean, std, q) for t, q in zip(tiles, qualities)])


@pytest.fixture(scope="session")
def official_pixels() -> OfficialPixels:
    return OfficialPixels()
