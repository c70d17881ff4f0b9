"""Collators: a list of encoded samples -> one micro-batch.

- `PadCollator` right-pads the samples into rows (with an attention mask).
- `PackedCollator` puts them into one row without padding; position ids restart at every sample and the
  sample boundaries go to the attention as cumulative lengths (`cu_seq_lens_q/k`).
- `BlankTileCollator` (a wrapper) gives a text-only batch a blank tile, so every rank runs the vision tower.
- `PreferenceCollator` (a wrapper) lays out preference pairs: chosen and rejected side by side, tiles once.
- `HostSide` (a wrapper) adds, computed on the host, what the training step needs to know about the batch.
- `data_collator` builds the training collator from the config's choices.

Every collator says whether its batches are packed (`packed`); wrappers (`CollatorWrapper`) forward their inner collator's.
"""

from __future__ import annotations

import torch

from ..internvl.constants import IGNORE_INDEX
from .dataset import LOAD_ERROR


class PadCollator:
    """Right-pads a batch; the attention mask comes from lengths (the official collator derives it from
    `input_ids != 0`, which masks real `!` tokens of Qwen tokenizers), tiles are concatenated in sample
    and placeholder order, which is the order the model consumes them in."""

    packed = False

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        n = len(features)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, longest), dtype=torch.long)
        for k, f in enumerate(features):
            length = len(f["input_ids"])
            input_ids[k, :length] = torch.as_tensor(f["input_ids"])
            labels[k, :length] = torch.as_tensor(f["labels"])
            attention_mask[k, :length] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        pixels = [f["pixel_values"] for f in features if "pixel_values" in f]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels, dim=0)
        return batch


class PackedCollator:
    """All samples of a batch in one row, no padding; tiles concatenated in sample order."""

    packed = True

    def __call__(self, features: list[dict]) -> dict:
        ids, labels, positions, lengths, pixels = [], [], [], [], []
        for f in features:
            n = len(f["input_ids"])
            lab = f["labels"].clone()
            lab[0] = IGNORE_INDEX  # the previous sample's last token must not learn to predict this one
            ids.append(f["input_ids"])
            labels.append(lab)
            positions.append(torch.arange(n))
            lengths.append(n)
            if "pixel_values" in f:
                pixels.append(f["pixel_values"])
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
        batch = {
            "input_ids": torch.cat(ids).unsqueeze(0), "labels": torch.cat(labels).unsqueeze(0),
            "position_ids": torch.cat(positions).unsqueeze(0),
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths),
        }
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        return batch


class CollatorWrapper:
    """A collator around another one (`inner`); says whether its batches are packed as the inner one does."""

    def __init__(self, inner):
        self.inner = inner

    @property
    def packed(self) -> bool:
        return getattr(self.inner, "packed", False)


class BlankTileCollator(CollatorWrapper):
    """Wraps a collator; adds a blank tile and a masked image-token block to batches without images.

    Text-only micro-batches must still run the vision tower, so every rank runs the same modules in the
    same order: under DeepSpeed ZeRO-3 and FSDP, parameters are gathered by collectives as modules run, and
    a rank whose micro-batch has no image would skip the vision tower, the ranks' collectives would stop
    matching, and training would hang. The official code feeds text-only samples a white dummy tile whose
    features it then drops; this is the equivalent at the batch level, which keeps the model's own forward
    untouched: one blank tile and one masked block of image tokens appended after every real token
    (attention mask 0 in padded batches, a separate segment in packed ones, labels ignored). Real tokens
    never attend to it (it comes after them, causally) and it carries no loss, so the loss is exactly the
    same -- while embed -> vision -> LLM run in the same order on every rank.
    """

    def __init__(self, inner, image_token_id: int, tokens_per_tile: int, tile_size: int):
        super().__init__(inner)
        self.image_token_id, self.tokens_per_tile, self.tile_size = image_token_id, tokens_per_tile, tile_size

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
        inner = self.inner
        while not hasattr(inner, "pad_token_id") and isinstance(inner, CollatorWrapper):
            inner = inner.inner
        return getattr(inner, "pad_token_id", 0)


class PreferenceCollator(CollatorWrapper):
    """Wraps a collator for preference pairs (`dataset.PreferenceDataset`): each pair becomes two sequences,
    chosen then rejected (rows of a padded batch, segments of a packed one), in pair order. A pair's tiles
    go into `pixel_values` once; `tile_index` lists, for every image block of the batch in order, the tile
    that fills it (each pair's tiles twice), so the vision tower encodes a tile once for both answers
    (`internvl.embed.embed_with_tiles`). `pairs`: the number of pairs.

    With `expand_tiles` (sharded weights: FSDP, ZeRO-3), `pixel_values` instead holds every image block's
    tile in order (each pair's tiles twice, as the official trainer feeds them) and there is no
    `tile_index`: the model's own forward then embeds the images, inside the sharded module's forward,
    where its weights are gathered."""

    def __init__(self, inner, expand_tiles: bool = False):
        super().__init__(inner)
        self.expand_tiles = expand_tiles

    def __call__(self, features: list[dict]) -> dict:
        sequences, index, offset = [], [], 0
        for f in features:
            chosen = {"input_ids": f["chosen_input_ids"], "labels": f["chosen_labels"]}
            tiles = 0
            if f.get("pixel_values") is not None:
                chosen["pixel_values"] = f["pixel_values"]
                tiles = f["pixel_values"].shape[0]
            sequences += [chosen, {"input_ids": f["rejected_input_ids"], "labels": f["rejected_labels"]}]
            own = list(range(offset, offset + tiles))
            index += own + own
            offset += tiles
        batch = self.inner(sequences)
        if self.expand_tiles:
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"][torch.tensor(index, dtype=torch.long)]
        else:
            batch["tile_index"] = torch.tensor(index, dtype=torch.long)
        batch["pairs"] = len(features)
        return batch


HOST_SIDE_KEYS = ("trained_positions", "batch_counts")


def batch_counts(batch: dict) -> dict:
    """Tokens, trained tokens (labels past position 0 of a row, as the loss shifts them) and image tiles
    of a micro-batch, as Python ints."""
    labels = batch.get("labels")
    mask = batch.get("attention_mask")
    return {
        "tokens": int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()),
        "trained": int((labels[..., 1:] != IGNORE_INDEX).sum()) if labels is not None else 0,
        "tiles": int(batch["pixel_values"].shape[0]) if batch.get("pixel_values") is not None else 0,
    }


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions (columns) whose next token is trained in some row: where the loss needs logits."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)


class HostSide(CollatorWrapper):
    """Wraps a collator: adds what the training step needs to know about a micro-batch, computed on the
    host before the batch goes to the GPU -- `trained_positions` for `trained_positions_loss` and
    `batch_counts` for the step statistics. Read from the GPU instead, each would stop the host until
    the GPU has caught up with everything queued (a synchronization), every micro-batch, leaving the GPU
    idle while the host prepares the next work. Both keys are removed before the model is called."""

    def __call__(self, features: list[dict]) -> dict:
        failed = next((f[LOAD_ERROR] for f in features if LOAD_ERROR in f), None)
        if failed is not None:  # a sample failed in a loader worker: the batch carries the error (dataset.py)
            return {LOAD_ERROR: failed}
        batch = self.inner(features)
        if "labels" in batch:
            batch["trained_positions"] = trained_positions(batch["labels"])
        batch["batch_counts"] = batch_counts(batch)
        return batch


def data_collator(tokenizer, settings, dummy_vision: bool, packing: bool = False, preference: bool = False,
                  sharded: bool = False):
    """Right-padding (or, with `packing`, packed) collator for the tokenizer and encode `settings`; with
    `dummy_vision`, a batch without images gets one blank tile and a masked, label-free block of image
    tokens after its last token (`BlankTileCollator`), like the official white dummy tile: the loss is
    unchanged, and every rank runs embed -> vision -> LLM in the same order (so ZeRO-3 / FSDP gathers
    match across ranks and a trainable vision part always gets a gradient). `preference`: pairs
    (`PreferenceCollator`; `sharded`: tiles expanded for the model's own forward)."""
    collator = PackedCollator() if packing else PadCollator(tokenizer.pad_token_id)
    if preference:
        collator = PreferenceCollator(collator, expand_tiles=sharded)
        if not sharded:  # the blank tile of text-only batches is added in the forward (`internvl.embed`)
            return collator
    if not dummy_vision:
        return collator
    from ..internvl.constants import IMG_CONTEXT_TOKEN

    return BlankTileCollator(collator, tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN), settings.tokens_per_tile,
                             settings.tile_size)
