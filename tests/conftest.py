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
    built once per test session and shared by tests/test_chat.py, tests/test_infer.py and tests/test_validate.py."""
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


class _LoraBlock(torch.nn.Module):
    """Three projections of one input (like q/k/v) and one of a wider input (like down_proj)."""

    def __init__(self, d=24, wide=40):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(d, d, bias=False) for _ in range(3))
        self.up = torch.nn.Linear(d, wide, bias=False)
        self.down = torch.nn.Linear(wide, d, bias=False)

    def forward(self, x):
        h = self.q(x) * self.k(x).sigmoid() + self.v(x)
        return self.down(torch.nn.functional.silu(self.up(h)))


def _peft_block(dropout, seed=0, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = _LoraBlock().to(dtype)
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
def tiny_items(tmp_path_factory):
    """(folder, tokenizer, 8 encoded samples) of a tiny model and its synthetic data, for the collator,
    attention and loss tests."""
    from internvl_lora.data.audit import audit
    from internvl_lora.data.dataset import SupervisedDataset
    from internvl_lora.data.encode import EncodeSettings
    from internvl_lora.data.records import load_meta
    from internvl_lora.demo import prepare
    from internvl_lora.internvl.checkpoint import inspect_checkpoint, load_tokenizer

    d = tmp_path_factory.mktemp("fast")
    prepare(d, n_train=12, n_heldout=4)
    info = inspect_checkpoint(d / "model")
    tok = load_tokenizer(d / "model")
    s = EncodeSettings.from_checkpoint(info)
    ds = SupervisedDataset(audit(load_meta(d / "data/meta.json"), tok, s), tok, s, train=False)
    items = [ds[i] for i in range(8)]
    return d, tok, items
