"""`internvl-lora data check META --model CKPT`: a pre-flight audit of every sample.

Each line is parsed, validated and encoded exactly as training will do it (images are decoded
cheaply, tiles counted from their sizes), so anything that would fail or be cut during training is
found here first, with file:line. `train` runs the same audit before it starts.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field

from ..errors import DataError
from .encode import EncodeSettings, encode_record
from .records import DatasetSpec, Line, parse_record, read_lines


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
    lengths: dict[int, int] = field(default_factory=dict)  # index -> token count
    problems: list[Problem] = field(default_factory=list)
    images: int = 0
    tiles: int = 0
    trained_tokens: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def by_kind(self) -> dict[str, int]:
        return dict(collections.Counter(p.kind for p in self.problems))

    def summary(self) -> dict:
        lengths = sorted(self.lengths.values())
        return {
            "samples": len(self.lines), "valid": len(self.valid), "invalid": len(self.problems),
            "images": self.images, "tiles": self.tiles, "trained_tokens": self.trained_tokens,
            "tokens_min": lengths[0] if lengths else 0, "tokens_max": lengths[-1] if lengths else 0,
            "tokens_mean": round(sum(lengths) / len(lengths), 1) if lengths else 0,
            "problems_by_kind": self.by_kind(),
        }


def audit(specs: list[DatasetSpec], tokenizer, settings: EncodeSettings, decode_video: bool = True) -> AuditResult:
    """Check every line; never stops at the first problem."""
    result = AuditResult(lines=read_lines(specs))
    for ln in result.lines:
        try:
            record = parse_record(ln)
            if record.video and not decode_video:
                result.valid.append(ln.index)
                continue
            enc = encode_record(record, tokenizer, settings, dataset_max_patch=ln.spec.max_dynamic_patch,
                                load_pixels=False)
        except DataError as e:
            result.problems.append(Problem(e.kind, e.path or ln.path, e.line or ln.line, e.detail))
            continue
        result.valid.append(ln.index)
        result.lengths[ln.index] = len(enc.input_ids)
        result.images += len(enc.num_tiles)
        result.tiles += sum(enc.num_tiles)
        result.trained_tokens += sum(1 for lab in enc.labels if lab != -100)
    return result


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
        rows.append(f"{lo + b * step:>7}-{lo + (b + 1) * step - 1:<7} {'#' * max(1 if c else 0, round(c / top * width))} {c}")
    return rows


def format_report(result: AuditResult, max_problems: int = 50) -> str:
    s = result.summary()
    out = [
        f"samples: {s['samples']}  valid: {s['valid']}  with problems: {s['invalid']}",
        f"images: {s['images']}  tiles: {s['tiles']}  trained tokens: {s['trained_tokens']}",
        f"tokens per sample: min {s['tokens_min']}  mean {s['tokens_mean']}  max {s['tokens_max']}",
    ]
    hist = histogram(list(result.lengths.values()))
    if hist:
        out.append("token-length histogram:")
        out += ["  " + r for r in hist]
    if result.problems:
        out.append("problems by kind: " + json.dumps(s["problems_by_kind"]))
        for p in result.problems[:max_problems]:
            out.append("  " + str(p))
        if len(result.problems) > max_problems:
            out.append(f"  ... and {len(result.problems) - max_problems} more (see --json)")
    return "\n".join(out)
