"""PEFT LoRA adapters of InternVL models: reading them, and remapping them between layouts.

`convert_adapter` remaps an adapter between the native and the original key layout.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError, UserError
from .adapter_check import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, check_adapter_files
from .config import PathLike, read_json
from .config_map import hf_config_to_original
from .keymap import Group, Layout, convert_state, fuse_rows, group_of_hf, group_of_original, layout_of, split_rows_of
from .safetensors import get_tensor, open_safetensors
from .save import atomic_folder


LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?:(?P<part>lora_A|lora_B)\.weight|(?P<emb>lora_embedding_A|lora_embedding_B))$"
)


def _lora_key(module: str, part: str) -> str:
    """The saved key of a LoRA tensor: Linear LoRAs end in `.weight`, embedding LoRAs do not."""
    return f"{PEFT_PREFIX}{module}.{part}" + ("" if part.startswith("lora_embedding") else ".weight")


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: a key matches a module name if it matches its dotted tail."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


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
    from safetensors.torch import load_file

    path = Path(adapter_dir)
    cfg_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    config, _ = check_adapter_files(path)  # JSON config, safetensors weights that are whole
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
        m = LORA_KEY.match(inner)
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
        r = int(pattern_value(rank_pattern, module, r0))
        if r != a.shape[0]:
            raise UserError(f"{weights}: {module} has rank {a.shape[0]}, the adapter config says {r}")
        alpha = pattern_value(alpha_pattern, module, alpha0)
        scale = alpha / math.sqrt(r) if rslora else alpha / r  # PEFT's expressions
        adapter.lora[module] = LoraModule(a, b, scale, emb)
    return adapter


def _number(x: float) -> float | int:
    return int(round(x)) if abs(x - round(x)) < 1e-9 else x


def _fuse_qkv_lora(group: Group, modules: list[str], lora: Mapping[str, Mapping[str, torch.Tensor]],
                   layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA (A, B) on a fused qkv module equal to LoRAs on its q/k/v parts (some may be absent).

    delta = fuse(B_q A_q, B_k A_k, B_v A_v). With one shared A this is fuse(B_q, B_k, B_v) @ A, same rank;
    otherwise A stacks the A's and B places each part's B in its own column block (rank r_q + r_k + r_v).
    """
    present = [m for m in modules if m in lora]
    a_list = [lora[m]["lora_A"] for m in present]
    if len(present) == 3 and all(torch.equal(a_list[0], a) for a in a_list[1:]):
        return a_list[0].clone(), fuse_rows(group, [lora[m]["lora_B"] for m in modules], layout)
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
    return a_fused, fuse_rows(group, blocks, layout)


def _adapter_layout_config(cfg: dict | PathLike | None) -> dict:
    """The original config describing an adapter's layout, from a dict, a config.json or a checkpoint
    folder. An -hf config is turned into an original one (its `llama` read as Llama, not InternLM2)."""
    if cfg is None:
        raise CheckpointError("converting an adapter needs the model's config: give the base checkpoint "
                              "(an original checkpoint for InternLM2-based models)")
    if not isinstance(cfg, dict):
        p = Path(cfg)
        cfg = read_json(p if p.suffix == ".json" else p / "config.json")
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
    layout = layout_of(_adapter_layout_config(cfg))
    adapter_cfg_path, weights_path = src / ADAPTER_CONFIG, src / ADAPTER_WEIGHTS
    acfg = read_json(adapter_cfg_path)
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
    with open_safetensors(weights_path) as handle:
        tensors = {k: get_tensor(handle, weights_path, k) for k in handle.keys()}

    from_side = "hf" if to == "original" else "original"
    find = group_of_hf if from_side == "hf" else group_of_original
    r0, alpha0 = int(acfg.get("r", 8)), acfg.get("lora_alpha", 8)
    rslora = bool(acfg.get("use_rslora"))
    alpha_pattern = acfg.get("alpha_pattern") or {}  # ranks are read from the tensors

    def scale(r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if rslora else alpha / r

    # LoRA modules by source module path: {module: {part: tensor}}; full tensors (modules_to_save) apart.
    lora: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise CheckpointError(f"{weights_path}: key {key!r} does not start with {PEFT_PREFIX!r}")
        inner = key[len(PEFT_PREFIX):]
        m = LORA_KEY.match(inner)
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

    def group_of_module(module: str) -> Group:
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
            alpha = pattern_value(alpha_pattern, module, alpha0)
            out_modules.add(dst_modules[0])
            out_rank[dst_modules[0]], out_alpha[dst_modules[0]] = r, alpha
            continue
        if len(src_modules) == 1:  # split a fused original qkv LoRA: same A, B split by rows
            a, b = parts["lora_A"], parts["lora_B"]
            r = int(a.shape[0])
            alpha = pattern_value(alpha_pattern, module, alpha0)
            for dst_module, b_part in zip(dst_modules, split_rows_of(group, b, layout)):
                if not b_part.any():
                    continue  # a part the fused LoRA did not touch (e.g. k of a q/v-only adapter)
                out[f"{PEFT_PREFIX}{dst_module}.lora_A.weight"] = a.clone()
                out[f"{PEFT_PREFIX}{dst_module}.lora_B.weight"] = b_part
                out_modules.add(dst_module)
                out_rank[dst_module], out_alpha[dst_module] = r, alpha
            continue
        # fuse q/k/v LoRAs into one LoRA on the fused module
        present = [(m, lora[m]) for m in src_modules if m in lora]
        scales = {scale(int(p["lora_A"].shape[0]), pattern_value(alpha_pattern, m, alpha0)) for m, p in present}
        if len(scales) != 1:
            raise CheckpointError(
                f"{weights_path}: the q/k/v LoRAs of {module.rsplit('.', 1)[0]} have different scalings, which one "
                "fused LoRA cannot express; merge the adapter into the model and convert the merged checkpoint"
            )
        s = scales.pop()
        a_fused, b_fused = _fuse_qkv_lora(group, src_modules, lora, layout)
        dst_module = dst_modules[0]
        out[f"{PEFT_PREFIX}{dst_module}.lora_A.weight"] = a_fused
        out[f"{PEFT_PREFIX}{dst_module}.lora_B.weight"] = b_fused
        r_new = int(a_fused.shape[0])
        out_modules.add(dst_module)
        out_rank[dst_module] = r_new
        out_alpha[dst_module] = s * (math.sqrt(r_new) if rslora else r_new)

    # full tensors: modules_to_save copies, and the base weights PEFT saves with embedding LoRAs
    base = {k.replace(".base_layer.", "."): t for k, t in full.items() if ".base_layer." in k}
    plain = {k: t for k, t in full.items() if ".base_layer." not in k}
    plain_out = convert_state(plain, layout, from_side) if plain else {}
    for name, t in plain_out.items():
        out[PEFT_PREFIX + name] = t
    for name, t in (convert_state(base, layout, from_side) if base else {}).items():
        module, leaf = name.rsplit(".", 1)
        out[f"{PEFT_PREFIX}{module}.base_layer.{leaf}"] = t
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
    with atomic_folder(dst, overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in out.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(new_cfg, indent=2) + "\n", encoding="utf-8")
        for p in sorted(src.iterdir()):
            side_file = p.suffix in (".md", ".json", ".txt", ".model", ".jinja")
            if p.is_file() and p.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) and side_file:
                shutil.copy2(p, tmp / p.name)
    return dst
