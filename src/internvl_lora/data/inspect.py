"""`internvl-lora data inspect META --model CKPT --index N`: exactly what a sample trains on.

Shows the rendered prompt with the trained spans highlighted, the token count and the tiles per image.
`--index` takes N, N:M (M excluded) or all; `--json` prints one object per sample (index, source,
input_ids, labels, num_tiles); `--save-tiles DIR` writes each tile before normalization (resized to
the tile size) as s{index}_img{i}_tile{k}.png (video frames are images with one tile each).
Indices follow the meta file's dataset order, then line order, before any repeat or shuffle.
The sample is encoded as training encodes it, without `data_augment` (the JPEG re-encode is random);
a video's frames are drawn with a fixed seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..errors import DataError, UserError
from ..internvl.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN
from .encode import EncodeSettings, encode_record
from .meta import Line
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


def inspect(lines: list[Line], indices: list[int], tokenizer, settings: EncodeSettings, as_json: bool = False,
            save_tiles: str | None = None, color: bool = True, echo=print) -> int:
    """Print the samples; returns the number of samples that failed (each reported with file:line)."""
    failed = 0
    if save_tiles:
        Path(save_tiles).mkdir(parents=True, exist_ok=True)
    for i in indices:
        if not 0 <= i < len(lines):
            raise UserError(f"--index {i} is out of range: the data has {len(lines)} samples (0..{len(lines) - 1})")
        ln = lines[i]
        source = f"{ln.path}:{ln.line}"
        try:
            enc = encode_record(parse_record(ln), tokenizer, settings, dataset_max_patch=ln.spec.max_dynamic_patch,
                                keep_tiles=True, rng=random.Random(i))
        except DataError as e:
            failed += 1
            echo(json.dumps({"index": i, "source": source, "kind": e.kind, "error": str(e)}) if as_json
                 else f"# sample {i}: {e}")
            continue
        if save_tiles:
            offset = 0
            for img_i, n in enumerate(enc.num_tiles):
                for k in range(n):
                    enc.tiles[offset + k].save(Path(save_tiles) / f"s{i}_img{img_i}_tile{k}.png")
                offset += n
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
