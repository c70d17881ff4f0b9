"""Checks of an adapter folder at its boundary, before any weights are loaded or merged.

`check_adapter_files`: adapter_config.json is JSON, adapter_model.safetensors is present (pickle weights
refused) and whole. `check_adapter_shapes`: every LoRA fits the module of the base model it targets, so an
adapter given a base of other shapes is named as such instead of failing deep inside PEFT / torch.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ...errors import CheckpointError, UserError
from .config import read_json
from .safetensors import read_safetensors_header

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_LORA_PART = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


def check_adapter_files(adapter_dir: str | Path) -> tuple[dict, dict[str, tuple[str, tuple[int, ...]]]]:
    """The adapter's config and its weights header `{key: (dtype, shape)}`; a `UserError` naming the file
    when either is missing, not JSON, pickle, or cut short."""
    path = Path(adapter_dir)
    cfg_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_file.is_file():
        raise UserError(f"{path}: no {ADAPTER_CONFIG}; give the adapter folder written by `train` (RUN/adapter)")
    config = read_json(cfg_file)
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_file}: not a JSON object")
    if not weights.is_file():
        bins = sorted(p.name for p in [*path.glob("adapter_model*.bin"), *path.glob("adapter_model*.pt*")])
        if bins:
            raise CheckpointError(f"{path / bins[0]}: pickle adapter weights are refused (loading them can run "
                                  "arbitrary code); save the adapter as safetensors")
        raise CheckpointError(f"{weights}: file not found")
    return config, read_safetensors_header(weights)


def check_adapter_shapes(adapter_dir: str | Path, header: dict[str, tuple[str, tuple[int, ...]]],
                         model: torch.nn.Module) -> None:
    """Refuse an adapter whose LoRA matrices do not fit the base model's modules (a base of other shapes)."""
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    problems = []
    for key, (_, shape) in header.items():
        m = _LORA_PART.match(key[len(PEFT_PREFIX):]) if key.startswith(PEFT_PREFIX) else None
        if m is None or len(shape) != 2:
            continue
        try:
            w = model.get_submodule(m["module"]).weight
        except AttributeError:
            problems.append(f"{m['module']}: no such module with a weight in the base model")
            continue
        if w.dim() != 2:
            continue
        out_f, in_f = (w.shape[1], w.shape[0]) if m["part"].startswith("lora_embedding") else tuple(w.shape)
        fits = shape[1] == in_f if m["part"].endswith("A") else shape[0] == out_f
        if not fits:
            problems.append(f"{key} has shape {tuple(shape)}, the base weight {m['module']} has {tuple(w.shape)}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{weights}: the adapter does not fit the base model; wrong base model?\n  - "
                        + "\n  - ".join(problems[:3]) + more)


def apply_adapter(model: torch.nn.Module, adapter_dir: str | Path):
    """`PeftModel.from_pretrained(model, adapter_dir)` after the file and shape checks above."""
    import warnings

    from peft import PeftModel

    _, header = check_adapter_files(adapter_dir)
    check_adapter_shapes(adapter_dir, header, model)
    with warnings.catch_warnings():  # peft reads the deprecated `is_gradient_checkpointing` property
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(model, str(adapter_dir))
