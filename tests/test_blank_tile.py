"""A text-only batch runs the vision tower on a blank tile without changing the loss."""

from __future__ import annotations

import pytest
import torch

from internvl_lora.data.blank_tile import BlankTileCollator
from internvl_lora.data.dataset import PadCollator
from internvl_lora.demo import prepare
from internvl_lora.fast import PackedCollator, register_varlen_attention, trained_positions_loss
from internvl_lora.internvl.checkpoint import inspect_checkpoint, load_model, load_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("blank")
    prepare(d, n_train=4, n_heldout=2)
    return d, inspect_checkpoint(d / "model"), load_tokenizer(d / "model")


def text_items(tok, n=3):
    items = []
    for k in range(n):
        ids = tok(f"<|im_start|>user\nSay {k}.<|im_end|>\n<|im_start|>assistant\nyes {k}<|im_end|>\n")["input_ids"]
        labels = [-100] * (len(ids) - 4) + ids[-4:]
        items.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
    return items


@pytest.mark.parametrize("packed", [False, True])
def test_blank_tile_keeps_loss_and_runs_vision(tiny, packed):
    d, info, tok = tiny
    image_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    inner = PackedCollator() if packed else PadCollator(tok.pad_token_id)
    items = text_items(tok)
    plain = inner(items)
    blank = BlankTileCollator(inner, image_id, info.tokens_per_tile, info.tile_size)(items)
    assert "pixel_values" not in plain and blank["pixel_values"].shape == (1, 3, info.tile_size, info.tile_size)
    assert int((blank["input_ids"] == image_id).sum()) == info.tokens_per_tile
    model = load_model(d / "model")
    if packed:
        model.set_attn_implementation({"text_config": register_varlen_attention()})
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    n = sum(int((it["labels"][1:] != -100).sum()) for it in items)
    with torch.no_grad():
        ref = trained_positions_loss(model, plain, n)
        assert not calls
        got = trained_positions_loss(model, blank, n)
        assert calls, "the vision tower must run on a text-only batch"
        if not packed:
            stock_ref = model(**plain, use_cache=False).loss
            stock_got = model(**blank, use_cache=False).loss
            assert torch.allclose(stock_ref, stock_got, rtol=1e-6, atol=1e-6)
    assert torch.allclose(ref, got, rtol=1e-6, atol=1e-6)


def test_batches_with_images_are_untouched(tiny):
    d, info, tok = tiny
    item = {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100, 2, 3]),
            "pixel_values": torch.zeros(1, 3, info.tile_size, info.tile_size)}
    inner = PadCollator(tok.pad_token_id)
    a = inner([item])
    b = BlankTileCollator(inner, 5, info.tokens_per_tile, info.tile_size)([item])
    assert all(torch.equal(a[k], b[k]) for k in a)
