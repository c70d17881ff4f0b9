"""The key map: one rule table lists every parameter of an original checkpoint and its native
counterpart(s), read in both directions.

Most rules are renames. Three kinds change tensors:
- the InternViT `attn.qkv` is split by rows into q/k/v and fused back;
- the InternLM2 `attention.wqkv` is split per KV group (rows viewed as `(kv_heads, groups + 2,
  head_dim)`: the first `groups` slots are queries, then K, then V) and fused back;
- Qwen3-MoE per-expert linears are stacked into transformers 5's fused expert tensors and unstacked back.
`original_to_hf_state_dict`, `hf_to_original_state_dict`, `original_key_to_hf` and `hf_key_to_original`
all use the same table, so the two directions are exact inverses.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache

import torch

from ...errors import CheckpointError
from .config import PathLike, llm_arch, original_llm_type


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
class Group:
    """Original tensors that become native tensors together (and back)."""

    kind: str
    original: tuple[str, ...]
    hf: tuple[str, ...]


@dataclass(frozen=True)
class Layout:
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


def layout_of(cfg: dict | Layout, path: PathLike | None = None) -> Layout:
    if isinstance(cfg, Layout):
        return cfg
    arch = llm_arch(cfg, path)
    original_llm_type(cfg, path)
    llm = cfg["llm_config"]
    heads = int(llm.get("num_attention_heads", 1))
    return Layout(
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


def _rules(layout: Layout) -> tuple[_Rule, ...]:
    if layout.internlm2:
        return _VISION_RULES + _INTERNLM2_RULES
    return _VISION_RULES + (_MOE_RULES if layout.moe else ()) + _PLAIN_LLM_RULES


def _make_group(rule: _Rule, fields: dict[str, str], layout: Layout) -> Group:
    fields = {k: v for k, v in fields.items() if k != "e"}
    original: list[str] = []
    for pattern in rule.original:
        if "{e}" in pattern:
            if layout.num_experts <= 0:
                raise CheckpointError("llm_config.num_experts is missing; cannot map the MoE expert weights")
            original += [pattern.format(e=e, **fields) for e in range(layout.num_experts)]
        else:
            original.append(pattern.format(**fields))
    return Group(rule.kind, tuple(original), tuple(p.format(**fields) for p in rule.hf))


def group_of_original(name: str, layout: Layout) -> Group | None:
    for rule in _rules(layout):
        for pattern in rule.original:
            m = _compile(pattern).match(name)
            if m:
                return _make_group(rule, m.groupdict(), layout)
    return None


def group_of_hf(name: str, layout: Layout) -> Group | None:
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
    group = group_of_original(name, layout_of(cfg))
    if group is None:
        raise CheckpointError(f"no mapping for original checkpoint key {name!r}")
    return list(group.hf)


def hf_key_to_original(name: str, cfg: dict) -> list[str]:
    """Original checkpoint key(s) of one native parameter name (fused tensors give one name)."""
    group = group_of_hf(name, layout_of(cfg))
    if group is None:
        raise CheckpointError(f"no mapping for native parameter {name!r}")
    return list(group.original)


def groups_of(names: Iterable[str], layout: Layout, side: str) -> tuple[dict[str, Group], list[str]]:
    """Group of every name (`side` 'original' or 'hf'), and the names no rule matches."""
    find = group_of_original if side == "original" else group_of_hf
    groups: dict[str, Group] = {}
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


def fuse_rows(group: Group, parts: list[torch.Tensor], layout: Layout) -> torch.Tensor:
    """Fuse q/k/v-like row blocks of a qkv group (also used on LoRA B matrices)."""
    if group.kind == "grouped_qkv":
        return fuse_grouped_qkv(*parts, layout.num_heads, layout.num_kv_heads)
    return torch.cat(parts, dim=0)


def split_rows_of(group: Group, t: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    if group.kind == "grouped_qkv":
        return list(split_grouped_qkv(t, layout.num_heads, layout.num_kv_heads))
    return _split_rows(t, 3, group.original[0])


def group_to_hf(group: Group, tensors: Mapping[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    src = [tensors[n] for n in group.original]
    if group.kind == "rename":
        return {group.hf[0]: src[0]}
    if group.kind in ("vision_qkv", "grouped_qkv"):
        return dict(zip(group.hf, split_rows_of(group, src[0], layout)))
    if group.kind == "experts_gate_up":
        n = layout.num_experts
        return {group.hf[0]: torch.cat([torch.stack(src[:n]), torch.stack(src[n:])], dim=1)}
    if group.kind == "experts_down":
        return {group.hf[0]: torch.stack(src)}
    raise AssertionError(group.kind)


def group_to_original(group: Group, tensors: Mapping[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    src = [tensors[n] for n in group.hf]
    if group.kind == "rename":
        return {group.original[0]: src[0]}
    if group.kind in ("vision_qkv", "grouped_qkv"):
        return {group.original[0]: fuse_rows(group, src, layout)}
    if group.kind == "experts_gate_up":
        fused = src[0]
        half = fused.shape[1] // 2
        gates = [x.clone() for x in fused[:, :half].unbind(0)]
        ups = [x.clone() for x in fused[:, half:].unbind(0)]
        return dict(zip(group.original, gates + ups))
    if group.kind == "experts_down":
        return dict(zip(group.original, [x.clone() for x in src[0].unbind(0)]))
    raise AssertionError(group.kind)


def convert_state(state: Mapping[str, torch.Tensor], layout: Layout, side: str) -> dict[str, torch.Tensor]:
    groups, unknown = groups_of(state, layout, side)
    if unknown:
        raise CheckpointError(f"{len(unknown)} key(s) have no mapping: {listing(unknown)}")
    out: dict[str, torch.Tensor] = {}
    done: set[Group] = set()
    for group in groups.values():
        if group in done:
            continue
        done.add(group)
        names = group.original if side == "original" else group.hf
        missing = [n for n in names if n not in state]
        if missing:
            raise CheckpointError(f"incomplete tensor group: {listing(missing)} missing")
        convert = group_to_hf if side == "original" else group_to_original
        out.update(convert(group, state, layout))
    return out


def original_to_hf_state_dict(state: Mapping[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """Original checkpoint tensors -> native `InternVLForConditionalGeneration` tensors."""
    return convert_state(state, layout_of(cfg), "original")


def hf_to_original_state_dict(state: Mapping[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """Native tensors -> original checkpoint tensors. `cfg` is the *original* config (it says whether a
    native Llama is an InternLM2)."""
    return convert_state(state, layout_of(cfg), "hf")

def head_key(layout: Layout) -> str:
    return "language_model.output.weight" if layout.internlm2 else "language_model.lm_head.weight"


def listing(names: Iterable[str], limit: int = 12) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
