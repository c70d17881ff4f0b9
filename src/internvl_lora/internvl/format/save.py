"""Writing checkpoints: `save_original` (a merged model in a source checkpoint's original layout) and
`convert_checkpoint` (a whole folder between the original and the -hf layout). Every folder is written
to a temporary folder next to the target and renamed at the end (`atomic_folder`).
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError
from .config import PathLike, merged_config, read_json, read_original_config_unchecked
from .config_map import hf_config_to_original, original_config_to_hf, preprocessor_config
from .keymap import Group, Layout, group_to_original, groups_of, head_key, layout_of, listing
from .load import empty_model, is_lora_name, load_original_model
from .safetensors import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, dtype_of, read_safetensors_header
from .tokenizer import load_original_tokenizer


# Files `save_original` copies from the source checkpoint (besides `*.py`).
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja",
)
SIDE_FILES = ("generation_config.json", "preprocessor_config.json")
# Where `--to hf` keeps the original checkpoint's remote code (`*.py`), so that `--to original` can put it
# back: the official code loads an original checkpoint only through that code (trust_remote_code).
ORIGINAL_CODE_DIR = "original_code"

@contextmanager
def atomic_folder(out: Path, overwrite: bool) -> Iterator[Path]:
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

def _file_plan(state: Mapping[str, torch.Tensor], layout: Layout, tied: bool, dtype: torch.dtype | None,
               max_shard_bytes: int) -> dict[str, str]:
    """`{original key: file}` in transformers' naming: one `model.safetensors` if it fits in
    `max_shard_bytes`, else `model-0000i-of-0000n.safetensors`. A tied output head is not written."""
    groups, unknown = groups_of(state, layout, "hf")
    if unknown:
        raise CheckpointError(f"the model has weights the original format has no name for: {listing(unknown)}")
    sizes: dict[str, int] = {}
    for group in set(groups.values()):
        element = torch.empty((), dtype=dtype or state[group.hf[0]].dtype).element_size()
        numel = sum(state[h].numel() for h in group.hf)
        for o in group.original:
            sizes[o] = numel // len(group.original) * element
    if tied:
        sizes.pop(head_key(layout), None)
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


def _write_original_weights(state: Mapping[str, torch.Tensor], layout: Layout, out: Path,
                            file_of: dict[str, str], dtype: torch.dtype | None) -> None:
    """Write native `state` as original tensors, `file_of` giving each original key's file (one file in
    memory at a time), plus `model.safetensors.index.json` when there are several files."""
    from safetensors.torch import save_file

    groups, _ = groups_of(state, layout, "hf")
    by_original = {o: g for g in set(groups.values()) for o in g.original}
    files: dict[str, list[str]] = {}
    for name, file in file_of.items():
        files.setdefault(file, []).append(name)
    total = 0
    for file, names in sorted(files.items()):
        tensors: dict[str, torch.Tensor] = {}
        converted: dict[Group, dict[str, torch.Tensor]] = {}
        seen: set[int] = set()
        for name in sorted(names):
            group = by_original[name]
            if group not in converted:
                converted[group] = group_to_original(group, state, layout)
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
        raise CheckpointError(f"the model still holds LoRA layers ({listing(lora, 3)}); merge them first")
    meta = [k for k, v in state.items() if v.device.type == "meta"]
    if meta:
        raise CheckpointError(f"the model has weights on the meta device ({listing(meta, 3)}); load it fully first")
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
    layout = layout_of(cfg, source)
    state = _plain_state_dict(model)
    target_dtype = dtype_of(dtype) if dtype is not None else dtype_of(cfg.get("torch_dtype"))

    # The model must be the one the source config describes: same parameter names and shapes.
    new_cfg = merged_config(cfg)
    expected_cfg = original_config_to_hf(new_cfg, source, image_token_id=getattr(model.config, "image_token_id", None))
    expected = empty_model(expected_cfg).state_dict()
    wrong = sorted(set(state) ^ set(expected)) + [
        f"{k} {tuple(v.shape)} (config: {tuple(expected[k].shape)})"
        for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise CheckpointError(f"{source / 'config.json'}: the model does not match this config: {listing(wrong, 6)}")

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    plan = _file_plan(state, layout, tied, target_dtype, max_shard_size)
    source_keys = _source_key_names(source)
    if source_keys is not None and any(is_lora_name(n) for n in source_keys):
        source_keys = None  # an unmerged LoRA checkpoint: its names are not the merged model's
    if source_keys is not None:
        file_of = source_keys
        produced = set(plan) | {head_key(layout)}  # the head may be stored even when tied
        if head_key(layout) not in file_of:
            produced.discard(head_key(layout))
        missing, extra = sorted(set(file_of) - produced), sorted(produced - set(file_of))
        if missing or extra:
            raise CheckpointError(
                f"{source}: the model's weights do not match the source checkpoint's names "
                f"(missing: {listing(missing, 5) or 'none'}; not in the source: {listing(extra, 5) or 'none'})"
            )
    else:
        file_of = plan

    with atomic_folder(Path(out_path), overwrite) as tmp:
        _write_original_weights(state, layout, tmp, file_of, target_dtype)
        _write_json(tmp / "config.json", new_cfg)
        _copy_side_files(source, tmp, skip=("config.json",))
    return Path(out_path)


def _source_key_names(source: Path) -> dict[str, str] | None:
    """`{original key: file name}` of a source checkpoint; None if it holds no weights."""
    index = source / WEIGHTS_INDEX_NAME
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no `weight_map`")
        return dict(weight_map)
    single = source / WEIGHTS_NAME
    if single.is_file():
        return {n: WEIGHTS_NAME for n in read_safetensors_header(single)}
    return None
def _code_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.py") if p.is_file()) if folder.is_dir() else []


def convert_checkpoint(src: PathLike, dst: PathLike, to: str, *, reference_original: PathLike | None = None,
                       dtype: torch.dtype | str | None = None, overwrite: bool = False,
                       without_code: bool = False) -> Path:
    """Convert a checkpoint folder between the original and the -hf layout.

    * `to="hf"`: `src` is original. Writes config.json, model.safetensors (transformers' own sharding),
      the tokenizer as tokenizer.json (built without remote code), generation_config.json and a
      preprocessor_config.json from the original tiling settings. dtype: the source's `torch_dtype`.
      The source's `*.py` (remote code) are kept in `original_code/`, for the way back.
    * `to="original"`: `src` is -hf. With `reference_original` (an original checkpoint of the same model:
      config + `*.py`, weights optional) the output copies its config, code and tokenizer files and its shard
      layout (`save_original`). Without it, an original config is built from the -hf config
      (`hf_config_to_original`, not possible for InternLM2 models), the tokenizer files of `src` are copied,
      and so is the code kept in `src/original_code/` by an earlier `to="hf"`. With no code there, the
      conversion is refused (the official code could not load the result) unless `without_code`: then the
      folder has weights, config and tokenizer only (loadable here, not by the official code).
    """
    from transformers import InternVLForConditionalGeneration

    src, dst = Path(src), Path(dst)
    if to not in ("hf", "original"):
        raise CheckpointError(f"--to {to!r}: choose 'hf' or 'original'")
    cfg = read_json(src / "config.json")
    kind = cfg.get("model_type") if isinstance(cfg, dict) else None
    if to == "hf":
        if kind != "internvl_chat":
            raise CheckpointError(
                f"{src / 'config.json'}: model_type {kind!r} is not an original checkpoint ('internvl_chat')"
            )
        target = dtype_of(dtype) or dtype_of(cfg.get("torch_dtype")) or torch.float32
        tokenizer = load_original_tokenizer(src)
        model = load_original_model(src, dtype=target, tokenizer=tokenizer)
        if cfg.get("template"):
            model.config.template = cfg["template"]  # -hf configs have no template; keep the original's
        with atomic_folder(dst, overwrite) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(cfg), indent=2) + "\n")
            code = _code_files(src)
            if code:
                (tmp / ORIGINAL_CODE_DIR).mkdir()
                for p in code:
                    shutil.copy2(p, tmp / ORIGINAL_CODE_DIR / p.name)
        return dst

    if kind != "internvl":
        raise CheckpointError(f"{src / 'config.json'}: model_type {kind!r} is not an -hf checkpoint ('internvl')")
    code = _code_files(src / ORIGINAL_CODE_DIR)
    if reference_original is None and not code and not without_code:
        raise CheckpointError(
            f"{src}: no original remote code (*.py) to write with the converted checkpoint (no "
            f"{ORIGINAL_CODE_DIR}/ folder: the folder was not made by `internvl-lora convert --to hf`), and the "
            "official InternVL code loads an original checkpoint only through it; pass --reference "
            "ORIGINAL_CHECKPOINT (an original release of the same model: its config.json and *.py files, weights "
            "not needed), or --without-code to write weights, config and tokenizer only (loadable by "
            "internvl-lora, not by the official code)")
    model = InternVLForConditionalGeneration.from_pretrained(src, dtype=dtype_of(dtype) or "auto")
    if reference_original is not None:
        return save_original(model, reference_original, dst, dtype=dtype, overwrite=overwrite)
    proc = src / "preprocessor_config.json"
    proc_cfg = read_json(proc) if proc.is_file() else {}
    torch_dtype = str(dtype_of(dtype) or model.dtype).replace("torch.", "")
    original_cfg = hf_config_to_original(
        model.config, torch_dtype=torch_dtype,
        max_dynamic_patch=int(proc_cfg.get("max_patches", 12)),
        min_dynamic_patch=int(proc_cfg.get("min_patches", 1)),
        dynamic_image_size=bool(proc_cfg.get("crop_to_patches", True)),
    )
    layout = layout_of(original_cfg)
    state = _plain_state_dict(model)
    target = dtype_of(dtype)
    file_of = _file_plan(state, layout, bool(model.config.tie_word_embeddings), target, 5 * 1024**3)
    with atomic_folder(dst, overwrite) as tmp:
        _write_original_weights(state, layout, tmp, file_of, target)
        _write_json(tmp / "config.json", original_cfg)
        _copy_side_files(src, tmp, skip=("config.json", "preprocessor_config.json"))
        for p in code:
            shutil.copy2(p, tmp / p.name)
    return dst
