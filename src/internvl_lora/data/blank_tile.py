"""Text-only micro-batches still run the vision tower, so every rank runs the same modules in the same order.

Under DeepSpeed ZeRO-3 and FSDP, parameters are gathered by collectives as modules run: a rank whose
micro-batch has no image skips the vision tower, the ranks' collectives stop matching, and training
hangs (a top complaint with ms-swift and LLaMA-Factory). The official code feeds text-only samples a
white dummy tile whose features it then drops. We do the equivalent at the batch level, which keeps the
model's own forward untouched: a text-only batch gets one blank tile and one masked block of image
tokens appended after every real token (attention mask 0 in padded batches, a separate segment in
packed ones, labels ignored). Real tokens never attend to it (it comes after them, causally), and it
carries no loss, so the loss is exactly the same — while embed -> vision -> LLM run in the same order
on every rank.
"""

from __future__ import annotations

import torch

from ..internvl.constants import IGNORE_INDEX


class BlankTileCollator:
    """Wraps a collator; adds a blank tile and a masked image-token block to batches without images."""

    def __init__(self, inner, image_token_id: int, tokens_per_tile: int, tile_size: int):
        self.inner, self.image_token_id = inner, image_token_id
        self.tokens_per_tile, self.tile_size = tokens_per_tile, tile_size

    def __call__(self, features: list[dict]) -> dict:
        batch = self.inner(features)
        if "pixel_values" in batch:
            return batch
        n = self.tokens_per_tile
        rows = batch["input_ids"].shape[0]
        block = torch.full((rows, n), self.image_token_id, dtype=batch["input_ids"].dtype)
        block[1:] = self.inner_pad_id(batch)  # one block in total: only row 0 holds image tokens
        batch["input_ids"] = torch.cat([batch["input_ids"], block], dim=1)
        batch["labels"] = torch.cat([batch["labels"], torch.full((rows, n), IGNORE_INDEX, dtype=batch["labels"].dtype)], 1)
        if "attention_mask" in batch:  # padded layout: the block is masked out
            batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros((rows, n), dtype=batch["attention_mask"].dtype)], 1)
        if "position_ids" in batch:  # packed layout: the block is a segment of its own
            batch["position_ids"] = torch.cat([batch["position_ids"], torch.arange(n).unsqueeze(0)], 1)
        if "cu_seq_lens_q" in batch:
            cu = torch.cat([batch["cu_seq_lens_q"], batch["cu_seq_lens_q"][-1:] + n])
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
            batch["max_length_q"] = batch["max_length_k"] = max(batch["max_length_q"], n)
        batch["pixel_values"] = torch.zeros(1, 3, self.tile_size, self.tile_size)
        return batch

    def inner_pad_id(self, batch) -> int:
        return getattr(self.inner, "pad_token_id", 0)
