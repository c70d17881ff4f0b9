"""The training dataset over audited annotation lines (collators: `data.collate`)."""

from __future__ import annotations

import random

import torch

from ..errors import DataError
from .audit import AuditResult
from .encode import EncodeSettings, encode_record
from .preference import encode_preference, parse_preference
from .meta import Line, apply_repeat
from .records import parse_record


# A DataLoader worker re-raises an exception in the main process as its type built from one string that
# holds the worker's traceback. So in a worker the dataset returns the error under this key instead; the
# collator (`collate.HostSide`) makes it the whole batch and the trainer raises it, message unchanged.
LOAD_ERROR = "load_error"


class SampleLoadError(DataError):
    """A sample that passed the audit failed while training (e.g. a file changed since)."""

    def __init__(self, message: str, kind: str = "load_failed", path: str | None = None, line: int | None = None):
        super().__init__(kind, message, path, line)

    def __reduce__(self):
        return type(self), (self.detail, self.kind, self.path, self.line)


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
            error = SampleLoadError(f"sample {ln.index} passed the data audit but failed while training: {e} "
                                    "(did a file change? run `internvl-lora data check`)", e.kind, ln.path, ln.line)
            if torch.utils.data.get_worker_info() is not None:
                return {LOAD_ERROR: error}
            raise error from None
        return self.item(enc)

    def item(self, enc) -> dict:
        item = {
            "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
            "labels": torch.tensor(enc.labels, dtype=torch.long),
            "num_tiles": enc.num_tiles,
        }
        if enc.pixel_values is not None:
            item["pixel_values"] = enc.pixel_values
        return item


class PreferenceDataset(SupervisedDataset):
    """Preference pairs (train.objective=mpo): both answers of a line over their shared tiles; collated
    by `collate.PreferenceCollator`. Lengths (from the audit) are both answers' tokens together."""

    def encode(self, i: int):
        ln = self.lines[i]
        pair = parse_preference(ln)
        return encode_preference(pair, self.tokenizer, self.settings, dataset_max_patch=ln.spec.max_dynamic_patch,
                                 augment=self.train and ln.spec.data_augment and not pair.chosen.video, rng=self.rng(i))

    def item(self, enc) -> dict:
        item = {
            "chosen_input_ids": torch.tensor(enc.chosen_ids, dtype=torch.long),
            "chosen_labels": torch.tensor(enc.chosen_labels, dtype=torch.long),
            "rejected_input_ids": torch.tensor(enc.rejected_ids, dtype=torch.long),
            "rejected_labels": torch.tensor(enc.rejected_labels, dtype=torch.long),
            "num_tiles": enc.num_tiles,
        }
        if enc.pixel_values is not None:
            item["pixel_values"] = enc.pixel_values
        return item
