"""Original `config.json` files: read, check, and name the LLM family.

`read_json` is the one JSON reader of the checkpoint code. `original_llm_type` names the text model
family an original config converts to (InternLM2 becomes Llama); `check_original_config` refuses configs
the conversion cannot represent exactly. The -hf template defaults live here too, since both
`checkpoint.inspect_checkpoint` and `config_map.hf_config_to_original` need them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ...errors import CheckpointError

PathLike = str | os.PathLike


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


# -hf checkpoints carry no template name. The official scripts train every InternVL2.5 / 3 / 3.5
# model with `internvl2_5`, and the GPT-OSS variant with its own template; the -hf releases are of
# those families only (InternVL2 was never converted upstream).
HF_TEMPLATE_BY_LLM = {"gpt_oss": "internvl3_5_gpt_oss"}
HF_DEFAULT_TEMPLATE = "internvl2_5"


def config_file(path: PathLike | None) -> str:
    """The config file to name in messages."""
    if path is None:
        return "config.json"
    p = Path(path)
    return str(p if p.suffix == ".json" else p / "config.json")


def read_json(path: Path, *, checkpoint_file: bool = False) -> Any:
    """A JSON file's content; a `CheckpointError` naming the file when it is missing or not JSON.

    `checkpoint_file`: the file is what tells a checkpoint folder apart (its config.json, its processor
    config); a missing one then asks whether the folder is a checkpoint, and bad JSON is named by line.
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        hint = "; is this a checkpoint folder?" if checkpoint_file else ""
        raise CheckpointError(f"{path}: file not found{hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if not checkpoint_file:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if isinstance(e, UnicodeDecodeError):
            raise  # the checkpoint-folder reader has always let this one through; kept as it was
        raise CheckpointError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def llm_arch(cfg: dict, path: PathLike | None = None) -> str:
    where = config_file(path)
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
    arch = llm_arch(cfg, path)
    if arch not in LLM_TYPES:
        raise CheckpointError(
            f"{config_file(path)}: LLM architecture {arch!r} is not supported; supported: "
            f"{', '.join(sorted(LLM_TYPES))}"
        )
    return LLM_TYPES[arch]

def check_original_config(cfg: dict, path: PathLike | None = None) -> None:
    """Refuse configs this converter cannot represent exactly (raises `CheckpointError`)."""
    where = config_file(path)
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


def read_original_config(path: PathLike) -> dict:
    """The parsed `config.json` of an original checkpoint folder, checked (`check_original_config`)."""
    cfg_path = Path(path) / "config.json"
    cfg = read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: not a JSON object")
    check_original_config(cfg, cfg_path)
    return cfg


def read_original_config_unchecked(path: PathLike) -> dict:
    """The config.json of an original folder, checked for what writing needs (the LoRA flags may be set)."""
    cfg_path = Path(path) / "config.json"
    cfg = read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: not a JSON object")
    check_original_config({**cfg, "use_llm_lora": 0, "use_backbone_lora": 0}, cfg_path)
    return cfg


def merged_config(cfg: dict) -> dict:
    """An original config for merged weights: the official LoRA flags off, since no LoRA tensors remain."""
    return {**cfg, "use_llm_lora": 0, "use_backbone_lora": 0}
