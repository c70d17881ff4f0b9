"""Run configuration: small typed sections, read from YAML, overridden from the command line.

    internvl-lora train configs/seed_recipe.yaml train.lr=1e-4 data.max_length=4096

Unknown keys are rejected with a suggestion, every problem is reported at once, and the resolved
config is saved as `config.yaml` in the output folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError

PARTS = ("frozen", "lora", "full")


@dataclass
class ModelArgs:
    path: str = ""  # checkpoint folder (-hf or original format)
    template: str | None = None  # conversation template; default: from the checkpoint
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32 (auto: bf16 on a GPU that has it, else fp32)
    attn_implementation: str = "sdpa"  # sdpa | eager | flex_attention | flash_attention_2


@dataclass
class DataArgs:
    meta: str = ""  # meta JSON file (official format) or one .jsonl file
    eval_meta: str | None = None  # held-out meta or .jsonl for eval loss during training
    max_length: int = 8192  # tokens per sample after image expansion
    max_dynamic_patch: int | None = None  # max tiles per image; default: from the checkpoint
    truncation: str = "drop"  # drop: skip over-long samples (reported) | cut_text: cut text after the last image
    skip_invalid: bool = False  # train on the valid samples when the audit finds bad ones (counted, logged)
    max_image_pixels: int = 8192 * 8192  # larger images are rejected (decompression-bomb guard)
    video_sample: str = "rand"  # rand | middle | fpsX
    min_num_frames: int = 8
    max_num_frames: int = 32
    num_workers: int = 2  # data-loader worker processes


@dataclass
class PolicyArgs:
    """What trains, per part, and the LoRA settings."""

    vision: str = "frozen"  # frozen | lora | full
    projector: str = "frozen"  # frozen | full
    llm: str = "lora"  # frozen | lora | full
    r: int = 16
    alpha: int | None = None  # default 2 * r (the official recipe)
    dropout: float = 0.05
    llm_targets: list[str] | None = None  # module names in a decoder layer; default: per LLM architecture
    vision_targets: list[str] | None = None  # module names in a vision layer; default: attention + MLP
    use_dora: bool = False
    use_rslora: bool = False
    init: str = "default"  # default | gaussian | pissa | olora


@dataclass
class TrainArgs:
    output_dir: str = "runs/lora"
    per_device_batch_size: int = 4
    grad_accum: int = 2
    lr: float = 4e-5
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.05
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 2
    eval_steps: int = 0  # 0: evaluate only at the end (when data.eval_meta is set)
    deepspeed: str | None = None  # path of a DeepSpeed JSON config
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    resume: bool = False  # continue from the last checkpoint in output_dir
    group_by_length: bool = True
    watchdog: bool = True  # stop with a diagnosis on loss 0 / NaN, dead LoRA, exploding gradients


@dataclass
class RunConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    policy: PolicyArgs = field(default_factory=PolicyArgs)
    train: TrainArgs = field(default_factory=TrainArgs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_type(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_check_type(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(hint)
        return isinstance(value, list) and all(_check_type(v, inner) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _coerce_number(value, hint):
    """YAML 1.1 reads `4e-5` (no dot) as a string; accept it for numeric fields."""
    if isinstance(value, str) and hint in (float, int, float | None, int | None):
        try:
            return float(value) if hint in (float, float | None) else int(value)
        except ValueError:
            return value
    return value


def _build(cls, values: dict, prefix: str, problems: list[str]):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            problems.append(f"unknown key {prefix}{key}{hint}")
            continue
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                problems.append(f"{prefix}{key} must be a section (a mapping)")
                continue
            kwargs[key] = _build(hints[key], value, f"{prefix}{key}.", problems)
            continue
        value = _coerce_number(value, hints[key])
        if not _check_type(value, hints[key]):
            problems.append(f"{prefix}{key}: {value!r} is not of type {getattr(hints[key], '__name__', hints[key])}")
            continue
        kwargs[key] = float(value) if hints[key] is float else value
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=value` strings to a nested dict; values are parsed as YAML scalars (1e-4, true, [a, b])."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError([f"override {item!r} must look like section.key=value"], "command line")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate(cfg: RunConfig) -> list[str]:
    """Semantic checks that need no files opened beyond existence."""
    p = []
    if not cfg.model.path:
        p.append("model.path is required: a checkpoint folder (e.g. a local copy of OpenGVLab/InternVL3-1B-hf)")
    elif not Path(cfg.model.path).exists():
        p.append(f"model.path {cfg.model.path} does not exist")
    if not cfg.data.meta:
        p.append("data.meta is required: a meta JSON file or a .jsonl annotation file")
    elif not Path(cfg.data.meta).exists():
        p.append(f"data.meta {cfg.data.meta} does not exist")
    if cfg.data.eval_meta and not Path(cfg.data.eval_meta).exists():
        p.append(f"data.eval_meta {cfg.data.eval_meta} does not exist")
    if cfg.data.truncation not in ("drop", "cut_text"):
        p.append(f"data.truncation must be drop or cut_text, got {cfg.data.truncation!r}")
    if cfg.model.dtype not in ("auto", "bfloat16", "float16", "float32"):
        p.append(f"model.dtype must be auto, bfloat16, float16 or float32, got {cfg.model.dtype!r}")
    for part, allowed in (("vision", PARTS), ("projector", ("frozen", "full")), ("llm", PARTS)):
        v = getattr(cfg.policy, part)
        if v not in allowed:
            p.append(f"policy.{part} must be one of {', '.join(allowed)}, got {v!r}")
    if all(getattr(cfg.policy, part) == "frozen" for part in ("vision", "projector", "llm")):
        p.append("policy: every part is frozen, nothing would train")
    if cfg.policy.r < 1:
        p.append("policy.r must be >= 1")
    if not 0 <= cfg.policy.dropout < 1:
        p.append("policy.dropout must be in [0, 1)")
    if cfg.policy.init not in ("default", "gaussian", "pissa", "olora"):
        p.append(f"policy.init must be default, gaussian, pissa or olora, got {cfg.policy.init!r}")
    t = cfg.train
    if t.per_device_batch_size < 1 or t.grad_accum < 1:
        p.append("train.per_device_batch_size and train.grad_accum must be >= 1")
    if t.lr <= 0:
        p.append("train.lr must be > 0")
    if t.max_steps <= 0 and t.epochs <= 0:
        p.append("train.epochs must be > 0 (or set train.max_steps)")
    if t.deepspeed and not Path(t.deepspeed).exists():
        p.append(f"train.deepspeed {t.deepspeed} does not exist")
    if cfg.data.max_length < 16:
        p.append("data.max_length must be >= 16")
    return p


def load_config(path: str | Path | None, overrides: list[str] | None = None, check: bool = True) -> RunConfig:
    raw: dict = {}
    source = str(path) if path else "command line"
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError([f"{path} does not exist"], source) from None
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], source) from None
        if not isinstance(raw, dict):
            raise ConfigError(["the top level must be a mapping with sections model, data, policy, train"], source)
        # Input paths in a config file may be relative to the file; output_dir is relative to the working folder.
        base = Path(path).resolve().parent
        for section, key in (("model", "path"), ("data", "meta"), ("data", "eval_meta"), ("train", "deepspeed")):
            sec = raw.get(section)
            v = sec.get(key) if isinstance(sec, dict) else None
            if isinstance(v, str) and v and not Path(v).is_absolute() and (base / v).exists():
                sec[key] = str(base / v)
    raw = _merge(raw, parse_overrides(overrides or []))
    problems: list[str] = []
    cfg = _build(RunConfig, raw, "", problems)
    if check:
        problems += validate(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
