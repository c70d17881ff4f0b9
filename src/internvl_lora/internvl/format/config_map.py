"""Original config <-> `InternVLConfig`: `original_config_to_hf`, `hf_config_to_original`,
`resolve_image_token_id` and the -hf `preprocessor_config.json` of an original config.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import CheckpointError
from ..constants import IMG_CONTEXT_TOKEN
from .config import (
    ARCH_BY_LLM_TYPE, HF_DEFAULT_TEMPLATE, HF_TEMPLATE_BY_LLM, LLM_TYPES, PathLike, check_original_config,
    config_file, llm_arch, read_json,
)

if TYPE_CHECKING:
    from transformers import InternVLConfig

logger = logging.getLogger(__name__)


# `<IMG_CONTEXT>` ids of the released tokenizers, used only when no tokenizer is at hand.
_DEFAULT_IMAGE_TOKEN_IDS: dict[str, int] = {
    "InternLM2ForCausalLM": 92546,
    "Qwen3ForCausalLM": 151671,
    "Qwen3MoeForCausalLM": 151671,
    "GptOssForCausalLM": 200021,
}

# Fields every transformers config has; they are not copied from the original LLM config.
_GENERIC_FIELDS = {
    "transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
}
_LEGACY_ROPE_FIELDS = ("rope_theta", "rope_scaling")


def _text_config(llm: dict, arch: str, where: str):
    """The native text config from an original `llm_config`."""
    import dataclasses

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = LLM_TYPES[arch]
    cls = CONFIG_MAPPING[model_type]
    aliases = getattr(cls, "attribute_map", {})  # e.g. num_experts <-> num_local_experts
    fields = ({f.name for f in dataclasses.fields(cls)} | set(aliases) | set(aliases.values())) - _GENERIC_FIELDS
    kwargs = {k: v for k, v in llm.items() if k in fields}
    for k in _LEGACY_ROPE_FIELDS:  # the config class turns these into `rope_parameters`
        if llm.get(k) is not None:
            kwargs[k] = llm[k]
    if isinstance(kwargs.get("rope_scaling"), dict):
        kwargs["rope_scaling"] = dict(kwargs["rope_scaling"])
    if arch == "InternLM2ForCausalLM":
        # InternLM2's `bias` covers wqkv and wo (attention); its feed-forward never has a bias.
        kwargs["attention_bias"] = bool(llm.get("bias", False))
        kwargs["mlp_bias"] = False
        kwargs.pop("head_dim", None)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: `llm_config` cannot be read as a {cls.__name__} ({e})") from None


def _vision_config(cfg: dict, where: str) -> dict:
    vc = cfg.get("vision_config")
    if not isinstance(vc, dict):
        raise CheckpointError(f"{where}: no `vision_config`")
    image_size = vc.get("image_size", 448)
    force = cfg.get("force_image_size")
    if force and int(force) != int(image_size):
        raise CheckpointError(
            f"{where}: force_image_size {force} differs from vision_config.image_size {image_size}; "
            "the position embeddings would have to be resized, which this converter does not do"
        )
    attention_dropout = vc.get("attention_dropout", vc.get("attention_probs_dropout_prob", 0.0))
    out = {
        "hidden_size": vc.get("hidden_size", 1024),
        "num_hidden_layers": vc.get("num_hidden_layers", 24),
        "num_attention_heads": vc.get("num_attention_heads", 16),
        "intermediate_size": vc.get("intermediate_size", 4096),
        "hidden_act": vc.get("hidden_act", "gelu"),
        "attention_bias": bool(vc.get("qkv_bias", True)),
        "use_qk_norm": bool(vc.get("qk_normalization", False)),
        "attention_dropout": attention_dropout,
        "projection_dropout": vc.get("dropout", attention_dropout),
        "hidden_dropout_prob": 0.0,  # InternViT has drop-path, not dropout, around its blocks
        "norm_type": vc.get("norm_type", "layer_norm"),
        "layer_norm_eps": vc.get("layer_norm_eps", 1e-6),
        "image_size": int(force or image_size),
        "patch_size": vc.get("patch_size", 14),
        "num_channels": vc.get("num_channels", 3),
        "initializer_range": vc.get("initializer_range", 0.02),
        "use_absolute_position_embeddings": True,
        "use_mean_pooling": True,  # no final norm, as in InternViT
    }
    if out["norm_type"] not in ("layer_norm", "rms_norm"):
        raise CheckpointError(f"{where}: vision_config.norm_type {out['norm_type']!r} is not supported")
    return out


def _image_token_id_from_files(folder: Path) -> int | None:
    """`<IMG_CONTEXT>`'s id read from a checkpoint's tokenizer files, without loading the tokenizer."""
    added = folder / "added_tokens.json"
    if added.is_file():
        data = read_json(added)
        if isinstance(data, dict) and IMG_CONTEXT_TOKEN in data:
            return int(data[IMG_CONTEXT_TOKEN])
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.is_file():
        for idx, tok in (read_json(tok_cfg).get("added_tokens_decoder") or {}).items():
            if isinstance(tok, dict) and tok.get("content") == IMG_CONTEXT_TOKEN:
                return int(idx)
    tok_json = folder / "tokenizer.json"
    if tok_json.is_file():
        for tok in read_json(tok_json).get("added_tokens") or []:
            if tok.get("content") == IMG_CONTEXT_TOKEN:
                return int(tok["id"])
    return None


def _default_image_token_id(cfg: dict, arch: str, where: str) -> int:
    if arch == "Qwen2ForCausalLM":
        # InternVL2 (Qwen2 tokenizer, vocab 151655) puts it at 151648; InternVL2.5 / 3 at 151667.
        return 151667 if int(cfg["llm_config"].get("vocab_size", 151674)) > 151667 else 151648
    if arch in _DEFAULT_IMAGE_TOKEN_IDS:
        return _DEFAULT_IMAGE_TOKEN_IDS[arch]
    raise CheckpointError(
        f"{where}: cannot tell the id of {IMG_CONTEXT_TOKEN} for a {arch} model without its tokenizer files; "
        "pass image_token_id= or tokenizer="
    )


def resolve_image_token_id(cfg: dict, path: PathLike | None = None, tokenizer=None,
                           image_token_id: int | None = None) -> int:
    """`<IMG_CONTEXT>`'s id: the argument, else the tokenizer, else the folder's tokenizer files, else the
    id of the released checkpoints of that LLM family (with a warning)."""
    if image_token_id is not None:
        return int(image_token_id)
    where = config_file(path)
    if tokenizer is not None:
        tid = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        if tid is None or tid == tokenizer.unk_token_id:
            raise CheckpointError(f"{where}: the tokenizer given has no {IMG_CONTEXT_TOKEN} token")
        return int(tid)
    if path is not None:
        folder = Path(path)
        folder = folder.parent if folder.suffix == ".json" else folder
        if folder.is_dir():
            tid = _image_token_id_from_files(folder)
            if tid is not None:
                return tid
    tid = _default_image_token_id(cfg, llm_arch(cfg, path), where)
    logger.warning("%s: no tokenizer files; assuming %s = %d (the released checkpoints' id)",
                   where, IMG_CONTEXT_TOKEN, tid)
    return tid


def original_config_to_hf(cfg: dict, path: PathLike | None = None, *, tokenizer=None,
                          image_token_id: int | None = None) -> InternVLConfig:
    """The `InternVLConfig` of an original `config.json` (already parsed).

    `path` (the checkpoint folder or its config.json) is used in messages and to read `<IMG_CONTEXT>`'s id
    from the tokenizer files next to it; `tokenizer` or `image_token_id` take precedence.
    """
    from transformers import InternVLConfig

    where = config_file(path)
    check_original_config(cfg, path)
    arch = llm_arch(cfg, path)
    vision = _vision_config(cfg, where)
    text = _text_config(cfg["llm_config"], arch, where)
    ratio = float(cfg.get("downsample_ratio", 0.5))
    patch = vision["patch_size"]
    patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
    tokens_per_tile = int((vision["image_size"] // patch) ** 2 * ratio**2)
    tie = bool(cfg["llm_config"].get("tie_word_embeddings", False))
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=resolve_image_token_id(cfg, path, tokenizer, image_token_id),
        image_seq_length=tokens_per_tile,
        downsample_ratio=ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=int(cfg.get("select_layer", -1)),
        vision_feature_select_strategy="default",
        tie_word_embeddings=tie,  # transformers 5 defaults to True; follow the LLM
    )


def hf_config_to_original(hf_config, *, llm_architecture: str | None = None, template: str | None = None,
                          max_dynamic_patch: int = 12, min_dynamic_patch: int = 1,
                          dynamic_image_size: bool = True, use_thumbnail: bool = True,
                          torch_dtype: str = "bfloat16") -> dict:
    """An original `config.json` (as a dict) for an `InternVLConfig`, when no reference checkpoint exists.

    The LLM architecture follows the text `model_type` (`llama` -> `LlamaForCausalLM`); an InternLM2 layout
    needs a reference checkpoint (`save_original`), since its config and code cannot be rebuilt here. The
    template is `template`, else the one `convert_checkpoint` kept in the -hf config, else the -hf default.
    """
    text = hf_config.text_config
    vision = hf_config.vision_config
    template = template or getattr(hf_config, "template", None) or HF_TEMPLATE_BY_LLM.get(
        text.model_type, HF_DEFAULT_TEMPLATE)
    arch = llm_architecture or ARCH_BY_LLM_TYPE.get(text.model_type)
    if arch is None or arch == "InternLM2ForCausalLM":
        raise CheckpointError(
            f"text model_type {text.model_type!r}: cannot write an original config for it without a reference; "
            "pass reference_original= (an original checkpoint of the same model)"
        )
    llm = text.to_dict()
    for k in ("dtype", "rope_parameters", "transformers_version", "layer_types"):
        llm.pop(k, None)
    rope = dict(text.rope_parameters or {})
    llm["rope_theta"] = rope.pop("rope_theta", 10000.0)
    if rope.get("partial_rotary_factor") == 1.0:
        rope.pop("partial_rotary_factor")
    llm["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else {
        **rope, "type": rope.get("rope_type")}
    llm["architectures"] = [arch]
    llm["torch_dtype"] = torch_dtype
    llm["tie_word_embeddings"] = bool(hf_config.tie_word_embeddings)
    image_size = vision.image_size
    image_size = int(image_size[0] if isinstance(image_size, (list, tuple)) else image_size)
    patch = vision.patch_size
    patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
    layer = hf_config.vision_feature_layer
    if not isinstance(layer, int):
        raise CheckpointError(f"vision_feature_layer {layer!r}: the original format takes a single layer")
    return {
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "downsample_ratio": hf_config.downsample_ratio,
        "dynamic_image_size": dynamic_image_size,
        "force_image_size": image_size,
        "llm_config": llm,
        "max_dynamic_patch": max_dynamic_patch,
        "min_dynamic_patch": min_dynamic_patch,
        "model_type": "internvl_chat",
        "ps_version": "v2",
        "select_layer": layer,
        "template": template,
        "torch_dtype": torch_dtype,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": use_thumbnail,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": vision.hidden_size,
            "num_hidden_layers": vision.num_hidden_layers,
            "num_attention_heads": vision.num_attention_heads,
            "intermediate_size": vision.intermediate_size,
            "hidden_act": vision.hidden_act,
            "qkv_bias": bool(vision.attention_bias),
            "qk_normalization": bool(vision.use_qk_norm),
            "attention_dropout": vision.attention_dropout,
            "dropout": vision.projection_dropout,
            "drop_path_rate": 0.0,
            "norm_type": vision.norm_type,
            "layer_norm_eps": vision.layer_norm_eps,
            "image_size": image_size,
            "patch_size": patch,
            "num_channels": vision.num_channels,
            "initializer_range": vision.initializer_range,
            "initializer_factor": 1.0,
            "use_flash_attn": False,
            "torch_dtype": torch_dtype,
        },
    }


def preprocessor_config(cfg: dict) -> dict:
    size = int(cfg.get("force_image_size") or cfg.get("vision_config", {}).get("image_size", 448))
    return {
        "image_processor_type": "GotOcr2ImageProcessor",
        "crop_to_patches": bool(cfg.get("dynamic_image_size", True)),
        "min_patches": int(cfg.get("min_dynamic_patch", 1)),
        "max_patches": int(cfg.get("max_dynamic_patch", 12)),
        "size": {"height": size, "width": size},
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "do_normalize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_convert_rgb": True,
        "resample": 3,
    }
