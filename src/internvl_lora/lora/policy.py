"""Trainability per part (vision, projector, LLM: frozen | lora | full) and PEFT injection.

The base weights are frozen and stay bit-identical (except with PiSSA / OLoRA init, which move the
principal part of each targeted weight into the adapter before training; the final adapter is then
converted back to a plain LoRA that applies to the original base). LoRA adapters are added where
the policy says `lora`; parts set to `full` are trained whole (and saved with the adapter through
PEFT's `modules_to_save`). A table of trainable parameters per part is printed and saved.

Without any `lora` part there is no adapter: the model is not wrapped by PEFT and checkpoints hold
the whole model (a full fine-tune of the `full` parts).
"""

from __future__ import annotations

from ..config import PolicyArgs
from ..internvl.lora_targets import FULL_MODULES, VISION_TARGETS, default_llm_targets, part_of, target_regex

PART_NAMES = ("vision", "projector", "llm")
# Inits that change the base weights (the residual stays in the base); the trained adapter is
# converted to a rank-2r plain LoRA on save so that it applies to the untouched original base.
MUTATING_INITS = ("pissa", "olora")


def lora_config(policy: PolicyArgs, llm_type: str):
    """The PEFT LoraConfig for a policy, or None when no part is set to `lora`."""
    llm_targets = (policy.llm_targets or default_llm_targets(llm_type)) if policy.llm == "lora" else None
    vision_targets = (policy.vision_targets or VISION_TARGETS) if policy.vision == "lora" else None
    if not llm_targets and not vision_targets:
        return None
    from peft import LoraConfig

    full = [m for part in PART_NAMES if getattr(policy, part) == "full" for m in FULL_MODULES[part]]
    init = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}[policy.init]
    return LoraConfig(
        r=policy.r, lora_alpha=policy.alpha or 2 * policy.r, lora_dropout=policy.dropout,
        target_modules=target_regex(llm_targets, vision_targets), modules_to_save=full or None,
        use_dora=policy.use_dora, use_rslora=policy.use_rslora, init_lora_weights=init, bias="none",
    )


def apply_policy(model, policy: PolicyArgs, llm_type: str):
    """Freeze the base, inject adapters, unfreeze full parts. Returns the (possibly PEFT-wrapped) model."""
    for p in model.parameters():
        p.requires_grad_(False)
    config = lora_config(policy, llm_type)
    if config is None:
        full_parts = [part for part in PART_NAMES if getattr(policy, part) == "full"]
        for name, p in model.named_parameters():
            if part_of(name) in full_parts:
                p.requires_grad_(True)
        return model
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():  # peft reads the deprecated `is_gradient_checkpointing` property
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def save_initial_adapter(model, path) -> None:
    """For PiSSA / OLoRA: keep the adapter as initialised, needed to convert the trained one (see module doc)."""
    model.peft_config["default"].init_lora_weights = True  # reloading it must not decompose the base again
    model.save_pretrained(str(path))


def _numel(p) -> int:
    """Parameter size, also under DeepSpeed ZeRO-3 where the local tensor is an empty placeholder."""
    return int(getattr(p, "ds_numel", 0) or p.numel())


def trainable_table(model, policy: PolicyArgs | None = None) -> dict:
    """Trainable and total parameter counts per part (totals count base weights, not adapter copies)."""
    rows = {part: {"policy": getattr(policy, part) if policy else None, "trainable": 0, "total": 0}
            for part in PART_NAMES}
    for name, p in model.named_parameters():
        part = part_of(name)
        if part not in rows:
            rows[part] = {"policy": None, "trainable": 0, "total": 0}
        n = _numel(p)
        is_adapter = "lora_" in name or ".modules_to_save." in name
        if not is_adapter:
            rows[part]["total"] += n
        if p.requires_grad:
            rows[part]["trainable"] += n
    trainable = sum(r["trainable"] for r in rows.values())
    total = sum(r["total"] for r in rows.values())
    return {"parts": rows, "trainable": trainable, "total": total, "share": trainable / max(1, total)}


def format_table(table: dict, policy: PolicyArgs | None = None) -> str:
    lines = [f"{'part':<10} {'policy':<7} {'trainable':>14} {'total':>14} {'share':>9}"]
    for part, row in table["parts"].items():
        mode = (getattr(policy, part, None) if policy else None) or row.get("policy") or "-"
        share = 100 * row["trainable"] / max(1, row["total"])
        lines.append(f"{part:<10} {mode:<7} {row['trainable']:>14,} {row['total']:>14,} {share:>8.3f}%")
    lines.append(f"trainable {table['trainable']:,} of {table['total']:,} parameters ({100 * table['share']:.4f} %)")
    return "\n".join(lines)
