"""infer: tiling comes from the run, not the checkpoint, and `<image>` placeholders already in the
history are counted."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from internvl_lora.infer import build_inputs, image_tiles
from internvl_lora.internvl.constants import IMG_CONTEXT_TOKEN


def test_tiling_comes_from_the_run_not_the_checkpoint(merged_run):
    assert json.loads((merged_run.base / "preprocessor_config.json").read_text())["max_patches"] == 6
    for loaded in (merged_run.adapter_model, merged_run.merged_model):
        assert loaded.settings.max_dynamic_patch == 2
    assert json.loads((merged_run.merged / "preprocessor_config.json").read_text())["max_patches"] == 2
    wide = merged_run.dir / "wide.png"
    Image.new("RGB", (400, 100), (200, 30, 30)).save(wide)
    _, counts = image_tiles([str(wide)], merged_run.merged_model.settings)
    assert counts == [3]  # 2 tiles + thumbnail (the checkpoint's 6 would give 4 + 1)


def test_placeholders_in_history_are_counted(merged_run):
    loaded = merged_run.merged_model
    context = loaded.tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    two = merged_run.images[:2]
    ids, pixels = build_inputs("Which one is red?", two, loaded.settings, loaded.tokenizer,
                               history=[("Image-1: <image>\nImage-2: <image>\nLook at these.", "ok")])
    _, counts = image_tiles(two, loaded.settings)
    assert ids.count(context) == sum(counts) * loaded.settings.tokens_per_tile
    assert pixels.shape[0] == sum(counts)
    prompt = loaded.tokenizer.decode(ids)
    assert prompt.count("<img>") == 2 and "Image-1: <img>" in prompt and "Which one is red?" in prompt
    from internvl_lora.errors import UserError

    with pytest.raises(UserError, match="placeholder"):
        build_inputs("<image>\nAnd this?", two, loaded.settings, loaded.tokenizer,
                     history=[("Image-1: <image>\nImage-2: <image>\nLook.", "ok")])
