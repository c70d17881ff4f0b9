"""Preference pairs in the official MPO format: one question, a chosen and a rejected answer.

    {"id": 7, "image": "a.jpg", "question": "<image>\\nWhat is shown?", "chosen": "A red circle.", "rejected": "A blue square."}

`image` may be a list (one `<image>` per image in the question) or absent (text only); `video` (+ `clip`)
as in supervised records; the meta file is the same as for supervised data. As the official MPO dataset
does, a pair becomes two conversations, [human: question, gpt: chosen] and [human: question, gpt:
rejected], over the same tiles; a single image or a video without a placeholder gets it in front of
the question. `parse_preference` validates a line with the same checks as a supervised record plus the
answers; `encode_preference` tiles the media once and tokenizes both conversations.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

from ..errors import DataError, UserError
from ..internvl.constants import IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, VIDEO_PLACEHOLDER
from .convert.detect import unconverted_layout
from .encode import EncodeSettings, encode_media, encode_text
from .meta import Line
from .records import Record, load_object, record_from_object

PREFERENCE_FIELDS = ("question", "chosen", "rejected")
MEDIA_FIELDS = ("id", "image", "video", "clip")
OBJECTIVES = ("sft", "mpo")
# How `data check` / `data inspect` name the objective they checked against.
OBJECTIVE_NAMES = {"sft": "supervised conversations (train.objective=sft)",
                   "mpo": "preference pairs (train.objective=mpo)"}


@dataclass
class PreferenceRecord:
    """A validated pair: `chosen` is the conversation with the chosen answer (media, id, source),
    `rejected` the rejected answer's text."""

    chosen: Record
    rejected_answer: str

    @property
    def rejected(self) -> Record:
        return dataclasses.replace(self.chosen, turns=self.chosen.turns[:-1] + [("gpt", self.rejected_answer)])

    @property
    def source(self) -> tuple[str, int]:
        return self.chosen.source

    @property
    def kind(self) -> str:
        return self.chosen.kind


def is_preference_object(obj: dict) -> bool:
    return "conversations" not in obj and set(PREFERENCE_FIELDS) <= set(obj)


def parse_preference(ln: Line) -> PreferenceRecord:
    """Validate one line of preference data and return a PreferenceRecord (raises DataError)."""
    obj = load_object(ln)

    def fail(kind: str, msg: str) -> DataError:
        return DataError(kind, msg, path=ln.path, line=ln.line)

    if "conversations" in obj:
        if set(PREFERENCE_FIELDS) & set(obj):
            raise fail("bad_preference", "holds both 'conversations' and question / chosen / rejected; a preference "
                       "record has only 'question', 'chosen' and 'rejected' (plus image / video)")
        raise fail("not_preference", "this is a supervised record ('conversations'), not a preference pair "
                   "(question / chosen / rejected): train it with train.objective=sft")
    foreign = unconverted_layout(obj, ln.path)
    if foreign:
        raise fail("unconverted_layout", foreign)
    for key in PREFERENCE_FIELDS:
        if key not in obj:
            raise fail("bad_preference", f"missing field {key!r} (a preference record has 'question', 'chosen' "
                       "and 'rejected')")
        if not isinstance(obj[key], str):
            raise fail("bad_preference", f"{key!r} must be a string, got {type(obj[key]).__name__}")
    rejected = obj["rejected"]
    if not rejected.strip():
        raise fail("empty_answer", "the rejected answer is empty")
    for marker in (IMG_CONTEXT_TOKEN, IMG_START_TOKEN, IMG_END_TOKEN, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
        if marker in rejected:
            raise fail("bad_placeholder", f"the rejected answer contains {marker!r}; placeholders belong in the question")
    try:
        rejected.encode("utf-8")
    except UnicodeEncodeError:
        raise fail("bad_encoding", "the rejected answer holds a lone UTF-16 surrogate escape") from None
    conversation = {k: obj[k] for k in MEDIA_FIELDS if k in obj}
    conversation["conversations"] = [{"from": "human", "value": obj["question"]},
                                     {"from": "gpt", "value": obj["chosen"]}]
    try:
        chosen = record_from_object(conversation, ln)
    except DataError as e:  # the conversation's turn numbers mean nothing to the user: name the field
        raise fail(e.kind, e.detail.replace("turn 1: empty answer", "the chosen answer is empty")) from None
    return PreferenceRecord(chosen, rejected)


@dataclass
class PreferenceEncoded:
    """Both conversations of a pair over one set of tiles."""

    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    num_tiles: list[int]
    pixel_values: object  # torch.Tensor (sum(num_tiles), 3, S, S) or None
    cut: int = 0  # tokens removed by cut_text truncation, both answers together
    warnings: list[tuple[str, str]] = field(default_factory=list)

    @property
    def input_ids(self) -> list[int]:  # what the audit's length statistics count: both sequences
        return self.chosen_ids + self.rejected_ids

    @property
    def labels(self) -> list[int]:
        return self.chosen_labels + self.rejected_labels


def encode_preference(pair: PreferenceRecord, tokenizer, settings: EncodeSettings, *,
                      dataset_max_patch: int | None = None, augment: bool = False, rng: random.Random | None = None,
                      load_pixels: bool = True, size_cache: dict | None = None,
                      video_frames: int | None = None) -> PreferenceEncoded:
    """Tokens and labels of both answers and the tiles they share (arguments as `encode_record`).

    Each conversation is truncated on its own, as the official dataset tokenizes each on its own; a
    pair where either answer is left with no trained token is an error."""
    record = pair.chosen
    media = encode_media(record, settings, dataset_max_patch=dataset_max_patch, augment=augment, rng=rng,
                         load_pixels=load_pixels, size_cache=size_cache, video_frames=video_frames)
    chosen_ids, chosen_labels, cut_c = encode_text(media.turns, record.system, media.num_tiles, tokenizer,
                                                   settings, record.source)
    rejected_turns = media.turns[:-1] + [("gpt", pair.rejected_answer)]
    rejected_ids, rejected_labels, cut_r = encode_text(rejected_turns, record.system, media.num_tiles, tokenizer,
                                                       settings, record.source)
    pixel_values, _ = media.pixels(settings)
    warnings = list(media.warnings)
    if record.turns[-1][1].strip() == pair.rejected_answer.strip():
        warnings.append(("same_answers", "chosen and rejected are the same text: the pair teaches no preference "
                         "(only the SFT term trains on it)"))
    return PreferenceEncoded(chosen_ids, chosen_labels, rejected_ids, rejected_labels, media.num_tiles,
                             pixel_values, cut_c + cut_r, warnings)


def detect_objective(lines: list[Line]) -> str:
    """'mpo' when the first line that is a JSON object holds question / chosen / rejected, else 'sft'
    (what `data check` and `data inspect` assume when no objective is given)."""
    for ln in lines:
        try:
            obj = load_object(ln)
        except DataError:
            continue
        return "mpo" if is_preference_object(obj) else "sft"
    return "sft"


def choose_objective(given: str | None, lines: list[Line]) -> tuple[str, str]:
    """(objective, how it was chosen) for `data check` / `data inspect`: `--objective` when given
    (checked against OBJECTIVES), else `detect_objective`."""
    if given is None:
        return detect_objective(lines), "objective detected from the data (--objective sft|mpo overrides)"
    if given not in OBJECTIVES:
        raise UserError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {given!r}")
    return given, "objective given by --objective"
