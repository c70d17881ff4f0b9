"""Speed levers must not change the numbers: packed + varlen + trained-positions loss == padded stock loss."""

from __future__ import annotations

import pytest
import torch

from internvl_lora.data.audit import audit
from internvl_lora.data.dataset import PadCollator, SupervisedDataset
from internvl_lora.data.encode import EncodeSettings
from internvl_lora.data.records import load_meta
from internvl_lora.demo import prepare
from internvl_lora.fast import VARLEN, PackedCollator, register_varlen_attention, trained_positions_loss
from internvl_lora.internvl.checkpoint import inspect_checkpoint, load_model, load_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("fast")
    prepare(d, n_train=12, n_heldout=4)
    info = inspect_checkpoint(d / "model")
    tok = load_tokenizer(d / "model")
    s = EncodeSettings.from_checkpoint(info)
    ds = SupervisedDataset(audit(load_meta(d / "data/meta.json"), tok, s), tok, s, train=False)
    items = [ds[i] for i in range(8)]
    return d, tok, items


def test_packed_collator_layout(setup):
    _, _, items = setup
    b = PackedCollator()(items)
    lengths = [len(it["input_ids"]) for it in items]
    assert b["input_ids"].shape == (1, sum(lengths))
    assert b["cu_seq_lens_q"].tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    starts = b["cu_seq_lens_q"][:-1].tolist()
    assert all(b["position_ids"][0, s].item() == 0 for s in starts)
    assert all(b["labels"][0, s].item() == -100 for s in starts)
    n_tiles = sum(it["pixel_values"].shape[0] for it in items if "pixel_values" in it)
    assert b["pixel_values"].shape[0] == n_tiles


def test_packed_varlen_loss_equals_padded(setup):
    d, tok, items = setup
    torch.manual_seed(0)
    model = load_model(d / "model").eval()
    padded = PadCollator(tok.pad_token_id)(items)
    with torch.no_grad():
        stock = model(**padded, use_cache=False).loss
        n = (padded["labels"][:, 1:] != -100).sum()
        fast_padded = trained_positions_loss(model, padded, n)
        model.set_attn_implementation({"text_config": register_varlen_attention()})
        assert model.config.text_config._attn_implementation == VARLEN
        packed = trained_positions_loss(model, PackedCollator()(items), n)
    assert torch.allclose(stock, fast_padded, rtol=1e-5, atol=1e-6)
    assert torch.allclose(stock, packed, rtol=1e-5, atol=1e-6)


def test_packed_gradients_equal_padded(setup):
    d, tok, items = setup
    grads = []
    for packed in (False, True):
        model = load_model(d / "model")
        model.train()
        if packed:
            model.set_attn_implementation({"text_config": register_varlen_attention()})
            batch = PackedCollator()(items)
        else:
            batch = PadCollator(tok.pad_token_id)(items)
        n = sum((it["labels"][1:] != -100).sum() for it in items)
        loss = trained_positions_loss(model, batch, n)
        loss.backward()
        grads.append(model.model.language_model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_varlen_needs_boundaries(setup):
    d, tok, items = setup
    model = load_model(d / "model").eval()
    model.set_attn_implementation({"text_config": register_varlen_attention()})
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        model(**PadCollator(tok.pad_token_id)(items[:2]), use_cache=False)


def test_training_with_packing_follows_the_padded_loss_curve(tmp_path):
    """`data.packing: true` (packed rows, varlen attention, loss on trained positions) trains like padding."""
    import json

    from internvl_lora.config import load_config
    from internvl_lora.train import train

    cfg_path = prepare(tmp_path / "d", n_train=16, n_heldout=2)
    curves = {}
    for packing in (False, True):
        out = tmp_path / f"run-{packing}"
        cfg = load_config(cfg_path, [f"data.packing={str(packing).lower()}", "train.max_steps=4", "train.logging_steps=1",
                                     "train.per_device_batch_size=4", "policy.dropout=0.0", "train.report_to=[]",
                                     "train.save_steps=1000", f"train.output_dir={out}"])
        train(cfg)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        curves[packing] = [r["loss"] for r in rows if "loss" in r]
    assert len(curves[False]) == 4
    for a, b in zip(curves[False], curves[True]):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), curves
