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


def _qwen2_internvl(hidden=896, inter=4864, layers=2, dtype=None):
    """A random InternVL (tiny vision tower) whose LLM layer has the given widths (default: the 1B shape's,
    what the kernels' variants depend on), SDPA attention, bf16."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    vit = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, image_size=448,
               patch_size=14)
    text = dict(model_type="qwen2", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=14, num_key_value_heads=2, vocab_size=2048, max_position_embeddings=32768)
    cfg = InternVLConfig(vision_config=vit, text_config=text, image_token_id=1000)
    return InternVLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=dtype or torch.bfloat16)


@pytest.fixture
def qwen2_internvl():
    """`qwen2_internvl(hidden=896, inter=4864, layers=2)`: see `_qwen2_internvl`."""
    return _qwen2_internvl


@pytest.fixture
def fast_path_model():
    """On a GPU: `fast_path_model(layers)` -> (model, language decoder): `_qwen2_internvl` with the training
    command's fast path (packed attention, Liger, LoRA with dropout 0.05 in the fused layers), in train
    mode. Torch's backend switches that the speed options change are restored after the test."""
    from internvl_lora.config import PolicyArgs, TrainArgs
    from internvl_lora.lora.policy import apply_policy
    from internvl_lora.train.speed import (
        backend_switches_restored, language_decoder, register_varlen_attention, speed_options,
    )

    def build(layers=2):
        model = _qwen2_internvl(layers=layers).cuda()
        model.set_attn_implementation({"text_config": register_varlen_attention()})
        t = TrainArgs(liger=True, fused=True)
        speed_options(model, t, before_adapters=True)
        model = apply_policy(model, PolicyArgs(dropout=0.05), "qwen2")
        done = speed_options(model, t, before_adapters=False)
        assert any(d.startswith("fused LoRA layers") for d in done), done
        model.train()
        return model, language_decoder(model)

    with backend_switches_restored():
        yield build
