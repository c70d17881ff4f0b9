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
* original checkpoints: convert.py's rule table. A fused original tensor (InternLM2 `attention.wqkv`,
  InternViT `attn.qkv`) is split into its native q/k/v parts with convert.py's split, the LoRA deltas of
  the parts are added, and the parts are fused back (the split and the fuse are exact inverses).

Refused, with the reason: DoRA (its merge needs the weight norm of the merged weight: use the
non-streaming merge), LoRA biases, trainable tokens, LoRA on fused MoE expert parameters, and any adapter
module that no tensor of the base matches.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .internvl.checkpoint import detect_format
from .internvl.convert import (
    WEIGHTS_INDEX_NAME, hf_to_original_state_dict, original_key_to_hf, original_to_hf_state_dict,
    read_original_config, read_safetensors_header, weight_files,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?:(?P<part>lora_A|lora_B)\.weight|(?P<emb>lora_embedding_A|lora_embedding_B))$")

# -hf shard keys (transformers' legacy Llava-style names) -> native parameter names; first match wins.
HF_DISK_TO_NATIVE = (
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^language_model\."), "model.language_model."),
    (re.compile(r"^vision_tower\."), "model.vision_tower."),
    (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
)


def hf_native_name(key: str) -> str:
    """The native parameter name of an -hf shard key (keys already native are returned unchanged)."""
    for pattern, repl in HF_DISK_TO_NATIVE:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return key


@dataclass
class LoraModule:
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    embedding: bool = False

    def delta(self) -> torch.Tensor:
        """PEFT's `get_delta_weight` in float32: (B @ A) * scaling, transposed for embeddings."""
        d = self.b.float() @ self.a.float()
        return (d.T if self.embedding else d) * self.scale


@dataclass
class Adapter:
    path: Path
    config: dict
    lora: dict[str, LoraModule] = field(default_factory=dict)  # native module name -> LoRA
    full: dict[str, torch.Tensor] = field(default_factory=dict)  # native parameter name -> trained tensor
    other: list[str] = field(default_factory=list)  # other trained tensors (DoRA magnitudes, ...): PEFT path only

    @property
    def zero_b(self) -> list[str]:
        return sorted(m for m, lm in self.lora.items() if not lm.b.any())


def refusals(config: dict) -> list[str]:
    """Adapter features the streaming merge cannot apply as W + scale * B @ A."""
    why = {
        "peft_type": (config.get("peft_type", "LORA") != "LORA", "only LoRA adapters can be merged this way"),
        "use_dora": (bool(config.get("use_dora")), "DoRA rescales each merged weight by its new column norm; "
                     "merge without --streaming (PEFT applies DoRA exactly)"),
        "lora_bias": (bool(config.get("lora_bias")), "LoRA biases are not merged by the streaming path"),
        "trainable_token_indices": (bool(config.get("trainable_token_indices")), "trainable tokens"),
        "target_parameters": (bool(config.get("target_parameters")), "LoRA on raw parameters (MoE experts)"),
        "layer_replication": (bool(config.get("layer_replication")), "layer replication"),
    }
    return [f"{k}={config.get(k)!r}: {reason}" for k, (bad, reason) in why.items() if bad]


def read_adapter(adapter_dir: str | Path, streaming: bool = True) -> Adapter:
    """The adapter's LoRA modules (with their PEFT scaling) and full tensors, by native name."""
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    path = Path(adapter_dir)
    cfg_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_file.is_file():
        raise UserError(f"{path}: no {ADAPTER_CONFIG}; give the adapter folder written by `train` (RUN/adapter)")
    if not weights.is_file():
        bins = sorted(p.name for p in path.glob("adapter_model*.bin"))
        hint = f" (found {bins[0]}: pickle weights are refused; save the adapter as safetensors)" if bins else ""
        raise UserError(f"{weights}: file not found{hint}")
    config = json.loads(cfg_file.read_text())
    if streaming:
        bad = refusals(config)
        if bad:
            raise UserError(f"{cfg_file}: the streaming merge cannot apply this adapter:\n  - " + "\n  - ".join(bad))
    tensors = load_file(str(weights))
    r0, alpha0 = int(config.get("r", 8)), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    adapter = Adapter(path, config)
    for key, t in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise UserError(f"{weights}: key {key!r} does not start with {PEFT_PREFIX!r}; not a PEFT adapter of this model")
        inner = key[len(PEFT_PREFIX):]
        m = _LORA_KEY.match(inner)
        if m:
            parts.setdefault(m["module"], {})[m["part"] or m["emb"]] = t
        elif ".base_layer." in inner:
            continue  # the base weights PEFT saves next to embedding LoRAs: the checkpoint has them
        elif "lora_" in inner:
            if streaming:
                raise UserError(f"{weights}: {key!r} is not a plain LoRA tensor; merge without --streaming")
            adapter.other.append(inner)
        else:
            adapter.full[inner] = t
    for module, p in parts.items():
        emb = "lora_embedding_A" in p
        a, b = (p.get("lora_embedding_A"), p.get("lora_embedding_B")) if emb else (p.get("lora_A"), p.get("lora_B"))
        if a is None or b is None:
            raise UserError(f"{weights}: LoRA module {module} lacks its A or B matrix")
        r = int(rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), r0))
        if r != a.shape[0]:
            raise UserError(f"{weights}: {module} has rank {a.shape[0]}, the adapter config says {r}")
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), alpha0)
        scale = alpha / math.sqrt(r) if rslora else alpha / r  # PEFT's expressions
        adapter.lora[module] = LoraModule(a, b, scale, emb)
    return adapter


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
        cfg_out = json.loads((out / "config.json").read_text())
        cfg_out["use_llm_lora"] = 0
        cfg_out["use_backbone_lora"] = 0
        (out / "config.json").write_text(json.dumps(cfg_out, indent=2) + "\n")
    return {"shards": len(files), "largest_shard_bytes": largest, "total_bytes": total_bytes,
            "lora_weights_merged": len(plan.applied_lora), "full_tensors_replaced": len(plan.applied_full),
            "fused_tensors_rebuilt": fused, "side_files": copied}
