"""Config keys that are not (or no longer) fields: the keys of earlier versions still read, and the
"did you mean ...?" hint for an unknown key (names from the HF Trainer, PEFT and the official scripts first).

    unknown key train.learning_rate (did you mean train.lr?)
"""

from __future__ import annotations

import dataclasses
import difflib
import typing

# Keys of earlier versions, still read so that their configs (and the config.yaml of their run folders) load.
# The four switches of the fused paths became `train.fused`; `train.compile` was removed.
LEGACY_FUSED_KEYS = ("fused_lora", "lora_kernels", "fused_mlp", "chunked_loss")
LEGACY_REMOVED_KEYS = {"compile": False}  # key: the only value still accepted (the old default)


def legacy_train_keys(train: dict, problems: list[str]) -> list[str]:
    """Take the legacy keys out of the `train` section (in place): the fused switches at their old default
    (true) change nothing; any of them false means `train.fused: false` (unless it is set). Returns notices."""
    notices = []
    off = []
    for key in LEGACY_FUSED_KEYS:
        if key not in train:
            continue
        value = train.pop(key)
        if not isinstance(value, bool):
            problems.append(f"train.{key}: {value!r} is not of type bool (a legacy key: use train.fused)")
        elif not value:
            off.append(key)
    if off and "fused" not in train:
        train["fused"] = False
        notices.append(f"note: legacy key(s) {', '.join(f'train.{k}=false' for k in off)}: "
                       "running with train.fused=false (PEFT's path, no fused MLP, no chunked loss)")
    for key, accepted in LEGACY_REMOVED_KEYS.items():
        if key in train and train.pop(key) != accepted:
            problems.append(f"train.{key} was removed (torch.compile of the decoder layers was an experiment; "
                            "the fused paths, train.fused, replace it): delete the key")
    return notices


# Names users bring from the Hugging Face Trainer / PEFT / the official InternVL scripts, and the field
# that holds the same setting here (matched before spelling, so that "learning_rate" finds train.lr).
KNOWN_ALIASES = {
    "learning_rate": "train.lr", "num_train_epochs": "train.epochs", "num_epochs": "train.epochs",
    "gradient_accumulation_steps": "train.grad_accum", "per_device_train_batch_size": "train.per_device_batch_size",
    "batch_size": "train.per_device_batch_size", "per_device_eval_batch_size": "train.eval_batch_size",
    "lr_scheduler_type": "train.lr_scheduler", "resume_from_checkpoint": "train.resume",
    "model_name_or_path": "model.path", "conv_style": "model.template", "torch_dtype": "model.dtype",
    "meta_path": "data.meta", "model_max_length": "data.max_length", "max_seq_length": "data.max_length",
    "dataloader_num_workers": "data.num_workers", "lora_r": "policy.r", "use_llm_lora": "policy.r",
    "lora_alpha": "policy.alpha", "lora_dropout": "policy.dropout", "target_modules": "policy.llm_targets",
    "use_backbone_lora": "policy.vision", "freeze_mlp": "policy.projector",
}


def suggest(key: str, prefix: str, names: list[str], root: type) -> str:
    """The " (did you mean ...?)" hint for an unknown key: a known alias, a close spelling in the same
    section, the same name in another section of `root` (the run config class: `output_dir` at the top level), or
    a close one there."""
    if key in KNOWN_ALIASES:
        return f" (did you mean {KNOWN_ALIASES[key]}?)"
    close = difflib.get_close_matches(key, names, n=1)
    if close:
        return f" (did you mean {prefix}{close[0]}?)"
    every = {f.name: f"{section.name}.{f.name}" for section in dataclasses.fields(root)
             for f in dataclasses.fields(typing.get_type_hints(root)[section.name])}
    close = difflib.get_close_matches(key, list(every), n=1)
    if close and every[close[0]] != f"{prefix}{close[0]}":
        return f" (did you mean {every[close[0]]}?)"
    return f" (known: {', '.join(names)})"
