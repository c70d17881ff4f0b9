"""Checkpoint folders: detect the format, read the settings training needs, load model and tokenizer.

Two formats exist:
- "hf": transformers-native `InternVLForConditionalGeneration` (config `model_type: internvl`), e.g.
  `OpenGVLab/InternVL3-1B-hf`, and the tiny demo model.
- "original": the remote-code `InternVLChatModel` (config `model_type: internvl_chat`), e.g.
  `OpenGVLab/InternVL3-8B`. It is converted on load by our own key/config mapping (the `format` package);
  no checkpoint code is ever run.

`inspect_checkpoint` reads only config and processor files, so data tools can use it without weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import CheckpointError
from .constants import IMG_CONTEXT_TOKEN, NORMALIZE
from .format.config import HF_DEFAULT_TEMPLATE, HF_TEMPLATE_BY_LLM, original_llm_type, read_json


@dataclass
class CheckpointInfo:
    """What the data pipeline and the LoRA setup need to know about a checkpoint."""

    path: str
    format: str  # "hf" | "original"
    template: str
    tile_size: int
    tokens_per_tile: int
    max_dynamic_patch: int
    min_dynamic_patch: int
    use_thumbnail: bool
    dynamic_image_size: bool
    normalize_type: str
    llm_type: str  # text model_type after conversion: qwen2, qwen3, llama, ...

    def to_dict(self) -> dict:
        return asdict(self)


def detect_format(path: str | Path) -> str:
    cfg = read_json(Path(path) / "config.json", checkpoint_file=True)
    model_type = cfg.get("model_type")
    if model_type == "internvl":
        return "hf"
    if model_type == "internvl_chat":
        return "original"
    raise CheckpointError(
        f"{Path(path) / 'config.json'}: model_type {model_type!r} is not an InternVL checkpoint "
        "(expected 'internvl' for -hf checkpoints or 'internvl_chat' for original ones)"
    )


def _normalize_type(mean) -> str:
    for name, (m, _) in NORMALIZE.items():
        if mean is not None and all(abs(a - b) < 1e-4 for a, b in zip(mean, m)):
            return name
    return "imagenet"


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder; give the path of a checkpoint folder")
    fmt = detect_format(path)
    cfg = read_json(path / "config.json", checkpoint_file=True)
    if fmt == "hf":
        vision = cfg.get("vision_config", {})
        image_size = vision.get("image_size", 448)
        patch = vision.get("patch_size", 14)
        image_size = image_size[0] if isinstance(image_size, list) else image_size
        patch = patch[0] if isinstance(patch, list) else patch
        ratio = cfg.get("downsample_ratio", 0.5)
        tokens = int((image_size // patch) ** 2 * ratio**2)
        proc_path = path / "preprocessor_config.json"
        proc = read_json(proc_path, checkpoint_file=True) if proc_path.exists() else {}
        llm_type = cfg.get("text_config", {}).get("model_type", "qwen2")
        return CheckpointInfo(
            path=str(path), format="hf",
            # A -hf checkpoint converted by us from an original one keeps its `template` field.
            template=cfg.get("template") or HF_TEMPLATE_BY_LLM.get(llm_type, HF_DEFAULT_TEMPLATE),
            tile_size=int(proc.get("size", {}).get("height", image_size)),
            tokens_per_tile=tokens,
            max_dynamic_patch=int(proc.get("max_patches", 12)),
            min_dynamic_patch=int(proc.get("min_patches", 1)),
            use_thumbnail=True,
            dynamic_image_size=bool(proc.get("crop_to_patches", True)),
            normalize_type=_normalize_type(proc.get("image_mean")),
            llm_type=llm_type,
        )
    image_size = int(cfg.get("force_image_size") or cfg.get("vision_config", {}).get("image_size", 448))
    patch = int(cfg.get("vision_config", {}).get("patch_size", 14))
    ratio = float(cfg.get("downsample_ratio", 0.5))
    return CheckpointInfo(
        path=str(path), format="original",
        template=cfg.get("template") or HF_DEFAULT_TEMPLATE,
        tile_size=image_size,
        tokens_per_tile=int((image_size // patch) ** 2 * ratio**2),
        max_dynamic_patch=int(cfg.get("max_dynamic_patch", 12)),
        min_dynamic_patch=int(cfg.get("min_dynamic_patch", 1)),
        use_thumbnail=bool(cfg.get("use_thumbnail", True)),
        dynamic_image_size=bool(cfg.get("dynamic_image_size", True)),
        normalize_type="imagenet",
        llm_type=original_llm_type(cfg),
    )


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer, without remote code; checks the InternVL special tokens are there."""
    from transformers import AutoTokenizer

    path = Path(path)
    if detect_format(path) == "original":
        from .format.tokenizer import load_original_tokenizer

        tokenizer = load_original_tokenizer(path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN) in (None, tokenizer.unk_token_id):
        raise CheckpointError(f"{path}: the tokenizer has no {IMG_CONTEXT_TOKEN} token; is this an InternVL checkpoint?")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_weights(path: str | Path) -> None:
    """Refuse pickle-only folders and damaged safetensors (header or data cut short) with a message naming
    the file, before transformers' loader sees them (it would unpickle `*.bin` or fail with a traceback)."""
    from .format.safetensors import read_safetensors_header, weight_files

    for file in weight_files(path):
        read_safetensors_header(file)


def load_model(path: str | Path, dtype=None, device: str | None = None):
    """An `InternVLForConditionalGeneration` from either format."""
    import torch
    from transformers import InternVLForConditionalGeneration

    path = Path(path)
    dtype = dtype or torch.float32
    if detect_format(path) == "original":
        from .format.load import load_original_model

        model = load_original_model(path, dtype=dtype)
    else:
        check_weights(path)
        try:
            model = InternVLForConditionalGeneration.from_pretrained(path, dtype=dtype)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot load the weights ({e})") from None
    if device:
        model.to(device)
    return model
