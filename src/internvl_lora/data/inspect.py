"""`internvl-lora data inspect META --model CKPT --index N`: exactly what a sample trains on.

Shows the rendered prompt with the trained spans highlighted, the token count and the tiles per image.
`--index` takes N, N:M (M excluded) or all; `--json` prints one object per sample (index, source,
input_ids, labels, num_tiles); `--save-tiles DIR` writes each tile before normalization (resized to
the tile size) as s{index}_img{i}_tile{k}.png (video frames are images with one tile each).
Indices follow the meta file's dataset order, then line order, before any repeat or shuffle.
A preference pair (`objective="mpo"`, what `--objective` or the data gives) shows the prompt both
conversations share once, then the chosen and the rejected answer, each marked as trained spans are;
its JSON object holds chosen_input_ids / chosen_labels / rejected_input_ids / rejected_labels.
The sample is encoded as training encodes it, without `data_augment` (the JPEG re-encode is random);
a video's frames are drawn with a fixed seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..errors import DataError, UserError
from ..internvl.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN
from .encode import EncodeSettings, encode_media, encode_record
from .meta import Line
from .preference import PreferenceEncoded, encode_preference, parse_preference
from .records import parse_record

BOLD_GREEN, RESET = "\033[1;32m", "\033[0m"


def parse_index(spec: str, n: int) -> list[int]:
    """Sample indices of `N`, `N:M` (M excluded, either side may be empty) or `all`, checked against n."""
    spec = spec.strip()
    if spec == "all":
        return list(range(n))
    try:
        if ":" in spec:
            a, b = spec.split(":", 1)
            start, stop = int(a) if a.strip() else 0, int(b) if b.strip() else n
            if start < 0 or stop < 0:
                raise ValueError
            if start >= n or stop <= start:
                raise UserError(f"--index {spec} selects no sample: the data has {n} samples (0..{n - 1})")
            return list(range(start, min(n, stop)))
        k = int(spec)
    except ValueError:
        raise UserError(f"--index must be N, N:M or all with N, M >= 0, got {spec!r}") from None
    if not 0 <= k < n:
        raise UserError(f"--index {k} is out of range: the data has {n} samples (0..{n - 1})")
    return [k]


def render(tokenizer, ids: list[int], labels: list[int], color: bool = True) -> str:
    """The decoded sample; trained spans in green (or [[...]] without colour); image context runs folded."""
    context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    out, k = [], 0
    while k < len(ids):
        if ids[k] == context_id:
            j = k
            while j < len(ids) and ids[j] == context_id:
                j += 1
            out.append(f"{IMG_CONTEXT_TOKEN}x{j - k}")
            k = j
            continue
        trained = labels[k] != IGNORE_INDEX
        j = k
        while j < len(ids) and ids[j] != context_id and (labels[j] != IGNORE_INDEX) == trained:
            j += 1
        text = tokenizer.decode(ids[k:j], skip_special_tokens=False)
        if trained:
            text = f"{BOLD_GREEN}{text}{RESET}" if color else f"[[{text}]]"
        out.append(text)
        k = j
    return "".join(out)


def shared_prompt_length(enc: PreferenceEncoded) -> int:
    """Tokens before the first trained token that both conversations of a pair hold alike: the prompt."""
    def first_trained(labels: list[int]) -> int:
        return next((k for k, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))

    limit = min(first_trained(enc.chosen_labels), first_trained(enc.rejected_labels))
    k = 0
    while k < limit and enc.chosen_ids[k] == enc.rejected_ids[k]:
        k += 1
    return k


def _show_pair(i: int, source: str, enc: PreferenceEncoded, tokenizer, color: bool, echo) -> None:
    k = shared_prompt_length(enc)
    counts = [(name, len(ids), sum(1 for lab in labels if lab != IGNORE_INDEX))
              for name, ids, labels in (("chosen", enc.chosen_ids, enc.chosen_labels),
                                        ("rejected", enc.rejected_ids, enc.rejected_labels))]
    cut = f", cut by {enc.cut} tokens (truncation: cut_text)" if enc.cut else ""
    echo(f"# sample {i} ({source}): preference pair, " + ", ".join(f"{name} {n} tokens ({t} trained)"
                                                                   for name, n, t in counts)
         + f", tiles per image {enc.num_tiles} (shared){cut}")
    echo(f"## prompt (shared, {k} tokens)")
    echo(render(tokenizer, enc.chosen_ids[:k], enc.chosen_labels[:k], color))
    for name, ids, labels in (("chosen", enc.chosen_ids, enc.chosen_labels),
                              ("rejected", enc.rejected_ids, enc.rejected_labels)):
        echo(f"## {name}")
        echo(render(tokenizer, ids[k:], labels[k:], color))
    echo("")


def inspect(lines: list[Line], indices: list[int], tokenizer, settings: EncodeSettings, as_json: bool = False,
            save_tiles: str | None = None, color: bool = True, echo=print, objective: str = "sft") -> int:
    """Print the samples; returns the number of samples that failed (each reported with file:line).
    `objective`: "sft" (supervised records) or "mpo" (preference pairs)."""
    failed = 0
    if save_tiles:
        Path(save_tiles).mkdir(parents=True, exist_ok=True)
    for i in indices:
        if not 0 <= i < len(lines):
            raise UserError(f"--index {i} is out of range: the data has {len(lines)} samples (0..{len(lines) - 1})")
        ln = lines[i]
        source = f"{ln.path}:{ln.line}"
        tiles = None
        try:
            if objective == "mpo":
                pair = parse_preference(ln)
                enc = encode_preference(pair, tokenizer, settings, dataset_max_patch=ln.spec.max_dynamic_patch,
                                        rng=random.Random(i))
                if save_tiles:  # the pair's tiles are its conversation's; drawn with the same seed
                    tiles = encode_media(pair.chosen, settings, dataset_max_patch=ln.spec.max_dynamic_patch,
                                         rng=random.Random(i)).pixels(settings, keep_tiles=True)[1]
            else:
                enc = encode_record(parse_record(ln), tokenizer, settings, dataset_max_patch=ln.spec.max_dynamic_patch,
                                    keep_tiles=True, rng=random.Random(i))
                tiles = enc.tiles
        except DataError as e:
            failed += 1
            echo(json.dumps({"index": i, "source": source, "kind": e.kind, "error": str(e)}) if as_json
                 else f"# sample {i}: {e}")
            continue
        if save_tiles:
            offset = 0
            for img_i, n in enumerate(enc.num_tiles):
                for k in range(n):
                    tiles[offset + k].save(Path(save_tiles) / f"s{i}_img{img_i}_tile{k}.png")
                offset += n
        if isinstance(enc, PreferenceEncoded):
            if as_json:
                echo(json.dumps({"index": i, "source": source, "objective": "mpo",
                                 "chosen_input_ids": enc.chosen_ids, "chosen_labels": enc.chosen_labels,
                                 "rejected_input_ids": enc.rejected_ids, "rejected_labels": enc.rejected_labels,
                                 "num_tiles": enc.num_tiles}))
            else:
                _show_pair(i, source, enc, tokenizer, color, echo)
            continue
        trained = sum(1 for lab in enc.labels if lab != IGNORE_INDEX)
        if as_json:
            echo(json.dumps({"index": i, "source": source, "input_ids": enc.input_ids, "labels": enc.labels,
                             "num_tiles": enc.num_tiles}))
        else:
            cut = f", cut by {enc.cut} tokens (truncation: cut_text)" if enc.cut else ""
            echo(f"# sample {i} ({source}): {len(enc.input_ids)} tokens, {trained} trained, "
                 f"tiles per image {enc.num_tiles}{cut}")
            echo(render(tokenizer, enc.input_ids, enc.labels, color))
            echo("")
    return failed
