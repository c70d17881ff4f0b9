"""Streaming merge: fold a LoRA adapter into a checkpoint shard by shard, without building the model.

For every safetensors shard of the base: read its tensors, replace each targeted weight W by
W + scale * B @ A (scale = alpha / r, or alpha / sqrt(r) with rsLoRA; rank and alpha patterns honoured),
replace the tensors of fully trained parts (PEFT `modules_to_save`) by the trained ones, and write the
shard under the same file name and keys. Memory: one shard plus the adapter.

The arithmetic is PEFT's own (`get_delta_weight` then an in-place add), so the result equals
`PeftModel.merge_and_unload()` bit for bit in float32.

Adapters are trained on the transformers-native module tree, so their keys are native names. The shard
keys are mapped to native names first:
* -hf checkpoints: transformers writes the legacy Llava-style keys (`language_model.model.*`,
  `vision_tower.*`, ...) that load into `model.language_model.*`, `model.vision_tower.*`, ...;
* original checkpoints: the key map's rule table (`internvl/format/keymap.py`). A fused original tensor
  (InternLM2 `attention.wqkv`, InternViT `attn.qkv`) is split into its native q/k/v parts with its split, the LoRA deltas of
  the parts are added, and the parts are fused back (the split and the fuse are exact inverses).

Refused, with the reason: DoRA (its merge needs the weight norm of the merged weight: use the
non-streaming merge), LoRA biases, trainable tokens, LoRA on fused MoE expert parameters, and any adapter
module that no tensor of the base matches.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .errors import UserError
from .internvl.checkpoint import detect_format
from .internvl.format.adapter import Adapter, LoraModule, hf_native_name
from .internvl.format.config import merged_config, read_original_config
from .internvl.format.keymap import hf_to_original_state_dict, original_key_to_hf, original_to_hf_state_dict
from .internvl.format.safetensors import WEIGHTS_INDEX_NAME, read_safetensors_header, weight_files

class _Plan:
    """Which adapter tensors touch which native parameter; tracks what was applied."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter
        self.by_param: dict[str, LoraModule] = {}
        for module, lm in adapter.lora.items():
            self.by_param[module + ".weight"] = lm
        self.applied_lora: set[str] = set()
        self.applied_full: set[str] = set()

    def touches(self, native: str) -> bool:
        return native in self.by_param or native in self.adapter.full

    def apply(self, native: str, w: torch.Tensor) -> torch.Tensor:
        """`w` (already in the output dtype) with the adapter applied, as merge_and_unload would leave it."""
        if native in self.adapter.full:
            full = self.adapter.full[native]
            if tuple(full.shape) != tuple(w.shape):
                raise UserError(f"{self.adapter.path}: trained tensor {native} has shape {tuple(full.shape)}, "
                                f"the base has {tuple(w.shape)}")
            self.applied_full.add(native)
            return full.to(w.dtype).clone()
        lm = self.by_param.get(native)
        if lm is None:
            return w
        delta = lm.delta()
        if tuple(delta.shape) != tuple(w.shape):
            raise UserError(f"{self.adapter.path}: the LoRA of {native[:-len('.weight')]} gives a delta of shape "
                            f"{tuple(delta.shape)}, the base weight has {tuple(w.shape)}; wrong base model?")
        w = w.clone()
        w.add_(delta)  # PEFT: base_layer.weight.data += delta_weight (float32 delta, one rounding)
        if not torch.isfinite(w).all():
            raise UserError(f"{self.adapter.path}: merging {native} gives non-finite values; the adapter is broken")
        self.applied_lora.add(native)
        return w

    def leftovers(self) -> list[str]:
        return sorted((set(self.by_param) - self.applied_lora) | (set(self.adapter.full) - self.applied_full))


def _side_files(base: Path, out: Path, weight_names: set[str]) -> list[str]:
    copied = []
    for p in sorted(base.iterdir()):
        if not p.is_file() or p.name in weight_names or p.name == WEIGHTS_INDEX_NAME:
            continue
        if p.suffix in (".bin", ".pt", ".pth", ".safetensors"):
            continue
        shutil.copy2(p, out / p.name)
        copied.append(p.name)
    return copied


def stream_merge(base: str | Path, adapter: Adapter, out: str | Path, dtype: torch.dtype | None = None,
                 on_shard=None) -> dict:
    """Write the merged checkpoint into `out` (an existing empty folder) in the base's format and shard
    layout. `dtype`: cast floating tensors (default: keep each stored dtype). `on_shard(file)` is called
    after each shard is written. Returns counts for the merge report."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    base, out = Path(base), Path(out)
    fmt = detect_format(base)
    cfg = read_original_config(base) if fmt == "original" else None
    files = weight_files(base)
    plan = _Plan(adapter)
    total_bytes, largest, fused = 0, 0, 0
    for file, names in files.items():
        read_safetensors_header(file)  # a clear message for a truncated or corrupt shard
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(file), framework="pt") as handle:
            for key in names:
                w = handle.get_tensor(key)
                target = dtype if dtype is not None and w.is_floating_point() else w.dtype
                if fmt == "hf":
                    native = hf_native_name(key)
                    if plan.touches(native):
                        w = plan.apply(native, w.to(target))
                else:
                    natives = original_key_to_hf(key, cfg)
                    if any(plan.touches(n) for n in natives):
                        try:
                            parts = original_to_hf_state_dict({key: w.to(target)}, cfg)
                        except UserError as e:
                            raise UserError(f"{adapter.path}: the adapter changes {natives[0]}, which is stored "
                                            f"with other tensors ({e}); merge without --streaming") from None
                        parts = {n: plan.apply(n, t) for n, t in parts.items()}
                        w = hf_to_original_state_dict(parts, cfg)[key]
                        fused += len(parts) > 1
                w = w.to(target).contiguous()
                tensors[key] = w
                total_bytes += w.numel() * w.element_size()
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        largest = max(largest, size)
        save_file(tensors, str(out / file.name), metadata={"format": "pt"})
        del tensors
        if on_shard is not None:
            on_shard(out / file.name)
    left = plan.leftovers()
    if left:
        shown = ", ".join(left[:6]) + (f", ... ({len(left) - 6} more)" if len(left) > 6 else "")
        raise UserError(f"{adapter.path}: {len(left)} adapter tensor(s) match no weight of {base}: {shown}; "
                        "is this the base the adapter was trained on?")
    index = base / WEIGHTS_INDEX_NAME
    if index.is_file():
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = total_bytes
        (out / WEIGHTS_INDEX_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    copied = _side_files(base, out, {f.name for f in files})
    if fmt == "original":
        cfg_out = merged_config(json.loads((out / "config.json").read_text()))
        (out / "config.json").write_text(json.dumps(cfg_out, indent=2) + "\n")
    return {"shards": len(files), "largest_shard_bytes": largest, "total_bytes": total_bytes,
            "lora_weights_merged": len(plan.applied_lora), "full_tensors_replaced": len(plan.applied_full),
            "fused_tensors_rebuilt": fused, "side_files": copied}
