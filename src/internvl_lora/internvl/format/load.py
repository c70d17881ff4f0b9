"""`load_original_model`: an original checkpoint folder -> a transformers-native
`InternVLForConditionalGeneration`, streamed shard by shard, without running the checkpoint's code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...errors import CheckpointError
from .config import PathLike, read_original_config
from .config_map import original_config_to_hf
from .keymap import Group, group_of_hf, group_to_hf, groups_of, head_key, layout_of, listing
from .safetensors import dtype_of, get_tensor, open_safetensors, weight_files

if TYPE_CHECKING:
    from transformers import InternVLForConditionalGeneration

logger = logging.getLogger(__name__)


def is_lora_name(name: str) -> bool:
    return any(part in name for part in (".lora_A.", ".lora_B.", ".base_layer.", ".base_model.model."))


def _refuse_lora_keys(names: Iterable[str], folder: Path) -> None:
    lora = [n for n in names if is_lora_name(n)]
    if lora:
        raise CheckpointError(
            f"{folder}: the weights hold PEFT LoRA tensors ({listing(lora, 3)}): this is an unmerged LoRA "
            "checkpoint. Merge it first (e.g. the official InternVL `tools/merge_lora.py`), then load the merged folder"
        )


def empty_model(hf_config):
    """The native model with parameters on the meta device (buffers such as rotary tables are real)."""
    from accelerate import init_empty_weights
    from transformers import InternVLForConditionalGeneration

    with init_empty_weights(include_buffers=False):
        return InternVLForConditionalGeneration(hf_config)


def _set_parameter(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    old = module._parameters[leaf]
    module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=old.requires_grad)


def load_original_model(path: PathLike, dtype: torch.dtype | str | None = None, *, tokenizer=None,
                        image_token_id: int | None = None,
                        attn_implementation: str | None = None) -> InternVLForConditionalGeneration:
    """An `InternVLForConditionalGeneration` from an original checkpoint folder, without running its code.

    The model is built with empty (meta) parameters; each safetensors shard is read, mapped and moved into
    it in turn, so the weights are held once. `dtype` defaults to float32. If the LLM config says the
    embeddings are tied but the checkpoint stores its own output head (InternVL2-1B does), the stored head
    is loaded and the model is left untied.
    """
    from transformers import GenerationConfig

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; give the path of a checkpoint folder")
    cfg = read_original_config(folder)
    layout = layout_of(cfg, folder)
    files = weight_files(folder)
    names = [n for file_names in files.values() for n in file_names]
    _refuse_lora_keys(names, folder)
    dtype = dtype_of(dtype) or torch.float32

    hf_config = original_config_to_hf(cfg, folder, tokenizer=tokenizer, image_token_id=image_token_id)
    if hf_config.tie_word_embeddings and head_key(layout) in names:
        hf_config.tie_word_embeddings = False
        hf_config.text_config.tie_word_embeddings = False
    if attn_implementation:
        hf_config._attn_implementation = attn_implementation
    model = empty_model(hf_config)
    params = dict(model.named_parameters())

    groups, unknown = groups_of(names, layout, "original")
    unexpected = unknown + sorted({n for n, g in groups.items() if any(h not in params for h in g.hf)})
    if unexpected:
        raise CheckpointError(
            f"{folder}: {len(unexpected)} tensor(s) in the checkpoint do not fit the model config.json describes: "
            f"{listing(unexpected)}"
        )

    present = set(names)
    incomplete = sorted({o for g in set(groups.values()) for o in g.original if o not in present})
    if incomplete:
        raise CheckpointError(f"{folder}: incomplete tensor groups; the checkpoint lacks {listing(incomplete)}")

    pending: dict[str, torch.Tensor] = {}  # parts of groups spread over several shards (MoE experts)
    for file, file_names in files.items():
        with open_safetensors(file) as handle:
            for name in file_names:
                if name not in groups:  # a dropped buffer
                    continue
                pending[name] = get_tensor(handle, file, name)
                group = groups[name]
                if not all(o in pending for o in group.original):
                    continue
                try:
                    converted = group_to_hf(group, pending, layout)
                except (RuntimeError, ValueError) as e:
                    shapes = {o: tuple(pending[o].shape) for o in group.original[:3]}
                    raise CheckpointError(
                        f"{file}: cannot map {listing(group.original, 3)} ({e}); shapes {shapes}"
                    ) from None
                for o in group.original:
                    pending.pop(o)
                for hf_name, tensor in converted.items():
                    want = tuple(params[hf_name].shape)
                    if tuple(tensor.shape) != want:
                        src = group.original[0]
                        raise CheckpointError(
                            f"{file}: tensor {src!r} gives {hf_name} of shape {tuple(tensor.shape)}, but config.json "
                            f"describes shape {want}"
                        )
                    if tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    _set_parameter(model, hf_name, tensor)
    if hf_config.tie_word_embeddings:
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        expected = sorted({o for n in missing for o in (group_of_hf(n, layout) or Group("", (n,), ())).original})
        raise CheckpointError(
            f"{folder}: {len(missing)} weight(s) the model needs are not in the checkpoint: {listing(expected)}"
        )
    if (folder / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(folder)
        except (OSError, ValueError) as e:
            logger.warning("%s: generation_config.json ignored (%s)", folder, e)
    model.eval()
    return model
