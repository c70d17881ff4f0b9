"""`internvl-lora data check META --model CKPT`: a pre-flight audit of every sample.

Each line is parsed, validated and encoded exactly as training will do it (images are decoded
cheaply, tiles counted from their sizes, videos probed for their worst case), so anything that would
fail or be cut during training is found here first, with file:line. Problems of the meta file itself
(one bad dataset entry) are reported with the meta file's line and the other datasets are still
checked. `train` runs the same audit before it starts. Warnings (`WARNING_KINDS`: images the official
RGB conversion blanks, strips of transparency or leaves sideways) are listed but do not fail it.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from ..errors import DataError
from ..internvl.constants import IGNORE_INDEX
from .encode import EncodeSettings, encode_record
from .preference import OBJECTIVES, PreferenceRecord, encode_preference, parse_preference
from .meta import DatasetSpec, Line, apply_repeat, iter_lines, meta_problems
from .records import parse_record

# Every kind of problem the audit reports (docs/data.md lists them with examples).
PROBLEM_KINDS = {
    # meta file
    "missing_meta": "the meta file does not exist",
    "bad_meta": "a meta entry has a missing, unknown or wrongly typed field",
    "missing_annotation": "a meta entry's annotation file does not exist",
    "bad_repeat_time": "repeat_time is not a positive number, or is above 1 and not whole",
    # line / record
    "bad_encoding": "the line is not UTF-8",
    "bad_json": "the line is not a JSON object",
    "no_conversations": "no 'conversations' list",
    "bad_turn": "a turn is not {'from': str, 'value': str}",
    "bad_role": "a turn has a role other than human / gpt (system first)",
    "bad_role_order": "turns do not alternate human, gpt (starting with human)",
    "missing_answer": "the conversation does not end with a gpt answer",
    "empty_answer": "an answer is empty",
    "bad_placeholder": "image tokens written in the text, or a placeholder outside the human turns",
    "image_count": "the number of <image> placeholders differs from the number of images",
    "image_and_video": "a record holds both images and a video",
    "bad_image_field": "'image' is not a path or a list of paths",
    "bad_video_field": "'video' or 'clip' is malformed",
    # media
    "missing_image": "an image file does not exist",
    "corrupt_image": "an image file cannot be decoded",
    "truncated_image": "an image file ends too early",
    "huge_image": "an image has more pixels than data.max_image_pixels (decompression bomb guard)",
    "missing_video": "a video file or frame folder does not exist",
    "unreadable_video": "a video cannot be opened or decoded",
    "empty_video": "a video has no frames",
    "bad_clip": "a clip lies outside the video",
    "bad_fps": "the video has no usable frame rate for the sampling asked for",
    "missing_dependency": "PyAV is needed to read video files",
    # tokens
    "too_long": "longer than max_length after image expansion (or a cut would split an image block)",
    "no_trained_tokens": "no answer token is left to train on",
    "template_mismatch": "the official preprocessor of the template would not train this sample",
    # preference pairs (train.objective=mpo)
    "bad_preference": "a preference record lacks 'question', 'chosen' or 'rejected', or one is not a string",
    "not_preference": "a supervised record ('conversations') in preference data",
}


# Warnings: the sample still trains (as the official code would), but probably not as meant.
WARNING_KINDS = {
    "blank_image": "an image is one flat colour after conversion to RGB (e.g. a 16-bit PNG clipped to white)",
    "alpha_dropped": "an image has transparent pixels that convert('RGB') drops (see data.alpha_background)",
    "exif_rotated": "an image's EXIF orientation is not 1: used as stored, sideways or mirrored (see data.exif_transpose)",
    "same_answers": "a preference pair whose chosen and rejected answers are the same text",
}


@dataclass
class Problem:
    kind: str
    path: str | None
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{where}: [{self.kind}] {self.message}"


@dataclass
class AuditResult:
    lines: list[Line]
    valid: list[int] = field(default_factory=list)  # indices into `lines`
    lengths: dict[int, int] = field(default_factory=dict)  # index -> token count (video: worst case)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)  # kinds in WARNING_KINDS; they do not make it fail
    images: int = 0
    videos: int = 0
    video_frames: int = 0  # worst case
    tiles: int = 0
    trained_tokens: int = 0
    cut: list[int] = field(default_factory=list)  # indices of samples shortened by truncation=cut_text
    kinds: dict[str, int] = field(default_factory=dict)  # text / image / multi_image / video, valid samples

    @property
    def ok(self) -> bool:
        return not self.problems

    def by_kind(self) -> dict[str, int]:
        return dict(collections.Counter(p.kind for p in self.problems))

    def train_samples(self) -> int:
        """Valid samples after each dataset's repeat_time (what one epoch holds)."""
        valid = set(self.valid)
        return sum(1 for ln in apply_repeat(self.lines) if ln.index in valid)

    def summary(self) -> dict:
        lengths = sorted(self.lengths.values())
        line_problems = [p for p in self.problems if p.kind not in META_KINDS]
        return {
            "samples": len(self.lines), "valid": len(self.valid), "invalid": len(line_problems),
            "meta_problems": len(self.problems) - len(line_problems),
            "samples_per_epoch": self.train_samples(), "sample_types": dict(self.kinds),
            "images": self.images, "videos": self.videos, "video_frames_max": self.video_frames,
            "tiles": self.tiles, "trained_tokens": self.trained_tokens, "cut": len(self.cut),
            "tokens_min": lengths[0] if lengths else 0, "tokens_max": lengths[-1] if lengths else 0,
            "tokens_mean": round(sum(lengths) / len(lengths), 1) if lengths else 0,
            "problems_by_kind": self.by_kind(),
            "warnings_by_kind": dict(collections.Counter(w.kind for w in self.warnings)),
        }


META_KINDS = {"missing_meta", "bad_meta", "missing_annotation", "bad_repeat_time"}


#: Lines a worker process checks per task, and the fewest lines for which processes pay off (a process
#: pool costs about a second to start; one line takes ~10-15 ms with a 1080p image).
CHUNK = 256
PARALLEL_MIN_LINES = 2 * CHUNK


def audit(specs: list[DatasetSpec], tokenizer, settings: EncodeSettings, decode_video: bool = True,
          objective: str = "sft", workers: int = 1) -> AuditResult:
    """Check every line; never stops at the first problem.

    `decode_video=False`: videos are not opened; each counts as max_num_frames frames. `objective`:
    "sft" (supervised records) or "mpo" (preference pairs; a sample's length is both answers' tokens).
    `workers` > 1: lines are checked by that many processes in chunks of CHUNK lines (data sets of at least
    PARALLEL_MIN_LINES lines); the result is the same as with one, in the same order.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}")
    result = AuditResult(lines=iter_lines(specs))
    for e in meta_problems(specs):
        result.problems.append(Problem(e.kind, e.path, e.line, e.detail))
    job = _Job(tokenizer, settings, decode_video, objective)
    if workers > 1 and len(result.lines) >= PARALLEL_MIN_LINES:
        outcomes = _check_in_processes(result.lines, job, workers)
    else:
        outcomes = job.check(result.lines)
    kinds: collections.Counter = collections.Counter()
    for ln, o in zip(result.lines, outcomes):
        if isinstance(o, Problem):
            result.problems.append(o)
            continue
        result.valid.append(ln.index)
        result.warnings += [Problem(kind, ln.path, ln.line, msg) for kind, msg in o.warnings]
        result.lengths[ln.index] = o.length
        kinds[o.kind] += 1
        if o.video:
            result.videos += 1
            result.video_frames += o.media
        else:
            result.images += o.media
        result.tiles += o.tiles
        result.trained_tokens += o.trained
        if o.cut:
            result.cut.append(ln.index)
    result.kinds = dict(kinds)
    return result


@dataclass
class _Checked:
    """What the audit keeps of a valid line (small: it travels back from a worker process)."""

    length: int
    warnings: list
    kind: str
    video: bool
    media: int  # images, or frames of the video
    tiles: int
    trained: int
    cut: bool


class _Job:
    """Parse and encode lines as training will (no pixels); one instance per process."""

    def __init__(self, tokenizer, settings: EncodeSettings, decode_video: bool, objective: str):
        self.tokenizer, self.settings, self.decode_video, self.objective = tokenizer, settings, decode_video, objective
        self.sizes: dict = {}  # image sizes already read (an image used by several samples is opened once)

    def check(self, lines: list[Line]) -> list:
        mpo = self.objective == "mpo"
        parse, encode = (parse_preference, encode_preference) if mpo else (parse_record, encode_record)
        out: list = []
        for ln in lines:
            try:
                record = parse(ln)
                enc = encode(record, self.tokenizer, self.settings, dataset_max_patch=ln.spec.max_dynamic_patch,
                             load_pixels=False, size_cache=self.sizes,
                             video_frames=None if self.decode_video else self.settings.max_num_frames)
            except DataError as e:
                out.append(Problem(e.kind, e.path or ln.path, e.line or ln.line, e.detail))
                continue
            media = record.chosen if isinstance(record, PreferenceRecord) else record
            out.append(_Checked(len(enc.input_ids), list(enc.warnings), record.kind, bool(media.video),
                                len(enc.num_tiles), sum(enc.num_tiles),
                                sum(1 for lab in enc.labels if lab != IGNORE_INDEX), bool(enc.cut)))
        return out


# The job and the lines of a parallel audit, inherited by forked workers (nothing large is pickled).
_FORKED: tuple | None = None


def _check_range(bounds: tuple[int, int]) -> list:
    job, lines = _FORKED
    return job.check(lines[bounds[0]:bounds[1]])


def _check_in_processes(lines: list[Line], job: _Job, workers: int) -> list:
    """`job.check` over `lines` in forked processes, chunk by chunk, results in line order. Where fork is not
    available (Windows), the lines are checked here. A worker's error (a bug) is raised here."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    global _FORKED
    if "fork" not in multiprocessing.get_all_start_methods():
        return job.check(lines)
    chunks = [(i, min(i + CHUNK, len(lines))) for i in range(0, len(lines), CHUNK)]
    # The children do not use the tokenizer's thread pool; saying so stops the tokenizers library from
    # warning about the fork in every child. The variable is put back as it was.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _FORKED = (job, lines)
    try:
        with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=multiprocessing.get_context("fork")) as pool:
            parts = list(pool.map(_check_range, chunks))
    finally:
        _FORKED = None
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    return [o for part in parts for o in part]


def audit_workers() -> int:
    """Processes for the audit: the CPU cores this process may use, shared among the processes of this
    machine under torchrun (LOCAL_WORLD_SIZE), at most 32."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(32, cores // local))


def histogram(lengths: list[int], bins: int = 8, width: int = 40) -> list[str]:
    """A text histogram of token lengths."""
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    step = max(1, -(-(hi - lo + 1) // bins))
    counts = collections.Counter((n - lo) // step for n in lengths)
    top = max(counts.values())
    rows = []
    for b in range(-(-(hi - lo + 1) // step)):
        c = counts.get(b, 0)
        bar = "#" * max(1 if c else 0, round(c / top * width))
        rows.append(f"{lo + b * step:>7} - {lo + (b + 1) * step - 1:<7} {bar:<{width}} {c}")
    return rows


def format_report(result: AuditResult, max_problems: int = 50, max_locations: int = 8) -> str:
    s = result.summary()
    types = ", ".join(f"{k} {v}" for k, v in sorted(s["sample_types"].items())) or "none"
    out = [
        f"samples: {s['samples']}  valid: {s['valid']}  with problems: {s['invalid']}"
        + (f"  meta problems: {s['meta_problems']}" if s["meta_problems"] else "")
        + f"  per epoch (after repeat_time): {s['samples_per_epoch']}",
        f"valid samples by type: {types}",
        f"images: {s['images']}  tiles: {s['tiles']}"
        + (f"  videos: {s['videos']} (up to {s['video_frames_max']} frames)" if s["videos"] else "")
        + f"  trained tokens: {s['trained_tokens']}",
        f"tokens per sample: min {s['tokens_min']}  mean {s['tokens_mean']}  max {s['tokens_max']}",
    ]
    if s["cut"]:
        out.append(f"cut to max_length (truncation: cut_text): {s['cut']} sample(s)")
    hist = histogram(list(result.lengths.values()))
    if hist:
        out.append("token-length histogram:")
        out += ["  " + r for r in hist]
    out += _listing("problems", result.problems, max_problems, max_locations)
    out += _listing("warnings", result.warnings, max_problems, max_locations,
                    note="; not errors, these samples train as they are")
    return "\n".join(out)


def _listing(title: str, items: list[Problem], max_items: int, max_locations: int, note: str = "") -> list[str]:
    if not items:
        return []
    out = [f"{title} by kind ({len(items)}{note}):"]
    groups: dict[str, list[Problem]] = {}
    for p in items:
        groups.setdefault(p.kind, []).append(p)
    for kind, ps in groups.items():
        locs = ", ".join(f"{p.path}:{p.line}" if p.line is not None else str(p.path) for p in ps[:max_locations])
        more = f", ... (+{len(ps) - max_locations})" if len(ps) > max_locations else ""
        out.append(f"  {kind}: {len(ps)}  {locs}{more}")
    out.append(f"{title}:")
    out += ["  " + str(p) for p in items[:max_items]]
    if len(items) > max_items:
        out.append(f"  ... and {len(items) - max_items} more (see --json)")
    return out
