"""internvl.embed: image tokens checked on the GPU (no host sync) in training."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from internvl_lora.data.collate import PadCollator
from internvl_lora.internvl.checkpoint import load_model
from internvl_lora.internvl.embed import image_tokens_checked_on_the_gpu


def test_image_tokens_are_checked_without_reading_the_count_back(tiny_items, monkeypatch):
    """transformers' placeholder check reads the image-token count back to the host (a sync every
    forward); the swapped model checks on the device instead: same logits, same module (name, state
    dict), pickles and deep-copies."""
    import transformers.models.internvl.modeling_internvl as mi

    d, tok, items = tiny_items
    batch = PadCollator(tok.pad_token_id)(items[:3])
    assert "pixel_values" in batch
    model = load_model(d / "model").eval()
    with torch.no_grad():
        before = model(**batch, use_cache=False).logits
    keys = list(model.state_dict())
    name = type(model.model).__name__
    assert image_tokens_checked_on_the_gpu(model) and image_tokens_checked_on_the_gpu(model)
    assert type(model.model).__name__ == name and list(model.state_dict()) == keys
    fresh = load_model(d / "model")  # (transformers' output hooks, set by a first forward, do not pickle)
    image_tokens_checked_on_the_gpu(fresh)
    for clone in (pickle.loads(pickle.dumps(fresh.model)), copy.deepcopy(model.model)):
        assert type(clone) is type(model.model)
    monkeypatch.setattr(mi, "torch_compilable_check", lambda *a, **k: pytest.fail("host-side count check ran"))
    with torch.no_grad():
        after = model(**batch, use_cache=False).logits
    assert torch.equal(before, after)


def test_a_mismatch_of_image_tokens_and_features_still_fails(tiny_items):
    d, tok, items = tiny_items
    batch = PadCollator(tok.pad_token_id)(items[:3])
    model = load_model(d / "model").eval()
    image_tokens_checked_on_the_gpu(model)
    batch["pixel_values"] = batch["pixel_values"][1:]  # one tile short
    with torch.no_grad(), pytest.raises(RuntimeError, match="image tokens and image features do not match"):
        model(**batch, use_cache=False)
