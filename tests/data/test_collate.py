"""Collators (`internvl_lora.data.collate`): padded, packed, blank tile, host-side counts."""

from __future__ import annotations

import pytest
import torch

from internvl_lora.data.collate import BlankTileCollator, HostSide, PackedCollator, PadCollator
from internvl_lora.internvl.checkpoint import inspect_checkpoint, load_model, load_tokenizer
from internvl_lora.train.loss import trained_positions_loss
from internvl_lora.train.speed import register_varlen_attention


def test_collator_masks_by_length_not_by_token_id():
    features = [
        {"input_ids": torch.tensor([5, 0, 7]), "labels": torch.tensor([-100, 0, 7]), "pixel_values": torch.ones(2, 3, 4, 4)},
        {"input_ids": torch.tensor([0]), "labels": torch.tensor([0])},  # text-only, token id 0 (Qwen's "!")
        {"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([-100, 2]), "pixel_values": torch.zeros(1, 3, 4, 4)},
    ]
    batch = PadCollator(pad_token_id=99, pad_to_multiple_of=4)(features)
    assert batch["input_ids"].tolist() == [[5, 0, 7, 99], [0, 99, 99, 99], [1, 2, 99, 99]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 0, 7, -100], [0, -100, -100, -100], [-100, 2, -100, -100]]
    assert batch["pixel_values"].shape == (3, 3, 4, 4)
    assert batch["pixel_values"][:2].eq(1).all() and batch["pixel_values"][2].eq(0).all()  # sample order
    assert "pixel_values" not in PadCollator(0)([features[1]])


def test_packed_collator_layout(tiny_items):
    _, _, items = tiny_items
    b = PackedCollator()(items)
    lengths = [len(it["input_ids"]) for it in items]
    assert b["input_ids"].shape == (1, sum(lengths))
    assert b["cu_seq_lens_q"].tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    starts = b["cu_seq_lens_q"][:-1].tolist()
    assert all(b["position_ids"][0, s].item() == 0 for s in starts)
    assert all(b["labels"][0, s].item() == -100 for s in starts)
    n_tiles = sum(it["pixel_values"].shape[0] for it in items if "pixel_values" in it)
    assert b["pixel_values"].shape[0] == n_tiles


@pytest.mark.parametrize("packed", [True, False])
def test_host_side_counts_and_positions_equal_what_the_step_would_read_from_the_batch(tiny_items, packed):
    """HostSide adds, on the host, the trained positions and the counts the step would otherwise read back
    from the GPU: the loss with them equals the loss without them (packed and padded batches), the step
    statistics are the same, and the trainer hands neither key to the model on its other paths."""
    from internvl_lora.train.callbacks import StepStats
    from internvl_lora.data.collate import HostSide

    d, tok, items = tiny_items
    inner = PackedCollator() if packed else PadCollator(tok.pad_token_id)
    plain, host = inner(items[:5]), HostSide(inner)(items[:5])
    labels = plain["labels"]
    expected = [p for p in range(labels.shape[1] - 1) if (labels[:, p + 1] != -100).any()]
    assert host["trained_positions"].tolist() == expected
    counts = host["batch_counts"]
    assert counts["trained"] == int((labels[:, 1:] != -100).sum()) > 0
    assert counts["tiles"] == plain["pixel_values"].shape[0]
    assert counts["tokens"] == (labels.numel() if packed else int(plain["attention_mask"].sum()))
    a, b = StepStats(), StepStats()
    a.add(plain)
    b.add(host)
    assert (a.tokens, a.trained, a.tiles) == (b.tokens, b.trained, b.tiles)

    model = load_model(d / "model")
    model.train()
    if packed:
        model.set_attn_implementation({"text_config": register_varlen_attention()})
    torch.manual_seed(0)
    with torch.no_grad():
        model.eval()  # no dropout: both calls see the same numbers
        l0 = trained_positions_loss(model, plain, None)
        l1 = trained_positions_loss(model, host, None)
    assert torch.equal(l0, l1)

    from transformers import TrainingArguments

    from internvl_lora.train.trainer import InternVLTrainer

    trainer = InternVLTrainer(model=model, args=TrainingArguments(output_dir=str(d / "t"), use_cpu=True, report_to=[]),
                              data_collator=inner, stats=StepStats(), fast_loss=False)
    assert isinstance(trainer.data_collator, HostSide)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(set(kw)), with_kwargs=True)
    with torch.no_grad():  # the stock loss path (evaluation, unpacked training) calls the model with **inputs
        loss = trainer.compute_loss(model, trainer.data_collator(items[:5]))
    assert torch.isfinite(loss)
    assert seen and not seen[0] & {"trained_positions", "batch_counts"}, seen


# -- blank tile: a text-only batch runs the vision tower on a blank tile without changing the loss ------

@pytest.fixture(scope="module")
def tiny(demo_folder):
    d = demo_folder(4, 2)
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
