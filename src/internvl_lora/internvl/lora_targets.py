"""LoRA target modules of the native InternVL module tree, per part and LLM architecture.

Targets are given to PEFT as one regex anchored on the part's prefix: a bare list such as
["q_proj", "v_proj"] would also hit the vision tower, whose attention uses the same names.
"""

from __future__ import annotations

import re

# Linear layers of one decoder layer, per text model_type (after conversion InternLM2 is "llama").
# These are the official `wrap_llm_lora` targets: attention and MLP projections, not embeddings or head.
LLM_TARGETS = {
    "qwen2": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "qwen3": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    # MoE experts are fused parameters, not nn.Linear: attention only (plus the shared expert if any).
    "qwen3_moe": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    "gpt_oss": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    "phi3": ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"],
}
# The official `wrap_backbone_lora` targets (attn.qkv, attn.proj, mlp.fc1, mlp.fc2) in native names.
VISION_TARGETS = ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.projection_layer",
                  "mlp.fc1", "mlp.fc2"]

LLM_LAYERS = r"model\.language_model\.layers\.\d+\."
VISION_LAYERS = r"model\.vision_tower\.encoder\.layer\.\d+\."

# Module names of the parts, for full training (PEFT `modules_to_save`) and parameter accounting.
PART_PREFIXES = {
    "vision": "model.vision_tower.",
    "projector": "model.multi_modal_projector.",
    "llm": ("model.language_model.", "lm_head."),
}
FULL_MODULES = {"vision": ["vision_tower"], "projector": ["multi_modal_projector"], "llm": ["language_model", "lm_head"]}


def default_llm_targets(llm_type: str) -> list[str]:
    return list(LLM_TARGETS.get(llm_type, LLM_TARGETS["llama"]))


def target_regex(llm_targets: list[str] | None, vision_targets: list[str] | None) -> str:
    """One regex over full module names covering the LLM and/or vision targets."""
    alts = []
    if llm_targets:
        alts.append(LLM_LAYERS + "(" + "|".join(re.escape(t) for t in llm_targets) + ")")
    if vision_targets:
        alts.append(VISION_LAYERS + "(" + "|".join(re.escape(t) for t in vision_targets) + ")")
    return "(" + "|".join(alts) + ")"


def part_of(param_name: str) -> str:
    """Which part a (possibly PEFT-wrapped) parameter belongs to."""
    name = param_name.removeprefix("base_model.model.")
    for part, prefix in PART_PREFIXES.items():
        if name.startswith(prefix):
            return part
    return "other"
