"""Trainability per part (vision, projector, LLM: frozen | lora | full) and PEFT injection.

The base weights are frozen and stay bit-identical; LoRA adapters are added where the policy says
`lora`; parts set to `full` are trained whole (and saved with the adapter through PEFT's
`modules_to_save`). A table of trainable parameters per part is printed and saved.
"""

from __future__ import annotations

from .config import PolicyArgs
from .internvl.lora_targets import FULL_MODULES, VISION_TARGETS, default_llm_targets, part_of, target_regex


def apply_policy(model, policy: PolicyArgs, llm_type: str):
    """Freeze the base, inject adapters, unfreeze full parts. Returns the (possibly PEFT-wrapped) model."""
    for p in model.parameters():
        p.requires_grad_(False)
    llm_targets = (policy.llm_targets or default_llm_targets(llm_type)) if policy.llm == "lora" else None
    vision_targets = (policy.vision_targets or VISION_TARGETS) if policy.vision == "lora" else None
    full = [m for part in ("vision", "projector", "llm") if getattr(policy, part) == "full" for m in FULL_MODULES[part]]
    if not llm_targets and not vision_targets:
        for name, p in model.named_parameters():
            if part_of(name) in [part for part in ("vision", "projector", "llm") if getattr(policy, part) == "full"]:
                p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    init = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}[policy.init]
    config = LoraConfig(
        r=policy.r, lora_alpha=policy.alpha or 2 * policy.r, lora_dropout=policy.dropout,
        target_modules=target_regex(llm_targets, vision_targets), modules_to_save=full or None,
        use_dora=policy.use_dora, use_rslora=policy.use_rslora, init_lora_weights=init, bias="none",
    )
    return get_peft_model(model, config)


def trainable_table(model) -> dict:
    """Trainable and total parameter counts per part."""
    rows = {part: {"trainable": 0, "total": 0} for part in ("vision", "projector", "llm")}
    for name, p in model.named_parameters():
        part = part_of(name)
        if part not in rows:
            rows[part] = {"trainable": 0, "total": 0}
        is_adapter = "lora_" in name or ".modules_to_save." in name
        if not is_adapter:
            rows[part]["total"] += p.numel()
        if p.requires_grad:
            rows[part]["trainable"] += p.numel()
    trainable = sum(r["trainable"] for r in rows.values())
    total = sum(r["total"] for r in rows.values())
    return {"parts": rows, "trainable": trainable, "total": total, "share": trainable / max(1, total)}


def format_table(table: dict, policy: PolicyArgs) -> str:
    lines = [f"{'part':<10} {'policy':<7} {'trainable':>14} {'total':>14}"]
    for part, row in table["parts"].items():
        mode = getattr(policy, part, "-")
        lines.append(f"{part:<10} {mode:<7} {row['trainable']:>14,} {row['total']:>14,}")
    lines.append(f"trainable {table['trainable']:,} of {table['total']:,} parameters ({100 * table['share']:.4f} %)")
    return "\n".join(lines)
