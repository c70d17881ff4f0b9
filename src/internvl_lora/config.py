"""Run configuration: small typed sections, read from YAML, overridden from the command line.

    internvl-lora train configs/seed_recipe.yaml train.lr=1e-4 data.max_length=4096

Unknown keys are rejected with a suggestion, every problem is reported at once, and the resolved
config is saved as `config.yaml` in the output folder. `docs/training.md` lists every field; the
comment after each field below is its documentation (`reference()` renders them).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config_checks import validate
from .config_keys import legacy_train_keys, suggest
from .errors import ConfigError
from .overrides import blame_overrides, parse_overrides



@dataclass
class ModelArgs:
    path: str = ""  # checkpoint folder (-hf or original format), e.g. a local download of OpenGVLab/InternVL3-8B-hf
    template: str | None = None  # conversation template; default: from the checkpoint
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32 (auto: bf16 on a GPU that has it, else fp32)
    attn_implementation: str = "sdpa"  # sdpa | eager | flex_attention | flash_attention_2


@dataclass
class DataArgs:
    meta: str = ""  # meta JSON file (official format) or one .jsonl file
    eval_meta: str | None = None  # held-out meta or .jsonl: eval loss during training (and generation metrics)
    eval_fraction: float = 0.0  # without eval_meta: hold out this fraction of the training samples (deterministic, by seed)
    max_length: int = 8192  # tokens per sample after image expansion
    max_dynamic_patch: int | None = None  # max tiles per image; default: from the checkpoint
    truncation: str = "drop"  # drop: skip over-long samples (reported) | cut_text: cut text after the last image
    skip_invalid: bool = False  # train on the valid samples when the audit finds bad ones (counted, logged)
    max_image_pixels: int = 8192 * 8192  # larger images are rejected (decompression-bomb guard)
    video_sample: str = "rand"  # rand | middle | fpsX
    min_num_frames: int = 8  # fewest frames sampled from a video
    max_num_frames: int = 32  # most frames sampled from a video
    num_workers: int = 2  # data-loader worker processes
    packing: bool = True  # each micro-batch in one row, no padding: varlen attention, loss on trained positions only
    max_tokens_per_batch: int = 0  # > 0: micro-batches filled to this many tokens (bin packing by length) instead of train.per_device_batch_size samples
    jpeg_draft: bool = False  # decode JPEGs at reduced scale when shrunk 2x or more (faster; ~1/255 pixel difference)
    fast_resize: bool = False  # resize in torch's uint8 bicubic kernel instead of PIL's (faster; pixels not bit-identical to the official ones)
    exif_transpose: bool = False  # turn images upright by their EXIF orientation (official: pixels used as stored)
    alpha_background: str | None = None  # null: transparency dropped as the official convert("RGB") | white: composited on white


@dataclass
class PolicyArgs:
    """What trains, per part, and the LoRA settings."""

    vision: str = "frozen"  # frozen | lora | full
    projector: str = "frozen"  # frozen | full
    llm: str = "lora"  # frozen | lora | full
    r: int = 16  # LoRA rank
    alpha: int | None = None  # LoRA alpha; default 2 * r (the official recipe)
    dropout: float = 0.05  # LoRA dropout
    llm_targets: list[str] | None = None  # module names in a decoder layer; default: per LLM architecture
    vision_targets: list[str] | None = None  # module names in a vision layer; default: attention + MLP
    use_dora: bool = False  # DoRA (weight-decomposed LoRA)
    use_rslora: bool = False  # rsLoRA scaling alpha / sqrt(r) instead of alpha / r
    init: str = "default"  # default | gaussian | pissa | olora (pissa/olora: the saved adapter is converted to apply on the original base)


@dataclass
class TrainArgs:
    output_dir: str = "runs/lora"  # run folder: checkpoints, logs, the final adapter
    objective: str = "sft"  # sft: supervised records | mpo: preference pairs (question / chosen / rejected), the loss of the preference section
    per_device_batch_size: int = 4  # samples per GPU per micro-batch
    grad_accum: int = 2  # micro-batches per optimizer step (global batch = per_device_batch_size x grad_accum x GPUs)
    lr: float = 4e-5  # peak learning rate
    lr_scheduler: str = "cosine"  # any transformers scheduler name: cosine | linear | constant_with_warmup ...
    warmup_ratio: float = 0.03  # fraction of the optimizer steps with linear warmup
    weight_decay: float = 0.05  # AdamW weight decay
    epochs: float = 1.0  # passes over the training data
    max_steps: int = -1  # > 0 overrides epochs
    max_grad_norm: float = 1.0  # gradient clipping
    gradient_checkpointing: bool = True  # activation checkpointing (non-reentrant) in the LLM and the vision tower
    checkpoint_layers: float | str = "auto"  # with gradient_checkpointing: share of the LLM's decoder layers recomputed (evenly spread; 1 all, 0.5 every other) | auto: as few as the GPU's free memory allows for the longest micro-batch (all off a GPU)
    fused: bool = True  # the fused training paths: LoRA layers as one autograd node (dropout in Triton kernels on a GPU), SwiGLU MLPs keeping gate and up, the loss's logits in chunks (same numbers, less memory; not under ZeRO-3 / FSDP); false: PEFT's own path, for comparison
    liger: bool = False  # Liger kernels (RMSNorm, SwiGLU, RoPE) in the LLM; needs liger-kernel and a GPU
    loss_reduction: str = "token"  # token: token mean over the global batch | sample: 1/n per sample's n trained tokens | square: 1/sqrt(n) (official)
    seed: int = 42  # seeds LoRA init, data order, dropout and the eval_fraction split
    logging_steps: int = 10  # optimizer steps per log line / metrics.jsonl record
    save_steps: int = 200  # optimizer steps per checkpoint
    save_total_limit: int = 2  # checkpoints kept (older ones are deleted once a newer one is complete)
    eval_steps: int = 0  # eval loss every N optimizer steps; 0: only at the end (when there is a held-out split)
    eval_batch_size: int | None = None  # per-device eval batch; default: per_device_batch_size
    generate_steps: int = 0  # greedy generation on held-out samples every N steps (exact match, ANLS, ROUGE-L); 0: off
    generate_samples: int = 32  # held-out samples used by the generation metric
    generate_max_new_tokens: int = 32  # answer length limit for the generation metric
    deepspeed: str | None = None  # path of a DeepSpeed JSON config (configs/deepspeed/zero{1,2,3}.json)
    fsdp: bool = False  # PyTorch FSDP (launch with torchrun); settings in fsdp_config
    fsdp_config: dict | str | None = None  # FSDP settings (transformers TrainingArguments.fsdp_config): a mapping or a JSON path
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard | wandb | mlflow ... ([] for none)
    resume: bool = False  # continue from the last complete checkpoint in output_dir
    overwrite: bool = False  # start over in an output_dir that holds an earlier run (its adapter, checkpoints and metrics are deleted); without it (or resume) such a run is refused
    group_by_length: bool = True  # batches of similar length (less padding), lengths from the data audit
    dummy_vision: str = "auto"  # run the vision tower on a blank tile for text-only batches: auto (when distributed) | always | never
    watchdog: bool = True  # stop with a diagnosis on loss 0 / NaN, batches with no trained token, dead LoRA, exploding gradients
    watchdog_lora_steps: int = 5  # optimizer steps after which LoRA B matrices must have left zero
    watchdog_grad_norm: float = 1e4  # gradient norm treated as exploding (3 log intervals in a row, or once if not finite)


@dataclass
class PreferenceArgs:
    """train.objective=mpo: the official MPO loss (docs/preference.md); defaults are the official recipe's."""

    beta: float = 0.1  # scale of the rewards beta * (log p_policy - log p_reference)
    sigmoid_weight: float = 0.8  # weight of the DPO sigmoid term
    bco_pair_weight: float = 0.2  # weight of the BCO pair term (with its running reward mean)
    sft_weight: float = 1.0  # weight of the SFT term: token-mean NLL of the chosen answer (the official rpo_alpha)


@dataclass
class RunConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    policy: PolicyArgs = field(default_factory=PolicyArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    preference: PreferenceArgs = field(default_factory=PreferenceArgs)

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
            problems.append(f"unknown key {prefix}{key}{suggest(str(key), prefix, names, RunConfig)}")
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


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None, check: bool = True) -> RunConfig:
    """Read a YAML config, apply `section.key=value` overrides, check types and values.

    check=False skips the checks that need files (model.path, data.meta, ... must exist) but still
    rejects unknown keys, wrong types and impossible values.
    """
    raw: dict = {}
    source = str(path) if path else "command line"
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError([f"{path} does not exist"], source) from None
        except IsADirectoryError:
            raise ConfigError([f"{path} is a folder; give a YAML config file"], source) from None
        except UnicodeDecodeError as e:
            raise ConfigError([f"not a text file (byte {e.start} is not UTF-8); give a YAML config file"],
                              source) from None
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], source) from None
        if not isinstance(raw, dict):
            raise ConfigError(["the top level must be a mapping with sections model, data, policy, train"], source)
        # Input paths in a config file may be relative to the file; output_dir is relative to the working folder.
        base = Path(path).resolve().parent
        for section, key in (("model", "path"), ("data", "meta"), ("data", "eval_meta"), ("train", "deepspeed"),
                             ("train", "fsdp_config")):
            sec = raw.get(section)
            v = sec.get(key) if isinstance(sec, dict) else None
            if isinstance(v, str) and v and not Path(v).is_absolute() and (base / v).exists():
                sec[key] = str(base / v)
    extra, origin = parse_overrides(overrides or [])
    raw = _merge(raw, extra)
    problems: list[str] = []
    notices = legacy_train_keys(raw["train"], problems) if isinstance(raw.get("train"), dict) else []
    cfg = _build(RunConfig, raw, "", problems)
    problems += validate(cfg, check_paths=check)
    if problems:
        problems, from_overrides = blame_overrides(problems, origin)
        raise ConfigError(problems, "command line" if from_overrides else source)
    if notices:
        from .distributed import print0

        for line in notices:
            print0(line)
    return cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    d = cfg.to_dict()  # every path saved absolute: the file reruns from any working folder
    for sec, key in (("model", "path"), ("data", "meta"), ("data", "eval_meta"), ("train", "deepspeed"),
                     ("train", "fsdp_config"), ("train", "output_dir")):
        d[sec][key] = str(Path(d[sec][key]).resolve()) if isinstance(d[sec][key], str) and d[sec][key] else d[sec][key]
    Path(path).write_text(yaml.safe_dump(d, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _field_docs(cls) -> dict[str, str]:
    """The trailing comment of each field in the dataclass source: the field's documentation."""
    docs = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?  # (.*)$", line)
        if m:
            docs[m.group(1)] = m.group(2).strip()
    return docs


def reference() -> str:
    """Every config field as a Markdown table per section (name, type, default, meaning)."""
    out = []
    defaults = RunConfig()
    for section in dataclasses.fields(RunConfig):
        cls = typing.get_type_hints(RunConfig)[section.name]
        docs = _field_docs(cls)
        out += [f"### `{section.name}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            value = getattr(getattr(defaults, section.name), f.name)
            type_name = str(hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
            default = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            cells = [f"`{section.name}.{f.name}`", type_name, f"`{default}`", docs.get(f.name, "")]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out.append("")
    return "\n".join(out)
