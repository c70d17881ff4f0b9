"""Safetensors weight files: headers, the files of a checkpoint folder, reading tensors, dtype names.

Pickle weights (`*.bin`, `*.pt*`) are refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError
from .config import PathLike, read_json


WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
}


def dtype_of(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    return _DTYPES.get(str(value).replace("torch.", ""))


def read_safetensors_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """`{name: (dtype, shape)}` from a safetensors file's header, without reading tensors."""
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", raw)
            size = file.stat().st_size
            if length > size - 8 or length > 100_000_000:
                raise ValueError(f"header length {length} does not fit a {size}-byte file")
            header = json.loads(f.read(length))
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if end > size - 8 - length or begin > end:
                raise ValueError(f"tensor {name} lies past the end of the file (truncated?)")
            out[name] = (info["dtype"], tuple(info["shape"]))
        return out
    except FileNotFoundError:
        raise CheckpointError(f"{file}: file not found") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not a valid safetensors file ({e}); is it corrupt or truncated?") from None


def weight_files(path: PathLike) -> dict[Path, list[str]]:
    """The safetensors files of a checkpoint folder and the tensor names to read from each.

    Reads `model.safetensors.index.json` if present, else `model.safetensors`; refuses pickle weights.
    """
    folder = Path(path)
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no `weight_map`")
        files: dict[Path, list[str]] = {}
        for name, shard in weight_map.items():
            files.setdefault(folder / shard, []).append(name)
        for shard in files:
            if not shard.is_file():
                raise CheckpointError(f"{shard}: shard listed in {index.name} is missing")
        return dict(sorted(files.items()))
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return {single: list(read_safetensors_header(single))}
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    if pickles:
        raise CheckpointError(
            f"{folder / pickles[0]}: pickle weights ({', '.join(pickles[:4])}) are refused: loading them can run "
            "arbitrary code. Only safetensors checkpoints are read; convert the weights to safetensors first"
        )
    raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} found")


@contextmanager
def open_safetensors(file: Path) -> Iterator[Any]:
    from safetensors import safe_open

    read_safetensors_header(file)  # a clear message for truncated files before safe_open's
    try:
        handle = safe_open(str(file), framework="pt")
    except Exception as e:  # safetensors raises its own error type
        raise CheckpointError(f"{file}: not a valid safetensors file ({e})") from None
    yield handle


def get_tensor(handle, file: Path, name: str) -> torch.Tensor:
    try:
        return handle.get_tensor(name)
    except Exception as e:  # SafetensorError, or a missing name
        if name not in set(handle.keys()):
            raise CheckpointError(f"{file}: tensor {name!r} (listed in the index) is not in this file") from None
        raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e}); is the file corrupt?") from None
