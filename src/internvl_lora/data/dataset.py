"""The training dataset over audited annotation lines, and the padding collator."""

from __future__ import annotations

import random

import torch

from ..errors import DataError
from ..internvl.constants import IGNORE_INDEX
from .audit import AuditResult
from .encode import EncodeSettings, encode_record
from .records import Line, apply_repeat, parse_record


class SampleLoadError(DataError):
    """A sample that passed the audit failed while training (e.g. a file changed since). Built from one
    message so that a DataLoader worker can re-raise it in the main process."""

    def __init__(self, message: str, kind: str = "load_failed", path: str | None = None, line: int | None = None):
        super().__init__(kind, message, path, line)


class SupervisedDataset(torch.utils.data.Dataset):
    """Lazily encodes records; only lines that passed the audit are included (repeat_time applied).

    Randomness (the `data_augment` JPEG quality, video frame sampling) comes from a generator seeded
    with (seed, epoch, position): the same run gives the same pixels, every epoch and every repeated
    copy of a line gets its own draw. The HF Trainer calls `set_epoch` through accelerate.
    """

    def __init__(self, audit_result: AuditResult, tokenizer, settings: EncodeSettings, train: bool = True, seed: int = 0):
        valid = set(audit_result.valid)
        self.lines: list[Line] = [ln for ln in apply_repeat(audit_result.lines) if ln.index in valid]
        self.lengths = [audit_result.lengths.get(ln.index, 0) for ln in self.lines]
        self.tokenizer, self.settings, self.train, self.seed = tokenizer, settings, train, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lines)

    def rng(self, i: int) -> random.Random:
        return random.Random((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + i)

    def encode(self, i: int):
        ln = self.lines[i]
        record = parse_record(ln)
        return encode_record(record, self.tokenizer, self.settings, dataset_max_patch=ln.spec.max_dynamic_patch,
                             augment=self.train and ln.spec.data_augment and not record.video, rng=self.rng(i))

    def __getitem__(self, i: int) -> dict:
        try:
            enc = self.encode(i)
        except DataError as e:
            ln = self.lines[i]
            raise SampleLoadError(f"sample {ln.index} passed the data audit but failed while training: {e} "
                                  "(did a file change? run `internvl-lora data check`)", e.kind, ln.path, ln.line) from None
        item = {
            "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
            "labels": torch.tensor(enc.labels, dtype=torch.long),
            "num_tiles": enc.num_tiles,
        }
        if enc.pixel_values is not None:
            item["pixel_values"] = enc.pixel_values
        return item


class PadCollator:
    """Right-pads a batch; the attention mask comes from lengths (the official collator derives it from
    `input_ids != 0`, which masks real `!` tokens of Qwen tokenizers), tiles are concatenated in sample
    and placeholder order, which is the order the model consumes them in."""

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
