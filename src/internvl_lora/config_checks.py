"""What a valid run config is: the checks `load_config` runs after the keys and types are read (one
message per problem, all of them at once), and the files they need with `check_paths`."""

from __future__ import annotations

import typing
from pathlib import Path

if typing.TYPE_CHECKING:
    from .config import RunConfig

PARTS = ("frozen", "lora", "full")
INITS = ("default", "gaussian", "pissa", "olora")
DUMMY_VISION = ("auto", "always", "never")
LOSS_REDUCTIONS = ("token", "sample", "square")


def _validate_objective(cfg: RunConfig) -> list[str]:
    p = []
    t, pref, pol = cfg.train, cfg.preference, cfg.policy
    if t.objective not in ("sft", "mpo"):
        return [f"train.objective must be sft or mpo, got {t.objective!r}"]
    if not (pref.beta > 0 and pref.beta == pref.beta):
        p.append(f"preference.beta must be a positive number, got {pref.beta}")
    weights = {k: getattr(pref, k) for k in ("sigmoid_weight", "bco_pair_weight", "sft_weight")}
    p += [f"preference.{k} must be >= 0, got {v}" for k, v in weights.items() if not v >= 0]
    if all(v == 0 for v in weights.values()):
        p.append("preference: all three loss weights are 0, nothing would be trained")
    if t.objective != "mpo":
        return p
    if "lora" not in (pol.llm, pol.vision):
        p.append("train.objective=mpo needs LoRA on the LLM or the vision tower (policy.llm=lora or policy.vision=lora): "
                 "the reference model is the model with its adapters disabled")
    if pol.init in ("pissa", "olora"):
        p.append(f"train.objective=mpo does not work with policy.init={pol.init}: it changes the base weights, so the "
                 "model with its adapters disabled is not the reference model; use policy.init=default or gaussian")
    if t.loss_reduction != "token":
        p.append("train.loss_reduction applies to the SFT objective; MPO's SFT term is the token mean of each chosen "
                 "answer, as the official recipe (leave train.loss_reduction=token)")
    return p


def _fsdp_settings(fsdp_config) -> dict:
    """train.fsdp_config as a mapping (read from its JSON / YAML file); {} when unreadable (reported where
    it is loaded)."""
    if isinstance(fsdp_config, dict):
        return fsdp_config
    try:
        import yaml

        loaded = yaml.safe_load(Path(fsdp_config).read_text())  # JSON is YAML
    except (OSError, ValueError, TypeError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def validate(cfg: RunConfig, check_paths: bool = True) -> list[str]:
    """Semantic checks; with check_paths, input files must exist."""
    p = []
    if not cfg.model.path:
        p.append("model.path is required: a checkpoint folder (e.g. a local copy of OpenGVLab/InternVL3-1B-hf)")
    elif check_paths and not Path(cfg.model.path).exists():
        p.append(f"model.path {cfg.model.path} does not exist (download the checkpoint first, e.g. "
                 "`huggingface-cli download OpenGVLab/InternVL3-8B-hf --local-dir models/InternVL3-8B-hf`)")
    if not cfg.data.meta:
        p.append("data.meta is required: a meta JSON file or a .jsonl annotation file")
    elif check_paths and not Path(cfg.data.meta).exists():
        p.append(f"data.meta {cfg.data.meta} does not exist")
    if cfg.data.eval_meta and check_paths and not Path(cfg.data.eval_meta).exists():
        p.append(f"data.eval_meta {cfg.data.eval_meta} does not exist")
    if not 0 <= cfg.data.eval_fraction < 1:
        p.append(f"data.eval_fraction must be in [0, 1), got {cfg.data.eval_fraction}")
    if cfg.data.eval_meta and cfg.data.eval_fraction:
        p.append("set data.eval_meta or data.eval_fraction, not both")
    p += _validate_objective(cfg)
    if cfg.data.truncation not in ("drop", "cut_text"):
        p.append(f"data.truncation must be drop or cut_text, got {cfg.data.truncation!r}")
    if cfg.data.alpha_background not in (None, "white"):
        p.append(f"data.alpha_background must be null or white, got {cfg.data.alpha_background!r}")
    if cfg.data.num_workers < 0:
        p.append("data.num_workers must be >= 0")
    if cfg.data.max_tokens_per_batch < 0:
        p.append(f"data.max_tokens_per_batch must be >= 0 (0: train.per_device_batch_size samples per micro-batch), "
                 f"got {cfg.data.max_tokens_per_batch}")
    elif 0 < cfg.data.max_tokens_per_batch < cfg.data.max_length:
        p.append(f"data.max_tokens_per_batch ({cfg.data.max_tokens_per_batch}) must be >= data.max_length "
                 f"({cfg.data.max_length}): a sample of data.max_length tokens must fit in a micro-batch")
    if cfg.model.dtype not in ("auto", "bfloat16", "float16", "float32"):
        p.append(f"model.dtype must be auto, bfloat16, float16 or float32, got {cfg.model.dtype!r}")
    pol = cfg.policy
    for part, allowed in (("vision", PARTS), ("projector", ("frozen", "full")), ("llm", PARTS)):
        v = getattr(pol, part)
        if v not in allowed:
            p.append(f"policy.{part} must be one of {', '.join(allowed)}, got {v!r}")
    if all(getattr(pol, part) == "frozen" for part in ("vision", "projector", "llm")):
        p.append("policy: every part is frozen, nothing would train")
    if pol.r < 1:
        p.append("policy.r must be >= 1")
    if pol.alpha is not None and pol.alpha <= 0:
        p.append("policy.alpha must be > 0 (or left empty for 2 * r)")
    if not 0 <= pol.dropout < 1:
        p.append("policy.dropout must be in [0, 1)")
    if pol.init not in INITS:
        p.append(f"policy.init must be one of {', '.join(INITS)}, got {pol.init!r}")
    if pol.llm_targets is not None and pol.llm != "lora":
        p.append(f"policy.llm_targets is set but policy.llm is {pol.llm!r} (targets apply to llm: lora)")
    if pol.vision_targets is not None and pol.vision != "lora":
        p.append(f"policy.vision_targets is set but policy.vision is {pol.vision!r} (targets apply to vision: lora)")
    for name in ("llm_targets", "vision_targets"):
        if getattr(pol, name) == []:
            p.append(f"policy.{name} is an empty list; leave it out for the defaults")
    t = cfg.train
    if t.per_device_batch_size < 1 or t.grad_accum < 1:
        p.append("train.per_device_batch_size and train.grad_accum must be >= 1")
    if t.lr <= 0:
        p.append("train.lr must be > 0")
    if not 0 <= t.warmup_ratio < 1:
        p.append("train.warmup_ratio must be in [0, 1)")
    if t.max_steps <= 0 and t.epochs <= 0:
        p.append("train.epochs must be > 0 (or set train.max_steps)")
    for name in ("logging_steps", "save_steps"):
        if getattr(t, name) < 1:
            p.append(f"train.{name} must be >= 1")
    for name in ("eval_steps", "generate_steps", "generate_samples", "generate_max_new_tokens", "save_total_limit",
                 "watchdog_lora_steps"):
        if getattr(t, name) < 0:
            p.append(f"train.{name} must be >= 0")
    if t.eval_batch_size is not None and t.eval_batch_size < 1:
        p.append("train.eval_batch_size must be >= 1")
    if t.watchdog_grad_norm <= 0:
        p.append("train.watchdog_grad_norm must be > 0")
    if t.checkpoint_layers != "auto" and (isinstance(t.checkpoint_layers, str) or not 0 <= t.checkpoint_layers <= 1):
        p.append(f"train.checkpoint_layers must be auto or a number in [0, 1], got {t.checkpoint_layers!r}")
    if t.liger and check_paths:  # the environment, like the input files
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            p.append("train.liger needs the liger-kernel package (pip install liger-kernel; GPU only)")
    if t.loss_reduction not in LOSS_REDUCTIONS:
        p.append(f"train.loss_reduction must be one of {', '.join(LOSS_REDUCTIONS)}, got {t.loss_reduction!r}")
    if t.dummy_vision not in DUMMY_VISION:
        p.append(f"train.dummy_vision must be one of {', '.join(DUMMY_VISION)}, got {t.dummy_vision!r}")
    if t.deepspeed and check_paths and not Path(t.deepspeed).exists():
        p.append(f"train.deepspeed {t.deepspeed} does not exist")
    if t.deepspeed and t.fsdp:
        p.append("train.deepspeed and train.fsdp are exclusive: choose one")
    if t.fsdp_config is not None and not t.fsdp:
        p.append("train.fsdp_config is set but train.fsdp is false")
    if isinstance(t.fsdp_config, str) and check_paths and not Path(t.fsdp_config).exists():
        p.append(f"train.fsdp_config {t.fsdp_config} does not exist")
    if t.fsdp and t.fsdp_config is not None and _fsdp_settings(t.fsdp_config).get("activation_checkpointing"):
        # accelerate's checkpoint wrapper renames the layers, and PEFT then finds none of the adapter's weights
        # in the gathered state dict: the saved adapters were empty (seen on an H100 with FSDP2).
        p.append("train.fsdp_config: activation_checkpointing: true cannot be used with LoRA (PEFT then saves empty "
                 "adapters); set it to false and use train.gradient_checkpointing=true, which recomputes the same layers")
    if (t.generate_steps or t.eval_steps) and not (cfg.data.eval_meta or cfg.data.eval_fraction):
        p.append("train.eval_steps / train.generate_steps need held-out data: set data.eval_meta or data.eval_fraction")
    if cfg.data.max_length < 16:
        p.append("data.max_length must be >= 16")
    return p


