"""Train LoRA adapters on an InternVL checkpoint.

    internvl-lora train CONFIG.yaml [section.key=value ...]
    torchrun --nproc_per_node 2 -m internvl_lora.cli train CONFIG.yaml      # DDP
    internvl-lora train CONFIG.yaml train.deepspeed=configs/deepspeed/zero1.json

Steps: validate the config, audit the data (refuse on errors unless data.skip_invalid), load the
model, apply the per-part policy, train with the HF Trainer, save adapter-only checkpoints and the
final adapter folder `OUTPUT/adapter`, which describes itself (base path, template, tiling settings,
policy) so merge, chat and validate need only that path.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from .callbacks import LogLine, LossCurve, StepStats, TrainingHealthError, Watchdog
from .config import RunConfig, save_config
from .data.audit import audit, format_report
from .data.dataset import PadCollator, SupervisedDataset
from .data.encode import EncodeSettings
from .data.records import load_meta
from .errors import UserError
from .internvl.checkpoint import CheckpointInfo, inspect_checkpoint, load_model, load_tokenizer
from .lora import apply_policy, format_table, trainable_table

RUN_META = "internvl_lora.json"


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args) -> None:
    if is_main():
        print(*args, flush=True)


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def encode_settings(cfg: RunConfig, info: CheckpointInfo) -> EncodeSettings:
    d = cfg.data
    return EncodeSettings.from_checkpoint(
        info, template=cfg.model.template, max_length=d.max_length, max_dynamic_patch=d.max_dynamic_patch,
        truncation=d.truncation, max_image_pixels=d.max_image_pixels, video_sample=d.video_sample,
        min_num_frames=d.min_num_frames, max_num_frames=d.max_num_frames,
    )


def fingerprint(paths: list[str]) -> str:
    """sha256 over the annotation files' bytes (images are not hashed)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def run_metadata(cfg: RunConfig, info: CheckpointInfo, settings: EncodeSettings, data_fp: str) -> dict:
    import peft
    import transformers

    return {
        "base_model": str(Path(cfg.model.path).resolve()),
        "base_format": info.format,
        "template": settings.template.name,
        "encode": {k: getattr(settings, k) for k in (
            "tile_size", "tokens_per_tile", "max_dynamic_patch", "min_dynamic_patch", "use_thumbnail",
            "dynamic_image_size", "normalize_type", "max_length")},
        "policy": cfg.to_dict()["policy"],
        "dataset_fingerprint": data_fp,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }


class InternVLTrainer(Trainer):
    """The HF Trainer with three small additions: counters for the log line, the KV cache forced off
    (a cache would also defeat packed attention), and length grouping from the audit's lengths instead
    of decoding every sample."""

    def __init__(self, *args, stats: StepStats, lengths: list[int] | None = None, **kw):
        super().__init__(*args, **kw)
        self.stats, self.lengths = stats, lengths

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.stats.add(inputs)
        return super().compute_loss(model, {**inputs, "use_cache": False}, return_outputs, num_items_in_batch)

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy == "group_by_length" and self.lengths:
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=self.lengths)
        return super()._get_train_sampler(train_dataset)


def prepare_data(cfg: RunConfig, tokenizer, settings: EncodeSettings, meta: str, train: bool):
    specs = load_meta(meta)
    result = audit(specs, tokenizer, settings)
    print0(format_report(result))
    if result.problems:
        if not cfg.data.skip_invalid:
            raise UserError(
                f"the data audit of {meta} found {len(result.problems)} bad sample(s) (listed above); fix them, "
                "or set data.skip_invalid=true to train on the valid ones (they are counted and logged)")
        print0(f"skipping {len(result.problems)} invalid sample(s) (data.skip_invalid=true)")
    if not result.valid:
        raise UserError(f"{meta}: no valid sample to train on")
    return SupervisedDataset(result, tokenizer, settings, train=train, seed=cfg.train.seed), result, specs


def train(cfg: RunConfig) -> Path:
    t_start = time.time()
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_main():
        save_config(cfg, out / "config.yaml")
    info = inspect_checkpoint(cfg.model.path)
    tokenizer = load_tokenizer(cfg.model.path)
    settings = encode_settings(cfg, info)
    print0(f"checkpoint {cfg.model.path}: format {info.format}, template {settings.template.name}, "
           f"tile {settings.tile_size}px x {settings.tokens_per_tile} tokens, max {settings.max_dynamic_patch} tiles")
    train_ds, train_audit, specs = prepare_data(cfg, tokenizer, settings, cfg.data.meta, train=True)
    eval_ds = None
    if cfg.data.eval_meta:
        eval_ds, _, _ = prepare_data(cfg, tokenizer, settings, cfg.data.eval_meta, train=False)
    data_fp = fingerprint([s.annotation for s in specs])

    dtype = resolve_dtype(cfg.model.dtype)
    model = load_model(cfg.model.path, dtype=dtype)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    model.set_attn_implementation(cfg.model.attn_implementation)
    model = apply_policy(model, cfg.policy, info.llm_type)
    table = trainable_table(model)
    print0(format_table(table, cfg.policy))
    meta = run_metadata(cfg, info, settings, data_fp)
    meta["trainable"] = table
    if is_main():
        (out / RUN_META).write_text(json.dumps(meta, indent=2) + "\n")

    t = cfg.train
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out / "tensorboard"))
    use_bf16 = dtype == torch.bfloat16
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay, num_train_epochs=t.epochs, max_steps=t.max_steps, max_grad_norm=t.max_grad_norm,
        bf16=use_bf16, fp16=dtype == torch.float16, gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        seed=t.seed, data_seed=t.seed, logging_steps=t.logging_steps, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy=("steps" if t.eval_steps > 0 else "no") if eval_ds is not None else "no",
        eval_steps=t.eval_steps if t.eval_steps > 0 else None, deepspeed=t.deepspeed, report_to=t.report_to,
        dataloader_num_workers=cfg.data.num_workers, dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False, disable_tqdm=True,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        ddp_find_unused_parameters=False,
    )
    stats = StepStats()
    log = LogLine(stats, out, print_fn=print0)
    watchdog = Watchdog(stats, model) if t.watchdog else None
    callbacks = [log, LossCurve(log, out)] + ([watchdog] if watchdog else [])
    trainer = InternVLTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=PadCollator(tokenizer.pad_token_id), callbacks=callbacks,
        stats=stats, lengths=train_ds.lengths,
    )
    resume = None
    if t.resume:
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(str(out))
        print0(f"resuming from {resume}" if resume else "no checkpoint to resume from; starting fresh")
    trainer.train(resume_from_checkpoint=resume)
    if watchdog and watchdog.diagnosis:
        raise TrainingHealthError(f"training stopped by the loss-health watchdog: {watchdog.diagnosis}")
    if eval_ds is not None:
        metrics = trainer.evaluate()
        log.on_log(args, trainer.state, trainer.control, logs=metrics)
    adapter_dir = out / "adapter"
    trainer.save_model(str(adapter_dir))
    if is_main():
        tokenizer.save_pretrained(adapter_dir)
        for name in ("preprocessor_config.json", "generation_config.json"):
            if (Path(cfg.model.path) / name).exists():
                (adapter_dir / name).write_bytes((Path(cfg.model.path) / name).read_bytes())
        meta["train_seconds"] = round(time.time() - t_start, 1)
        meta["global_step"] = trainer.state.global_step
        meta["final_loss"] = next((r["loss"] for r in reversed(log.history) if "loss" in r), None)
        (adapter_dir / RUN_META).write_text(json.dumps(meta, indent=2) + "\n")
        save_config(cfg, adapter_dir / "config.yaml")
        LossCurve(log, out).on_save(args, trainer.state, trainer.control)
        print0(f"adapter saved to {adapter_dir}")
    return adapter_dir
