"""Fixtures of the training tests."""

from __future__ import annotations

import json

import pytest


def _curve(cfg_path, out, overrides):
    from internvl_lora.config import load_config
    from internvl_lora.train import train

    cfg = load_config(cfg_path, ["train.max_steps=4", "train.logging_steps=1", "train.per_device_batch_size=4",
                                 "train.report_to=[]", "train.save_steps=1000", f"train.output_dir={out}", *overrides])
    train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture
def loss_curve():
    """`loss_curve(cfg_path, out, overrides)`: train 4 steps (batch 4, a log line per step) into `out` with
    these extra overrides and return the logged losses."""
    return _curve
