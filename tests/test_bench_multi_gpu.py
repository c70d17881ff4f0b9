"""bench/multi_gpu.py --merge helpers: samples take the tokenizer's <IMG_CONTEXT> id, and the random base is
written as a -hf checkpoint that the merge (inspect_checkpoint, load_tokenizer) recognises."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "fixtures" / "real" / "InternVL2_5-1B-MPO"


@pytest.fixture(scope="module")
def mg():
    spec = importlib.util.spec_from_file_location("bench_multi_gpu", ROOT / "bench" / "multi_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_remaps_image_tokens(mg):
    img = mg.IMG_TOKEN
    ids = [5, img, img, 7, 8]
    labels = [-100, -100, -100, 7, 8]
    data = mg.Data([(ids, labels, 1)] * 4, bs=1, world=2, text_only_rank=1, tile=28, image_token_id=151667)
    x = data[0]  # micro-batch 0 -> rank 0: with its tile
    assert x["input_ids"].tolist() == [5, 151667, 151667, 7, 8]
    assert x["labels"].tolist() == labels
    assert x["pixel_values"].shape == (1, 3, 28, 28)
    y = data[1]  # micro-batch 1 -> rank 1, the text-only rank
    assert y["input_ids"].tolist() == [5, 7, 8] and "pixel_values" not in y
    assert mg.Data([(ids, labels, 1)], 1, 1, None, 28)[0]["input_ids"].tolist() == ids  # default: unchanged


def test_save_base_is_a_recognised_hf_checkpoint(mg, tmp_path):
    if not TOKENIZER.exists():
        pytest.skip(f"real tokenizer fixtures missing: {TOKENIZER}")
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from internvl_lora.internvl.checkpoint import inspect_checkpoint, load_tokenizer

    tokenizer = mg.load_tokenizer(TOKENIZER)
    img = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    text = dict(model_type="qwen2", **{**mg.LLM["tiny"], "vocab_size": max(mg.LLM["tiny"]["vocab_size"], len(tokenizer))})
    cfg = InternVLConfig(text_config=text, image_token_id=img, tie_word_embeddings=True,
                         vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration._from_config(cfg)
    out = tmp_path / "base"
    mg.save_base(model, tokenizer, out, rank=0)
    info = inspect_checkpoint(out)
    assert (info.format, info.tile_size, info.tokens_per_tile, info.max_dynamic_patch) == ("hf", 448, 256, 6)
    assert load_tokenizer(out).convert_tokens_to_ids("<IMG_CONTEXT>") == img
    saved = json.loads((out / "config.json").read_text())
    assert saved["image_token_id"] == img and saved["text_config"]["vocab_size"] >= len(tokenizer)
    mg.save_base(model, tokenizer, out, rank=1)  # other ranks write nothing (and do not fail)
