"""`internvl-lora data inspect META --model CKPT --index N`: exactly what a sample trains on.

Shows the rendered prompt with the trained spans highlighted, the token count and the tiles per image.
`--index` takes N, N:M or all; `--json` prints one object per sample (index, input_ids, labels,
num_tiles); `--save-tiles DIR` writes each tile before normalization as s{index}_img{i}_tile{k}.png.
Indices follow the meta file's dataset order, then line order, before any repeat or shuffle.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError, UserError
from ..internvl.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN
from .encode import EncodeSettings, encode_record
from .records import Line, parse_record

BOLD_GREEN, RESET = "\033[1;32m", "\033[0m"


def parse_index(spec: str, n: int) -> list[int]:
    if spec == "all":
        return list(range(n))
    try:
        if ":" in spec:
            a, b = spec.split(":", 1)
            return list(range(int(a) if a else 0, min(n, int(b) if b else n)))
        return [int(spec)]
    except ValueError:
        raise UserError(f"--index must be N, N:M or all, got {spec!r}") from None


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
        try:
            enc = encode_record(parse_record(ln), tokenizer, settings, dataset_max_patch=ln.spec.max_dynamic_patch,
                                keep_tiles=True)
        except DataError as e:
            failed += 1
            echo(json.dumps({"index": i, "error": str(e)}) if as_json else f"# sample {i}: {e}")
            continue
        if save_tiles:
            k_img = 0
            offset = 0
            for img_i, n in enumerate(enc.num_tiles):
                for k in range(n):
                    enc.tiles[offset + k].save(Path(save_tiles) / f"s{i}_img{img_i}_tile{k}.png")
                offset += n
                k_img += 1
        if as_json:
            echo(json.dumps({"index": i, "input_ids": enc.input_ids, "labels": enc.labels, "num_tiles": enc.num_tiles}))
        else:
            trained = sum(1 for lab in enc.labels if lab != IGNORE_INDEX)
            echo(f"# sample {i} ({ln.path}:{ln.line}): {len(enc.input_ids)} tokens, {trained} trained, "
                 f"tiles per image {enc.num_tiles}")
            echo(render(tokenizer, enc.input_ids, enc.labels, color))
            echo("")
    return failed
