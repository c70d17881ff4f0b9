"""Original (remote-code) InternVL checkpoints <-> transformers-native `InternVLForConditionalGeneration`.

Original checkpoints (`model_type: internvl_chat`, class `InternVLChatModel`) ship their own Python code.
This module never runs it: it reads `config.json` and the safetensors files as data, and maps them with
its own tables.

* Config: `original_config_to_hf` builds an `InternVLConfig`. `original_llm_type` names the text model
  family (InternLM2 becomes Llama).
* Tensors: the rule table `_rules` lists every parameter of an original checkpoint and its native
  counterpart(s). Most rules are renames. Three kinds change tensors:
  - the InternViT `attn.qkv` is split by rows into q/k/v and fused back;
  - the InternLM2 `attention.wqkv` is split per KV group (rows viewed as `(kv_heads, groups + 2,
    head_dim)`: the first `groups` slots are queries, then K, then V) and fused back;
  - Qwen3-MoE per-expert linears are stacked into transformers 5's fused expert tensors and unstacked
    back.
  `original_to_hf_state_dict`, `hf_to_original_state_dict`, `original_key_to_hf` and `hf_key_to_original`
  all use the same table, so the two directions are exact inverses.
* Files: `load_original_model` (streams shard by shard into a model built without weights),
  `load_original_tokenizer`, `save_original` (writes a merged model back in a source checkpoint's
  layout), `convert_checkpoint` and `convert_adapter` (PEFT LoRA adapters).

Every problem a user can fix is raised as `CheckpointError`, naming the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointError
from .constants import IMG_CONTEXT_TOKEN

if TYPE_CHECKING:
    from transformers import InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

# --------------------------------------------------------------------------------------------------
# LLM families
# --------------------------------------------------------------------------------------------------

# `llm_config.architectures[0]` -> the transformers `model_type` the text model becomes.
LLM_TYPES: dict[str, str] = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "InternLM2ForCausalLM": "llama",  # converted to Llama (split wqkv, renamed modules)
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "GptOssForCausalLM": "gpt_oss",
    "Phi3ForCausalLM": "phi3",  # native Phi3 keeps the fused qkv_proj / gate_up_proj names
}

# Used to write an original config from an -hf one when no reference checkpoint is given.
# InternLM2 is absent on purpose: a native "llama" cannot be told apart from a real Llama.
ARCH_BY_LLM_TYPE: dict[str, str] = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "phi3": "Phi3ForCausalLM",
}

# `<IMG_CONTEXT>` ids of the released tokenizers, used only when no tokenizer is at hand.
_DEFAULT_IMAGE_TOKEN_IDS: dict[str, int] = {
    "InternLM2ForCausalLM": 92546,
    "Qwen3ForCausalLM": 151671,
    "Qwen3MoeForCausalLM": 151671,
    "GptOssForCausalLM": 200021,
}

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# Files `save_original` copies from the source checkpoint (besides `*.py`).
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja",
)
SIDE_FILES = ("generation_config.json", "preprocessor_config.json")


def _config_file(path: PathLike | None) -> str:
    """The config file to name in messages."""
    if path is None:
        return "config.json"
    p = Path(path)
    return str(p if p.suffix == ".json" else p / "config.json")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _llm_arch(cfg: dict, path: PathLike | None = None) -> str:
    where = _config_file(path)
    llm = cfg.get("llm_config")
    if not isinstance(llm, dict):
        kind = cfg.get("model_type")
        raise CheckpointError(
            f"{where}: no `llm_config`; this is not an original InternVL chat config "
            f"(model_type {kind!r}, expected 'internvl_chat')"
        )
    archs = llm.get("architectures") or []
    if not archs:
        raise CheckpointError(f"{where}: `llm_config.architectures` is missing; cannot tell the LLM family")
    return str(archs[0])


def original_llm_type(cfg: dict, path: PathLike | None = None) -> str:
    """The transformers `model_type` of the text model an original config converts to."""
    arch = _llm_arch(cfg, path)
    if arch not in LLM_TYPES:
        raise CheckpointError(
            f"{_config_file(path)}: LLM architecture {arch!r} is not supported; supported: "
            f"{', '.join(sorted(LLM_TYPES))}"
        )
    return LLM_TYPES[arch]


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

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
        data = _read_json(added)
        if isinstance(data, dict) and IMG_CONTEXT_TOKEN in data:
            return int(data[IMG_CONTEXT_TOKEN])
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.is_file():
        for idx, tok in (_read_json(tok_cfg).get("added_tokens_decoder") or {}).items():
            if isinstance(tok, dict) and tok.get("content") == IMG_CONTEXT_TOKEN:
                return int(idx)
    tok_json = folder / "tokenizer.json"
    if tok_json.is_file():
        for tok in _read_json(tok_json).get("added_tokens") or []:
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
    where = _config_file(path)
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
    tid = _default_image_token_id(cfg, _llm_arch(cfg, path), where)
    logger.warning("%s: no tokenizer files; assuming %s = %d (the released checkpoints' id)",
                   where, IMG_CONTEXT_TOKEN, tid)
    return tid


def check_original_config(cfg: dict, path: PathLike | None = None) -> None:
    """Refuse configs this converter cannot represent exactly (raises `CheckpointError`)."""
    where = _config_file(path)
    if cfg.get("model_type") not in (None, "internvl_chat"):
        hint = " (a transformers-native -hf checkpoint: load it directly)" if cfg["model_type"] == "internvl" else ""
        raise CheckpointError(f"{where}: model_type {cfg.get('model_type')!r} is not an original InternVL config{hint}")
    original_llm_type(cfg, path)
    lora = {k: cfg.get(k) for k in ("use_llm_lora", "use_backbone_lora") if cfg.get(k)}
    if lora:
        flags = ", ".join(f"{k}={v}" for k, v in lora.items())
        raise CheckpointError(
            f"{where}: {flags}: this is an unmerged official LoRA checkpoint (its weights are stored under "
            "PEFT-wrapped names). Merge it first, e.g. with the official InternVL `tools/merge_lora.py`, "
            "and load the merged folder; or load it with the official code as a LoRA checkpoint"
        )
    ps = cfg.get("ps_version", "v1")
    if ps != "v2":
        raise CheckpointError(
            f"{where}: ps_version {ps!r}"
            + (" (absent, so the InternVL default 'v1')" if "ps_version" not in cfg else "")
            + ": transformers' InternVL implements the 'v2' pixel shuffle only, and 'v1' orders the image "
            "tokens differently; this checkpoint cannot be converted exactly"
        )
    if float(cfg.get("downsample_ratio", 0.5)) != 0.5:
        raise CheckpointError(f"{where}: downsample_ratio {cfg.get('downsample_ratio')} is not supported (only 0.5)")


def original_config_to_hf(cfg: dict, path: PathLike | None = None, *, tokenizer=None,
                          image_token_id: int | None = None) -> InternVLConfig:
    """The `InternVLConfig` of an original `config.json` (already parsed).

    `path` (the checkpoint folder or its config.json) is used in messages and to read `<IMG_CONTEXT>`'s id
    from the tokenizer files next to it; `tokenizer` or `image_token_id` take precedence.
    """
    from transformers import InternVLConfig

    where = _config_file(path)
    check_original_config(cfg, path)
    arch = _llm_arch(cfg, path)
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
    from .checkpoint import HF_DEFAULT_TEMPLATE, HF_TEMPLATE_BY_LLM

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


# --------------------------------------------------------------------------------------------------
# Key mapping: one rule table, read in both directions
# --------------------------------------------------------------------------------------------------

_FIELD_REGEX = {"i": r"\d+", "e": r"\d+", "p": r"weight|bias", "rest": r".+"}


@cache
def _compile(pattern: str) -> re.Pattern:
    """`"a.{i}.b.{p}"` -> a regex with named groups; `{e}` is the expert index."""
    parts = re.split(r"\{(\w+)\}", pattern)
    regex = "".join(re.escape(part) if n % 2 == 0 else f"(?P<{part}>{_FIELD_REGEX[part]})"
                    for n, part in enumerate(parts))
    return re.compile(regex + "$")


@dataclass(frozen=True)
class _Rule:
    kind: str  # rename | vision_qkv | grouped_qkv | experts_gate_up | experts_down
    original: tuple[str, ...]  # patterns; experts_gate_up has (gate, up)
    hf: tuple[str, ...]  # patterns; the qkv kinds have (q, k, v)


@dataclass(frozen=True)
class _Group:
    """Original tensors that become native tensors together (and back)."""

    kind: str
    original: tuple[str, ...]
    hf: tuple[str, ...]


@dataclass(frozen=True)
class _Layout:
    """What the mapping needs to know about a checkpoint."""

    arch: str
    num_heads: int
    num_kv_heads: int
    num_experts: int

    @property
    def internlm2(self) -> bool:
        return self.arch == "InternLM2ForCausalLM"

    @property
    def moe(self) -> bool:
        return self.arch == "Qwen3MoeForCausalLM"


def _layout(cfg: dict | _Layout, path: PathLike | None = None) -> _Layout:
    if isinstance(cfg, _Layout):
        return cfg
    arch = _llm_arch(cfg, path)
    original_llm_type(cfg, path)
    llm = cfg["llm_config"]
    heads = int(llm.get("num_attention_heads", 1))
    return _Layout(
        arch=arch,
        num_heads=heads,
        num_kv_heads=int(llm.get("num_key_value_heads") or heads),
        num_experts=int(llm.get("num_experts") or llm.get("num_local_experts") or 0)
        if arch == "Qwen3MoeForCausalLM" else 0,
    )


_V, _VH = "vision_model.", "model.vision_tower."
_VL, _VLH = _V + "encoder.layers.{i}.", _VH + "encoder.layer.{i}."
_VISION_RULES = (
    _Rule("rename", (_V + "embeddings.class_embedding",), (_VH + "embeddings.cls_token",)),
    _Rule("rename", (_V + "embeddings.position_embedding",), (_VH + "embeddings.position_embeddings",)),
    _Rule("rename", (_V + "embeddings.patch_embedding.{p}",), (_VH + "embeddings.patch_embeddings.projection.{p}",)),
    _Rule("vision_qkv", (_VL + "attn.qkv.{p}",), tuple(_VLH + f"attention.{x}_proj.{{p}}" for x in "qkv")),
    _Rule("rename", (_VL + "attn.proj.{p}",), (_VLH + "attention.projection_layer.{p}",)),
    _Rule("rename", (_VL + "attn.q_norm.{p}",), (_VLH + "attention.q_norm.{p}",)),
    _Rule("rename", (_VL + "attn.k_norm.{p}",), (_VLH + "attention.k_norm.{p}",)),
    _Rule("rename", (_VL + "mlp.fc1.{p}",), (_VLH + "mlp.fc1.{p}",)),
    _Rule("rename", (_VL + "mlp.fc2.{p}",), (_VLH + "mlp.fc2.{p}",)),
    _Rule("rename", (_VL + "norm1.{p}",), (_VLH + "layernorm_before.{p}",)),
    _Rule("rename", (_VL + "norm2.{p}",), (_VLH + "layernorm_after.{p}",)),
    _Rule("rename", (_VL + "ls1",), (_VLH + "lambda_1",)),
    _Rule("rename", (_VL + "ls2",), (_VLH + "lambda_2",)),
    _Rule("rename", ("mlp1.0.{p}",), ("model.multi_modal_projector.layer_norm.{p}",)),
    _Rule("rename", ("mlp1.1.{p}",), ("model.multi_modal_projector.linear_1.{p}",)),
    _Rule("rename", ("mlp1.3.{p}",), ("model.multi_modal_projector.linear_2.{p}",)),
)

_L, _LH = "language_model.model.", "model.language_model."
_LL, _LLH = _L + "layers.{i}.", _LH + "layers.{i}."
_INTERNLM2_RULES = (
    _Rule("rename", (_L + "tok_embeddings.weight",), (_LH + "embed_tokens.weight",)),
    _Rule("grouped_qkv", (_LL + "attention.wqkv.{p}",), tuple(_LLH + f"self_attn.{x}_proj.{{p}}" for x in "qkv")),
    _Rule("rename", (_LL + "attention.wo.{p}",), (_LLH + "self_attn.o_proj.{p}",)),
    _Rule("rename", (_LL + "feed_forward.w1.{p}",), (_LLH + "mlp.gate_proj.{p}",)),
    _Rule("rename", (_LL + "feed_forward.w3.{p}",), (_LLH + "mlp.up_proj.{p}",)),
    _Rule("rename", (_LL + "feed_forward.w2.{p}",), (_LLH + "mlp.down_proj.{p}",)),
    _Rule("rename", (_LL + "attention_norm.{p}",), (_LLH + "input_layernorm.{p}",)),
    _Rule("rename", (_LL + "ffn_norm.{p}",), (_LLH + "post_attention_layernorm.{p}",)),
    _Rule("rename", (_L + "norm.{p}",), (_LH + "norm.{p}",)),
    _Rule("rename", ("language_model.output.weight",), ("lm_head.weight",)),
)
_MOE_RULES = (
    _Rule("experts_gate_up", (_LL + "mlp.experts.{e}.gate_proj.weight", _LL + "mlp.experts.{e}.up_proj.weight"),
          (_LLH + "mlp.experts.gate_up_proj",)),
    _Rule("experts_down", (_LL + "mlp.experts.{e}.down_proj.weight",), (_LLH + "mlp.experts.down_proj",)),
)
_PLAIN_LLM_RULES = (
    _Rule("rename", (_L + "{rest}",), (_LH + "{rest}",)),
    _Rule("rename", ("language_model.lm_head.weight",), ("lm_head.weight",)),
)

# Non-persistent buffers that old checkpoints sometimes hold; dropped on load.
_DROPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _rules(layout: _Layout) -> tuple[_Rule, ...]:
    if layout.internlm2:
        return _VISION_RULES + _INTERNLM2_RULES
    return _VISION_RULES + (_MOE_RULES if layout.moe else ()) + _PLAIN_LLM_RULES


def _make_group(rule: _Rule, fields: dict[str, str], layout: _Layout) -> _Group:
    fields = {k: v for k, v in fields.items() if k != "e"}
    original: list[str] = []
    for pattern in rule.original:
        if "{e}" in pattern:
            if layout.num_experts <= 0:
                raise CheckpointError("llm_config.num_experts is missing; cannot map the MoE expert weights")
            original += [pattern.format(e=e, **fields) for e in range(layout.num_experts)]
        else:
            original.append(pattern.format(**fields))
    return _Group(rule.kind, tuple(original), tuple(p.format(**fields) for p in rule.hf))


def _group_of_original(name: str, layout: _Layout) -> _Group | None:
    for rule in _rules(layout):
        for pattern in rule.original:
            m = _compile(pattern).match(name)
            if m:
                return _make_group(rule, m.groupdict(), layout)
    return None


def _group_of_hf(name: str, layout: _Layout) -> _Group | None:
    for rule in _rules(layout):
        for pattern in rule.hf:
            m = _compile(pattern).match(name)
            if m:
                return _make_group(rule, m.groupdict(), layout)
    return None


def original_key_to_hf(name: str, cfg: dict) -> list[str]:
    """Native parameter name(s) of one original checkpoint key (`[]` for dropped buffers).

    Split tensors give several names; merged MoE experts give the one fused name.
    """
    if _DROPPED.search(name):
        return []
    group = _group_of_original(name, _layout(cfg))
    if group is None:
        raise CheckpointError(f"no mapping for original checkpoint key {name!r}")
    return list(group.hf)


def hf_key_to_original(name: str, cfg: dict) -> list[str]:
    """Original checkpoint key(s) of one native parameter name (fused tensors give one name)."""
    group = _group_of_hf(name, _layout(cfg))
    if group is None:
        raise CheckpointError(f"no mapping for native parameter {name!r}")
    return list(group.original)


def _groups(names: Iterable[str], layout: _Layout, side: str) -> tuple[dict[str, _Group], list[str]]:
    """Group of every name (`side` 'original' or 'hf'), and the names no rule matches."""
    find = _group_of_original if side == "original" else _group_of_hf
    groups: dict[str, _Group] = {}
    unknown: list[str] = []
    for name in names:
        if side == "original" and _DROPPED.search(name):
            continue
        group = find(name, layout)
        if group is None:
            unknown.append(name)
        else:
            groups[name] = group
    return groups, unknown


# ----- tensor operations of the groups (each pair is an exact inverse) -----


def _split_rows(t: torch.Tensor, parts: int, what: str) -> list[torch.Tensor]:
    if t.shape[0] % parts:
        raise ValueError(f"{what}: {t.shape[0]} rows do not split into {parts} equal parts")
    return [x.clone() for x in t.chunk(parts, dim=0)]


def split_grouped_qkv(t: torch.Tensor, num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, ...]:
    """InternLM2 `wqkv` rows -> (q, k, v). Rows are `(kv_heads, groups + 2, head_dim)`: per KV group the
    group's query heads, then its key head, then its value head. Works for weights, biases and LoRA B."""
    groups = num_heads // num_kv_heads
    rows, rest = t.shape[0], t.shape[1:]
    slots = num_kv_heads * (groups + 2)
    if num_heads % num_kv_heads or rows % slots:
        raise ValueError(f"{rows} rows do not fit {num_heads} query heads / {num_kv_heads} KV heads")
    head_dim = rows // slots
    x = t.reshape(num_kv_heads, groups + 2, head_dim, *rest)
    q = x[:, :groups].reshape(num_heads * head_dim, *rest).clone()
    k = x[:, groups].reshape(num_kv_heads * head_dim, *rest).clone()
    v = x[:, groups + 1].reshape(num_kv_heads * head_dim, *rest).clone()
    return q, k, v


def fuse_grouped_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                     num_kv_heads: int) -> torch.Tensor:
    """The exact inverse of `split_grouped_qkv`."""
    groups = num_heads // num_kv_heads
    if num_heads % num_kv_heads or q.shape[0] % num_heads:
        raise ValueError(f"{q.shape[0]} query rows do not fit {num_heads} heads / {num_kv_heads} KV heads")
    head_dim = q.shape[0] // num_heads
    rest = q.shape[1:]
    if k.shape != v.shape or k.shape[0] != num_kv_heads * head_dim or k.shape[1:] != rest:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together")
    x = torch.cat([
        q.reshape(num_kv_heads, groups, head_dim, *rest),
        k.reshape(num_kv_heads, 1, head_dim, *rest),
        v.reshape(num_kv_heads, 1, head_dim, *rest),
    ], dim=1)
    return x.reshape(-1, *rest)


def _fuse_rows(group: _Group, parts: list[torch.Tensor], layout: _Layout) -> torch.Tensor:
    """Fuse q/k/v-like row blocks of a qkv group (also used on LoRA B matrices)."""
    if group.kind == "grouped_qkv":
        return fuse_grouped_qkv(*parts, layout.num_heads, layout.num_kv_heads)
    return torch.cat(parts, dim=0)


def _split_rows_of(group: _Group, t: torch.Tensor, layout: _Layout) -> list[torch.Tensor]:
    if group.kind == "grouped_qkv":
        return list(split_grouped_qkv(t, layout.num_heads, layout.num_kv_heads))
    return _split_rows(t, 3, group.original[0])


def _group_to_hf(group: _Group, tensors: Mapping[str, torch.Tensor], layout: _Layout) -> dict[str, torch.Tensor]:
    src = [tensors[n] for n in group.original]
    if group.kind == "rename":
        return {group.hf[0]: src[0]}
    if group.kind in ("vision_qkv", "grouped_qkv"):
        return dict(zip(group.hf, _split_rows_of(group, src[0], layout)))
    if group.kind == "experts_gate_up":
        n = layout.num_experts
        return {group.hf[0]: torch.cat([torch.stack(src[:n]), torch.stack(src[n:])], dim=1)}
    if group.kind == "experts_down":
        return {group.hf[0]: torch.stack(src)}
    raise AssertionError(group.kind)


def _group_to_original(group: _Group, tensors: Mapping[str, torch.Tensor], layout: _Layout) -> dict[str, torch.Tensor]:
    src = [tensors[n] for n in group.hf]
    if group.kind == "rename":
        return {group.original[0]: src[0]}
    if group.kind in ("vision_qkv", "grouped_qkv"):
        return {group.original[0]: _fuse_rows(group, src, layout)}
    if group.kind == "experts_gate_up":
        fused = src[0]
        half = fused.shape[1] // 2
        gates = [x.clone() for x in fused[:, :half].unbind(0)]
        ups = [x.clone() for x in fused[:, half:].unbind(0)]
        return dict(zip(group.original, gates + ups))
    if group.kind == "experts_down":
        return dict(zip(group.original, [x.clone() for x in src[0].unbind(0)]))
    raise AssertionError(group.kind)


def _convert(state: Mapping[str, torch.Tensor], layout: _Layout, side: str) -> dict[str, torch.Tensor]:
    groups, unknown = _groups(state, layout, side)
    if unknown:
        raise CheckpointError(f"{len(unknown)} key(s) have no mapping: {_listing(unknown)}")
    out: dict[str, torch.Tensor] = {}
    done: set[_Group] = set()
    for group in groups.values():
        if group in done:
            continue
        done.add(group)
        names = group.original if side == "original" else group.hf
        missing = [n for n in names if n not in state]
        if missing:
            raise CheckpointError(f"incomplete tensor group: {_listing(missing)} missing")
        convert = _group_to_hf if side == "original" else _group_to_original
        out.update(convert(group, state, layout))
    return out


def original_to_hf_state_dict(state: Mapping[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """Original checkpoint tensors -> native `InternVLForConditionalGeneration` tensors."""
    return _convert(state, _layout(cfg), "original")


def hf_to_original_state_dict(state: Mapping[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """Native tensors -> original checkpoint tensors. `cfg` is the *original* config (it says whether a
    native Llama is an InternLM2)."""
    return _convert(state, _layout(cfg), "hf")


def _listing(names: Iterable[str], limit: int = 12) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# --------------------------------------------------------------------------------------------------
# Safetensors files
# --------------------------------------------------------------------------------------------------

_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
}
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _dtype(value: Any) -> torch.dtype | None:
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
        data = _read_json(index)
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
def _open_safetensors(file: Path) -> Iterator[Any]:
    from safetensors import safe_open

    read_safetensors_header(file)  # a clear message for truncated files before safe_open's
    try:
        handle = safe_open(str(file), framework="pt")
    except Exception as e:  # safetensors raises its own error type
        raise CheckpointError(f"{file}: not a valid safetensors file ({e})") from None
    yield handle


def _get_tensor(handle, file: Path, name: str) -> torch.Tensor:
    try:
        return handle.get_tensor(name)
    except Exception as e:  # SafetensorError, or a missing name
        if name not in set(handle.keys()):
            raise CheckpointError(f"{file}: tensor {name!r} (listed in the index) is not in this file") from None
        raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e}); is the file corrupt?") from None


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def read_original_config(path: PathLike) -> dict:
    """The parsed `config.json` of an original checkpoint folder, checked (`check_original_config`)."""
    cfg_path = Path(path) / "config.json"
    cfg = _read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: not a JSON object")
    check_original_config(cfg, cfg_path)
    return cfg


def _is_lora_name(name: str) -> bool:
    return any(part in name for part in (".lora_A.", ".lora_B.", ".base_layer.", ".base_model.model."))


def _refuse_lora_keys(names: Iterable[str], folder: Path) -> None:
    lora = [n for n in names if _is_lora_name(n)]
    if lora:
        raise CheckpointError(
            f"{folder}: the weights hold PEFT LoRA tensors ({_listing(lora, 3)}): this is an unmerged LoRA "
            "checkpoint. Merge it first (e.g. the official InternVL `tools/merge_lora.py`), then load the merged folder"
        )


def _empty_model(hf_config):
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
    layout = _layout(cfg, folder)
    files = weight_files(folder)
    names = [n for file_names in files.values() for n in file_names]
    _refuse_lora_keys(names, folder)
    dtype = _dtype(dtype) or torch.float32

    hf_config = original_config_to_hf(cfg, folder, tokenizer=tokenizer, image_token_id=image_token_id)
    if hf_config.tie_word_embeddings and _head_key(layout) in names:
        hf_config.tie_word_embeddings = False
        hf_config.text_config.tie_word_embeddings = False
    if attn_implementation:
        hf_config._attn_implementation = attn_implementation
    model = _empty_model(hf_config)
    params = dict(model.named_parameters())

    groups, unknown = _groups(names, layout, "original")
    unexpected = unknown + sorted({n for n, g in groups.items() if any(h not in params for h in g.hf)})
    if unexpected:
        raise CheckpointError(
            f"{folder}: {len(unexpected)} tensor(s) in the checkpoint do not fit the model config.json describes: "
            f"{_listing(unexpected)}"
        )

    present = set(names)
    incomplete = sorted({o for g in set(groups.values()) for o in g.original if o not in present})
    if incomplete:
        raise CheckpointError(f"{folder}: incomplete tensor groups; the checkpoint lacks {_listing(incomplete)}")

    pending: dict[str, torch.Tensor] = {}  # parts of groups spread over several shards (MoE experts)
    for file, file_names in files.items():
        with _open_safetensors(file) as handle:
            for name in file_names:
                if name not in groups:  # a dropped buffer
                    continue
                pending[name] = _get_tensor(handle, file, name)
                group = groups[name]
                if not all(o in pending for o in group.original):
                    continue
                try:
                    converted = _group_to_hf(group, pending, layout)
                except (RuntimeError, ValueError) as e:
                    shapes = {o: tuple(pending[o].shape) for o in group.original[:3]}
                    raise CheckpointError(
                        f"{file}: cannot map {_listing(group.original, 3)} ({e}); shapes {shapes}"
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
        expected = sorted({o for n in missing for o in (_group_of_hf(n, layout) or _Group("", (n,), ())).original})
        raise CheckpointError(
            f"{folder}: {len(missing)} weight(s) the model needs are not in the checkpoint: {_listing(expected)}"
        )
    if (folder / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(folder)
        except (OSError, ValueError) as e:
            logger.warning("%s: generation_config.json ignored (%s)", folder, e)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def _sentencepiece_fast_tokenizer(folder: Path, tok_cfg: dict):
    """A fast tokenizer equal to an InternLM2 sentencepiece tokenizer (plus its added tokens).

    The InternLM2 tokenizer splits the text on its added tokens and encodes each piece with the
    sentencepiece BPE model (byte fallback, no dummy prefix), then puts BOS in front. The same is built here
    with `tokenizers`: a BPE model with the sentencepiece vocabulary and merges, spaces as '▁', added tokens
    at their ids, and a post-processor that adds BOS.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges, import_protobuf

    model_file = folder / "tokenizer.model"
    try:
        proto = import_protobuf().ModelProto()
        proto.ParseFromString(model_file.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{model_file}: file not found (the InternLM2 tokenizer needs it)") from None
    except Exception as e:  # protobuf DecodeError
        raise CheckpointError(f"{model_file}: not a sentencepiece model ({e})") from None
    if proto.trainer_spec.model_type != 2:
        raise CheckpointError(f"{model_file}: a sentencepiece BPE model was expected (model_type 2)")

    added: dict[int, dict] = {}
    for idx, tok in (tok_cfg.get("added_tokens_decoder") or {}).items():
        added[int(idx)] = tok if isinstance(tok, dict) else {"content": str(tok)}
    added_json = folder / "added_tokens.json"
    if added_json.is_file():
        for content, idx in _read_json(added_json).items():
            added.setdefault(int(idx), {"content": content, "special": True})

    pieces = [p.piece for p in proto.pieces]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = generate_merges(vocab, [(p.piece, p.score) for p in proto.pieces])
    for idx, tok in added.items():  # added tokens take over the (unused) pieces at their ids
        if idx < len(pieces) and pieces[idx] != tok["content"]:
            vocab.pop(pieces[idx], None)
            vocab[tok["content"]] = idx
    unk = proto.trainer_spec.unk_piece or "<unk>"
    tok = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    norm = [normalizers.Replace(" ", "▁")]
    if proto.normalizer_spec.add_dummy_prefix:
        norm.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(norm)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    # sentencepiece keeps user-defined pieces whole; make them atomic here as well
    user_defined = [AddedToken(p.piece, special=False, normalized=False)
                    for i, p in enumerate(proto.pieces) if p.type == 4 and i not in added]
    tok.add_tokens(user_defined)
    tok.add_special_tokens([
        AddedToken(t["content"], special=bool(t.get("special", True)), normalized=bool(t.get("normalized", False)),
                   lstrip=bool(t.get("lstrip", False)), rstrip=bool(t.get("rstrip", False)),
                   single_word=bool(t.get("single_word", False)))
        for _, t in sorted(added.items())
    ])
    for idx, t in added.items():
        if tok.token_to_id(t["content"]) != idx:
            raise CheckpointError(f"{folder}: added token {t['content']!r} would not get its id {idx}")

    def _name(value: Any, default: str | None) -> str | None:
        if isinstance(value, dict):
            return value.get("content", default)
        return value if value is not None else default

    bos = _name(tok_cfg.get("bos_token"), proto.trainer_spec.bos_piece or "<s>")
    eos = _name(tok_cfg.get("eos_token"), proto.trainer_spec.eos_piece or "</s>")
    add_bos = bool(tok_cfg.get("add_bos_token", True))
    add_eos = bool(tok_cfg.get("add_eos_token", False))
    single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
    pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
    specials = [(t, tok.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    extra = [t for t in tok_cfg.get("additional_special_tokens") or [] if isinstance(t, str)]
    kwargs: dict[str, Any] = {
        "tokenizer_object": tok,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": _name(tok_cfg.get("unk_token"), unk),
        "pad_token": _name(tok_cfg.get("pad_token"), None),
        "model_max_length": tok_cfg.get("model_max_length", 4096),
        "clean_up_tokenization_spaces": bool(tok_cfg.get("clean_up_tokenization_spaces", False)),
    }
    if extra:
        kwargs["additional_special_tokens"] = extra
    if tok_cfg.get("chat_template"):
        kwargs["chat_template"] = tok_cfg["chat_template"]
    fast = PreTrainedTokenizerFast(**kwargs)
    return fast


# Tokenizer classes that are sentencepiece + added tokens and that we rebuild without remote code.
_SENTENCEPIECE_CLASSES = {"InternLM2Tokenizer", "InternLM2TokenizerFast"}


def load_original_tokenizer(path: PathLike) -> PreTrainedTokenizerBase:
    """The tokenizer of an original checkpoint folder, never running its code.

    InternLM2 folders (`tokenizer.model` + `tokenizer_class: InternLM2Tokenizer`) get an equivalent fast
    tokenizer built from the sentencepiece model; folders whose tokenizer class transformers knows (Qwen2,
    Llama, ...) load with `trust_remote_code=False`.
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    cfg_path = folder / "tokenizer_config.json"
    tok_cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    cls = str(tok_cfg.get("tokenizer_class") or "")
    if cls in _SENTENCEPIECE_CLASSES:
        return _sentencepiece_fast_tokenizer(folder, tok_cfg)
    if cls.startswith("InternLM"):
        raise CheckpointError(
            f"{cfg_path}: tokenizer class {cls!r} exists only as remote code, and its behaviour is not "
            "reproduced here (InternLM2Tokenizer is)"
        )
    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        raise CheckpointError(
            f"{folder}: no tokenizer files (tokenizer.json, vocab.json + merges.txt, tokenizer.model)"
        )
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: cannot load the tokenizer without remote code ({e})") from None


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


@contextmanager
def _atomic_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder next to `out`, renamed to `out` when the block succeeds."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out}: folder exists and is not empty; choose another output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _head_key(layout: _Layout) -> str:
    return "language_model.output.weight" if layout.internlm2 else "language_model.lm_head.weight"


def _file_plan(state: Mapping[str, torch.Tensor], layout: _Layout, tied: bool, dtype: torch.dtype | None,
               max_shard_bytes: int) -> dict[str, str]:
    """`{original key: file}` in transformers' naming: one `model.safetensors` if it fits in
    `max_shard_bytes`, else `model-0000i-of-0000n.safetensors`. A tied output head is not written."""
    groups, unknown = _groups(state, layout, "hf")
    if unknown:
        raise CheckpointError(f"the model has weights the original format has no name for: {_listing(unknown)}")
    sizes: dict[str, int] = {}
    for group in set(groups.values()):
        element = torch.empty((), dtype=dtype or state[group.hf[0]].dtype).element_size()
        numel = sum(state[h].numel() for h in group.hf)
        for o in group.original:
            sizes[o] = numel // len(group.original) * element
    if tied:
        sizes.pop(_head_key(layout), None)
    shards: list[list[str]] = [[]]
    current = 0
    for name in sorted(sizes):
        if shards[-1] and current + sizes[name] > max_shard_bytes:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += sizes[name]
    if len(shards) == 1:
        return {n: WEIGHTS_NAME for n in shards[0]}
    total = len(shards)
    return {n: f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i, shard in enumerate(shards) for n in shard}


def _write_original_weights(state: Mapping[str, torch.Tensor], layout: _Layout, out: Path,
                            file_of: dict[str, str], dtype: torch.dtype | None) -> None:
    """Write native `state` as original tensors, `file_of` giving each original key's file (one file in
    memory at a time), plus `model.safetensors.index.json` when there are several files."""
    from safetensors.torch import save_file

    groups, _ = _groups(state, layout, "hf")
    by_original = {o: g for g in set(groups.values()) for o in g.original}
    files: dict[str, list[str]] = {}
    for name, file in file_of.items():
        files.setdefault(file, []).append(name)
    total = 0
    for file, names in sorted(files.items()):
        tensors: dict[str, torch.Tensor] = {}
        converted: dict[_Group, dict[str, torch.Tensor]] = {}
        seen: set[int] = set()
        for name in sorted(names):
            group = by_original[name]
            if group not in converted:
                converted[group] = _group_to_original(group, state, layout)
            t = converted[group][name].detach()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            t = t.contiguous()
            if t.data_ptr() in seen:  # e.g. a tied head stored twice by the source
                t = t.clone()
            seen.add(t.data_ptr())
            tensors[name] = t
            total += t.numel() * t.element_size()
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        del tensors, converted
    if len(files) > 1 or file_of and next(iter(file_of.values())) != WEIGHTS_NAME:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(file_of.items()))}
        (out / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _plain_state_dict(model) -> dict[str, torch.Tensor]:
    from transformers import InternVLForConditionalGeneration

    if not isinstance(model, InternVLForConditionalGeneration):
        raise CheckpointError(
            f"save_original needs an InternVLForConditionalGeneration, got {type(model).__name__}; "
            "merge LoRA adapters first (PeftModel.merge_and_unload())"
        )
    state = model.state_dict()
    lora = [k for k in state if "lora_" in k or ".base_layer." in k]
    if lora:
        raise CheckpointError(f"the model still holds LoRA layers ({_listing(lora, 3)}); merge them first")
    meta = [k for k, v in state.items() if v.device.type == "meta"]
    if meta:
        raise CheckpointError(f"the model has weights on the meta device ({_listing(meta, 3)}); load it fully first")
    return state


def _copy_side_files(source: Path, out: Path, skip: Iterable[str] = ()) -> list[str]:
    """Copy `*.py`, tokenizer, generation and preprocessor files (top level only)."""
    copied = []
    skip = set(skip)
    for p in sorted(source.iterdir()):
        if p.is_file() and p.name not in skip and (p.suffix == ".py" or p.name in TOKENIZER_FILES + SIDE_FILES):
            shutil.copy2(p, out / p.name)
            copied.append(p.name)
    return copied


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def save_original(model, source_path: PathLike, out_path: PathLike, *, dtype: torch.dtype | str | None = None,
                  overwrite: bool = False, max_shard_size: int = 5 * 1024**3) -> Path:
    """Write a merged `InternVLForConditionalGeneration` in the original format of `source_path`.

    The output has the source's config.json (with `use_llm_lora` / `use_backbone_lora` set to 0), its `*.py`,
    tokenizer, generation and preprocessor files, and the weights under original names in the source's
    shard files (same file names, same key placement, a `model.safetensors.index.json` if the source had
    one). A source without weights (config + code only) gets one file, or shards of `max_shard_size` bytes.
    The dtype is the source's `torch_dtype` unless `dtype` is given. Everything is written to a temporary
    folder next to `out_path`, which is renamed at the end.
    """
    source = Path(source_path)
    cfg = read_original_config_unchecked(source)
    layout = _layout(cfg, source)
    state = _plain_state_dict(model)
    target_dtype = _dtype(dtype) if dtype is not None else _dtype(cfg.get("torch_dtype"))

    # The model must be the one the source config describes: same parameter names and shapes.
    new_cfg = {**cfg, "use_llm_lora": 0, "use_backbone_lora": 0}
    expected_cfg = original_config_to_hf(new_cfg, source, image_token_id=getattr(model.config, "image_token_id", None))
    expected = _empty_model(expected_cfg).state_dict()
    wrong = sorted(set(state) ^ set(expected)) + [
        f"{k} {tuple(v.shape)} (config: {tuple(expected[k].shape)})"
        for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise CheckpointError(f"{source / 'config.json'}: the model does not match this config: {_listing(wrong, 6)}")

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    plan = _file_plan(state, layout, tied, target_dtype, max_shard_size)
    source_keys = _source_key_names(source)
    if source_keys is not None and any(_is_lora_name(n) for n in source_keys):
        source_keys = None  # an unmerged LoRA checkpoint: its names are not the merged model's
    if source_keys is not None:
        file_of = source_keys
        produced = set(plan) | {_head_key(layout)}  # the head may be stored even when tied
        if _head_key(layout) not in file_of:
            produced.discard(_head_key(layout))
        missing, extra = sorted(set(file_of) - produced), sorted(produced - set(file_of))
        if missing or extra:
            raise CheckpointError(
                f"{source}: the model's weights do not match the source checkpoint's names "
                f"(missing: {_listing(missing, 5) or 'none'}; not in the source: {_listing(extra, 5) or 'none'})"
            )
    else:
        file_of = plan

    with _atomic_folder(Path(out_path), overwrite) as tmp:
        _write_original_weights(state, layout, tmp, file_of, target_dtype)
        _write_json(tmp / "config.json", new_cfg)
        _copy_side_files(source, tmp, skip=("config.json",))
    return Path(out_path)


def _source_key_names(source: Path) -> dict[str, str] | None:
    """`{original key: file name}` of a source checkpoint; None if it holds no weights."""
    index = source / WEIGHTS_INDEX_NAME
    if index.is_file():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no `weight_map`")
        return dict(weight_map)
    single = source / WEIGHTS_NAME
    if single.is_file():
        return {n: WEIGHTS_NAME for n in read_safetensors_header(single)}
    return None


def read_original_config_unchecked(path: PathLike) -> dict:
    """The config.json of an original folder, checked for what writing needs (the LoRA flags may be set)."""
    cfg_path = Path(path) / "config.json"
    cfg = _read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: not a JSON object")
    check_original_config({**cfg, "use_llm_lora": 0, "use_backbone_lora": 0}, cfg_path)
    return cfg


# --------------------------------------------------------------------------------------------------
# Whole-checkpoint conversion
# --------------------------------------------------------------------------------------------------


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


def convert_checkpoint(src: PathLike, dst: PathLike, to: str, *, reference_original: PathLike | None = None,
                       dtype: torch.dtype | str | None = None, overwrite: bool = False) -> Path:
    """Convert a checkpoint folder between the original and the -hf layout.

    * `to="hf"`: `src` is original. Writes config.json, model.safetensors (transformers' own sharding),
      the tokenizer as tokenizer.json (built without remote code), generation_config.json and a
      preprocessor_config.json from the original tiling settings. dtype: the source's `torch_dtype`.
    * `to="original"`: `src` is -hf. With `reference_original` (an original checkpoint of the same model:
      config + `*.py`, weights optional) the output copies its config, code and tokenizer files and its shard
      layout (`save_original`). Without it, an original config is built from the -hf config
      (`hf_config_to_original`, not possible for InternLM2 models), the tokenizer files of `src` are copied,
      and there are no `*.py` files: copy them from a matching original release to use `trust_remote_code`.
    """
    from transformers import InternVLForConditionalGeneration

    src, dst = Path(src), Path(dst)
    if to not in ("hf", "original"):
        raise CheckpointError(f"--to {to!r}: choose 'hf' or 'original'")
    cfg = _read_json(src / "config.json")
    kind = cfg.get("model_type") if isinstance(cfg, dict) else None
    if to == "hf":
        if kind != "internvl_chat":
            raise CheckpointError(
                f"{src / 'config.json'}: model_type {kind!r} is not an original checkpoint ('internvl_chat')"
            )
        target = _dtype(dtype) or _dtype(cfg.get("torch_dtype")) or torch.float32
        tokenizer = load_original_tokenizer(src)
        model = load_original_model(src, dtype=target, tokenizer=tokenizer)
        if cfg.get("template"):
            model.config.template = cfg["template"]  # -hf configs have no template; keep the original's
        with _atomic_folder(dst, overwrite) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(cfg), indent=2) + "\n")
        return dst

    if kind != "internvl":
        raise CheckpointError(f"{src / 'config.json'}: model_type {kind!r} is not an -hf checkpoint ('internvl')")
    model = InternVLForConditionalGeneration.from_pretrained(src, dtype=_dtype(dtype) or "auto")
    if reference_original is not None:
        return save_original(model, reference_original, dst, dtype=dtype, overwrite=overwrite)
    proc = src / "preprocessor_config.json"
    proc_cfg = _read_json(proc) if proc.is_file() else {}
    torch_dtype = str(_dtype(dtype) or model.dtype).replace("torch.", "")
    original_cfg = hf_config_to_original(
        model.config, torch_dtype=torch_dtype,
        max_dynamic_patch=int(proc_cfg.get("max_patches", 12)),
        min_dynamic_patch=int(proc_cfg.get("min_patches", 1)),
        dynamic_image_size=bool(proc_cfg.get("crop_to_patches", True)),
    )
    layout = _layout(original_cfg)
    state = _plain_state_dict(model)
    target = _dtype(dtype)
    file_of = _file_plan(state, layout, bool(model.config.tie_word_embeddings), target, 5 * 1024**3)
    with _atomic_folder(dst, overwrite) as tmp:
        _write_original_weights(state, layout, tmp, file_of, target)
        _write_json(tmp / "config.json", original_cfg)
        _copy_side_files(src, tmp, skip=("config.json", "preprocessor_config.json"))
    return dst


# --------------------------------------------------------------------------------------------------
# PEFT adapters
# --------------------------------------------------------------------------------------------------

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?:(?P<part>lora_A|lora_B)\.weight|(?P<emb>lora_embedding_A|lora_embedding_B))$"
)


def _lora_key(module: str, part: str) -> str:
    """The saved key of a LoRA tensor: Linear LoRAs end in `.weight`, embedding LoRAs do not."""
    return f"{_PEFT_PREFIX}{module}.{part}" + ("" if part.startswith("lora_embedding") else ".weight")


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: a key matches a module name if it matches its dotted tail."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _number(x: float) -> float | int:
    return int(round(x)) if abs(x - round(x)) < 1e-9 else x


def _fuse_qkv_lora(group: _Group, modules: list[str], lora: Mapping[str, Mapping[str, torch.Tensor]],
                   layout: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA (A, B) on a fused qkv module equal to LoRAs on its q/k/v parts (some may be absent).

    delta = fuse(B_q A_q, B_k A_k, B_v A_v). With one shared A this is fuse(B_q, B_k, B_v) @ A, same rank;
    otherwise A stacks the A's and B places each part's B in its own column block (rank r_q + r_k + r_v).
    """
    present = [m for m in modules if m in lora]
    a_list = [lora[m]["lora_A"] for m in present]
    if len(present) == 3 and all(torch.equal(a_list[0], a) for a in a_list[1:]):
        return a_list[0].clone(), _fuse_rows(group, [lora[m]["lora_B"] for m in modules], layout)
    rows = {m: lora[m]["lora_B"].shape[0] for m in present}
    if len(rows) < 3:  # the width of an absent projection, from a present one and the head layout
        first = present[0]
        if group.kind == "vision_qkv":
            width = rows[first]
            rows = {m: width for m in modules}
        else:
            head_dim = rows[first] // (layout.num_heads if first == modules[0] else layout.num_kv_heads)
            rows = dict(zip(modules, (layout.num_heads * head_dim, layout.num_kv_heads * head_dim,
                                      layout.num_kv_heads * head_dim)))
    a_fused = torch.cat(a_list, dim=0)
    blocks, offset = [], 0
    for m in modules:
        block = a_fused.new_zeros(rows[m], a_fused.shape[0])
        if m in lora:
            rank = lora[m]["lora_A"].shape[0]
            block[:, offset:offset + rank] = lora[m]["lora_B"]
            offset += rank
        blocks.append(block)
    return a_fused, _fuse_rows(group, blocks, layout)


def _adapter_layout_config(cfg: dict | PathLike | None) -> dict:
    """The original config describing an adapter's layout, from a dict, a config.json or a checkpoint
    folder. An -hf config is turned into an original one (its `llama` read as Llama, not InternLM2)."""
    if cfg is None:
        raise CheckpointError("converting an adapter needs the model's config: give the base checkpoint "
                              "(an original checkpoint for InternLM2-based models)")
    if not isinstance(cfg, dict):
        p = Path(cfg)
        cfg = _read_json(p if p.suffix == ".json" else p / "config.json")
    if cfg.get("model_type") == "internvl":
        from transformers import InternVLConfig

        return hf_config_to_original(InternVLConfig.from_dict(cfg))
    return cfg


def convert_adapter(src_dir: PathLike, dst_dir: PathLike, to: str, cfg: dict | PathLike,
                    *, overwrite: bool = False) -> Path:
    """Remap a PEFT LoRA adapter between the native and the original layout.

    `cfg` is the original config (a dict, a config.json path or a checkpoint folder; an -hf config works
    for every family but InternLM2, whose layout only an original config tells). Keys are
    `base_model.model.<module>.lora_A.weight` with `<module>` a full module path of the whole model
    (`model.language_model.layers.0.self_attn.q_proj` natively, `language_model.model.layers.0...` in the
    original). `target_modules` becomes the list of converted module paths.

    Renamed modules keep their LoRA as it is. A LoRA on a fused original module (InternLM2 `wqkv`, InternViT
    `attn.qkv`) splits exactly into q/k/v LoRAs of the same rank (same A, B split by rows). The other way,
    separate q/k/v LoRAs become one exact LoRA on the fused module: of the same rank when their A matrices are
    equal (a split adapter), otherwise of rank r_q + r_k + r_v (A stacked, B block-placed), recorded in
    `rank_pattern` / `alpha_pattern` so that the scaling stays the same. DoRA, LoRA biases, trainable
    tokens and MoE expert targets are refused: merge the adapter into the model and convert the checkpoint.
    """
    from safetensors.torch import save_file

    if to not in ("hf", "original"):
        raise CheckpointError(f"to={to!r}: choose 'hf' or 'original'")
    src, dst = Path(src_dir), Path(dst_dir)
    layout = _layout(_adapter_layout_config(cfg))
    adapter_cfg_path, weights_path = src / ADAPTER_CONFIG, src / ADAPTER_WEIGHTS
    acfg = _read_json(adapter_cfg_path)
    if not weights_path.is_file():
        bins = sorted(p.name for p in src.glob("adapter_model*.bin"))
        if bins:
            raise CheckpointError(
                f"{src / bins[0]}: pickle adapter weights are refused; save the adapter as safetensors"
            )
        raise CheckpointError(f"{weights_path}: file not found")
    refuse = {
        "peft_type": acfg.get("peft_type", "LORA") != "LORA",
        "use_dora": bool(acfg.get("use_dora")),
        "lora_bias": bool(acfg.get("lora_bias")),
        "trainable_token_indices": bool(acfg.get("trainable_token_indices")),
        "target_parameters": bool(acfg.get("target_parameters")),
        "layer_replication": bool(acfg.get("layer_replication")),
    }
    bad = [k for k, v in refuse.items() if v]
    if bad:
        raise CheckpointError(
            f"{adapter_cfg_path}: {', '.join(f'{k}={acfg.get(k)!r}' for k in bad)} cannot be remapped; merge the "
            "adapter into the model (`merge`) and convert the merged checkpoint instead"
        )
    with _open_safetensors(weights_path) as handle:
        tensors = {k: _get_tensor(handle, weights_path, k) for k in handle.keys()}

    from_side = "hf" if to == "original" else "original"
    find = _group_of_hf if from_side == "hf" else _group_of_original
    r0, alpha0 = int(acfg.get("r", 8)), acfg.get("lora_alpha", 8)
    rslora = bool(acfg.get("use_rslora"))
    alpha_pattern = acfg.get("alpha_pattern") or {}  # ranks are read from the tensors

    def scale(r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if rslora else alpha / r

    # LoRA modules by source module path: {module: {part: tensor}}; full tensors (modules_to_save) apart.
    lora: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(_PEFT_PREFIX):
            raise CheckpointError(f"{weights_path}: key {key!r} does not start with {_PEFT_PREFIX!r}")
        inner = key[len(_PEFT_PREFIX):]
        m = _LORA_KEY.match(inner)
        if m:
            lora.setdefault(m["module"], {})[m["part"] or m["emb"]] = t
        elif ".lora_" in inner:
            raise CheckpointError(f"{weights_path}: {key!r} is not a plain LoRA tensor; merge and convert instead")
        else:
            full[inner] = t

    out: dict[str, torch.Tensor] = {}
    out_modules: set[str] = set()
    out_rank: dict[str, int] = {}
    out_alpha: dict[str, float] = {}

    def group_of_module(module: str) -> _Group:
        group = find(module + ".weight", layout)
        if group is not None:
            return group
        raise CheckpointError(f"{weights_path}: no {to} name for LoRA module {module!r}; is the adapter in the "
                              f"{'native' if from_side == 'hf' else 'original'} layout?")

    handled: set[str] = set()
    for module in sorted(lora):
        if module in handled:
            continue
        parts = lora[module]
        group = group_of_module(module)
        if group.kind.startswith("experts"):
            raise CheckpointError(
                f"{weights_path}: LoRA on MoE experts ({module}) cannot be remapped; merge and convert"
            )
        src_names = group.hf if from_side == "hf" else group.original
        dst_names = group.original if from_side == "hf" else group.hf
        src_modules = [n.rsplit(".", 1)[0] for n in src_names]
        dst_modules = [n.rsplit(".", 1)[0] for n in dst_names]
        handled.update(src_modules)
        if "lora_A" not in parts and "lora_embedding_A" not in parts:
            raise CheckpointError(f"{weights_path}: {module} has no lora_A")
        if group.kind == "rename":
            for part, t in parts.items():
                out[_lora_key(dst_modules[0], part)] = t
            r = int((parts.get("lora_A", parts.get("lora_embedding_A"))).shape[0])
            alpha = _pattern_value(alpha_pattern, module, alpha0)
            out_modules.add(dst_modules[0])
            out_rank[dst_modules[0]], out_alpha[dst_modules[0]] = r, alpha
            continue
        if len(src_modules) == 1:  # split a fused original qkv LoRA: same A, B split by rows
            a, b = parts["lora_A"], parts["lora_B"]
            r = int(a.shape[0])
            alpha = _pattern_value(alpha_pattern, module, alpha0)
            for dst_module, b_part in zip(dst_modules, _split_rows_of(group, b, layout)):
                if not b_part.any():
                    continue  # a part the fused LoRA did not touch (e.g. k of a q/v-only adapter)
                out[f"{_PEFT_PREFIX}{dst_module}.lora_A.weight"] = a.clone()
                out[f"{_PEFT_PREFIX}{dst_module}.lora_B.weight"] = b_part
                out_modules.add(dst_module)
                out_rank[dst_module], out_alpha[dst_module] = r, alpha
            continue
        # fuse q/k/v LoRAs into one LoRA on the fused module
        present = [(m, lora[m]) for m in src_modules if m in lora]
        scales = {scale(int(p["lora_A"].shape[0]), _pattern_value(alpha_pattern, m, alpha0)) for m, p in present}
        if len(scales) != 1:
            raise CheckpointError(
                f"{weights_path}: the q/k/v LoRAs of {module.rsplit('.', 1)[0]} have different scalings, which one "
                "fused LoRA cannot express; merge the adapter into the model and convert the merged checkpoint"
            )
        s = scales.pop()
        a_fused, b_fused = _fuse_qkv_lora(group, src_modules, lora, layout)
        dst_module = dst_modules[0]
        out[f"{_PEFT_PREFIX}{dst_module}.lora_A.weight"] = a_fused
        out[f"{_PEFT_PREFIX}{dst_module}.lora_B.weight"] = b_fused
        r_new = int(a_fused.shape[0])
        out_modules.add(dst_module)
        out_rank[dst_module] = r_new
        out_alpha[dst_module] = s * (math.sqrt(r_new) if rslora else r_new)

    # full tensors: modules_to_save copies, and the base weights PEFT saves with embedding LoRAs
    base = {k.replace(".base_layer.", "."): t for k, t in full.items() if ".base_layer." in k}
    plain = {k: t for k, t in full.items() if ".base_layer." not in k}
    plain_out = _convert(plain, layout, from_side) if plain else {}
    for name, t in plain_out.items():
        out[_PEFT_PREFIX + name] = t
    for name, t in (_convert(base, layout, from_side) if base else {}).items():
        module, leaf = name.rsplit(".", 1)
        out[f"{_PEFT_PREFIX}{module}.base_layer.{leaf}"] = t
    saved_modules = sorted({n.rsplit(".", 1)[0] for n in plain_out})

    new_cfg = dict(acfg)
    new_cfg["target_modules"] = sorted(out_modules)
    new_cfg["layers_to_transform"] = None
    new_cfg["layers_pattern"] = None
    new_cfg["exclude_modules"] = None
    new_cfg["auto_mapping"] = None
    if acfg.get("modules_to_save"):
        new_cfg["modules_to_save"] = saved_modules or acfg["modules_to_save"]
    new_cfg["rank_pattern"] = {re.escape(m): r for m, r in sorted(out_rank.items()) if r != r0}
    new_cfg["alpha_pattern"] = {re.escape(m): _number(a) for m, a in sorted(out_alpha.items())
                                if not math.isclose(a, float(alpha0))}
    with _atomic_folder(dst, overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in out.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(new_cfg, indent=2) + "\n", encoding="utf-8")
        for p in sorted(src.iterdir()):
            side_file = p.suffix in (".md", ".json", ".txt", ".model", ".jinja")
            if p.is_file() and p.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) and side_file:
                shutil.copy2(p, tmp / p.name)
    return dst


__all__ = [
    "LLM_TYPES", "original_llm_type", "original_config_to_hf", "hf_config_to_original", "check_original_config",
    "resolve_image_token_id", "original_key_to_hf", "hf_key_to_original", "original_to_hf_state_dict",
    "hf_to_original_state_dict", "split_grouped_qkv", "fuse_grouped_qkv", "read_safetensors_header",
    "weight_files", "read_original_config", "load_original_model", "load_original_tokenizer", "save_original",
    "convert_checkpoint", "convert_adapter",
]
