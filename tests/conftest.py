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
