"""Train LoRA adapters on an InternVL checkpoint.

    internvl-lora train CONFIG.yaml [section.key=value ...]
    torchrun --nproc_per_node 2 -m internvl_lora.cli train CONFIG.yaml      # DDP
    torchrun --nproc_per_node 2 -m internvl_lora.cli train CONFIG.yaml train.deepspeed=configs/deepspeed/zero1.json
    internvl-lora train CONFIG.yaml train.resume=true                      # continue after an interruption

Steps: validate the config, audit the data (refuse on errors unless data.skip_invalid), load the
model, apply the per-part policy, train with the HF Trainer, save adapter-only checkpoints and the
final adapter folder `OUTPUT/adapter`, which describes itself (base path, template, tiling settings,
policy) so merge, chat and validate need only that path. docs/training.md describes the output folder.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch
from transformers.trainer_callback import PrinterCallback

from ..config import RunConfig, save_config
from ..data.audit import audit, audit_workers, format_report
from ..data.collate import data_collator
from ..data.dataset import PreferenceDataset, SupervisedDataset
from ..data.encode import EncodeSettings
from ..data.meta import load_meta
from ..distributed import is_main, print0, world_size
from ..errors import CheckpointSaveError, UserError
from ..internvl.checkpoint import CheckpointInfo, inspect_checkpoint, load_model, load_tokenizer
from ..internvl.embed import image_tokens_checked_on_the_gpu
from ..lora.policy import MUTATING_INITS, apply_policy, format_table, is_peft, save_initial_adapter, trainable_table
from ..run_dir import (
    INIT_ADAPTER, RUN_META, check_output_dir, check_resume_compatible, check_resume_state, clear_earlier_run, earlier_run,
    find_resume_checkpoint, fingerprint, last_complete_checkpoint, read_json, resolve_dtype, resume_command,
    run_metadata, save_final, write_json,
)
from .callbacks import LogLine, LossCurve, StepStats, TrainingHealthError, Watchdog
from .generation_eval import GenerationEval, generation_samples
from .preference import PreferenceObjective, PreferenceState
from .speed import backend_switches_restored, check_packing, register_varlen_attention, set_attention, speed_options
from .trainer import (
    InternVLTrainer, _CheckpointShare, _KernelWarmUp, sharded_weights, training_arguments, use_tensorboard_dir, zero_stage,
)

__all__ = ["train", "TrainingHealthError", "CheckpointSaveError"]


def encode_settings(cfg: RunConfig, info: CheckpointInfo) -> EncodeSettings:
    d = cfg.data
    return EncodeSettings.from_checkpoint(
        info, template=cfg.model.template, max_length=d.max_length, max_dynamic_patch=d.max_dynamic_patch,
        truncation=d.truncation, max_image_pixels=d.max_image_pixels, video_sample=d.video_sample,
        min_num_frames=d.min_num_frames, max_num_frames=d.max_num_frames, jpeg_draft=d.jpeg_draft,
        fast_resize=d.fast_resize, exif_transpose=d.exif_transpose, alpha_background=d.alpha_background,
    )


def prepare_data(cfg: RunConfig, tokenizer, settings: EncodeSettings, meta: str, train: bool):
    specs = load_meta(meta)
    result = audit(specs, tokenizer, settings, objective=cfg.train.objective, workers=audit_workers())
    print0(format_report(result))
    if result.problems:
        if not cfg.data.skip_invalid:
            raise UserError(
                f"the data audit of {meta} found {len(result.problems)} bad sample(s) (listed above); fix them, "
                "or set data.skip_invalid=true to train on the valid ones (they are counted and logged)")
        print0(f"skipping {len(result.problems)} invalid sample(s) (data.skip_invalid=true)")
    if not result.valid:
        raise UserError(f"{meta}: no valid sample to train on")
    dataset = PreferenceDataset if cfg.train.objective == "mpo" else SupervisedDataset
    return dataset(result, tokenizer, settings, train=train, seed=cfg.train.seed), result, specs


def split_heldout(ds: SupervisedDataset, fraction: float, seed: int) -> tuple[SupervisedDataset, SupervisedDataset]:
    """Hold out a deterministic fraction of the distinct samples (repeats of one line stay on one side)."""
    import copy

    distinct = sorted({ln.index for ln in ds.lines})
    k = max(1, round(fraction * len(distinct)))
    if k >= len(distinct):
        raise UserError(f"data.eval_fraction {fraction} leaves no training sample ({len(distinct)} samples)")
    held = set(random.Random(seed).sample(distinct, k))
    train_ds, eval_ds = copy.copy(ds), copy.copy(ds)
    keep = [i for i, ln in enumerate(ds.lines) if ln.index not in held]
    train_ds.lines = [ds.lines[i] for i in keep]
    train_ds.lengths = [ds.lengths[i] for i in keep]
    seen, ev = set(), []
    for i, ln in enumerate(ds.lines):
        if ln.index in held and ln.index not in seen:
            seen.add(ln.index)
            ev.append(i)
    eval_ds.lines = [ds.lines[i] for i in ev]
    eval_ds.lengths = [ds.lengths[i] for i in ev]
    eval_ds.train = False
    return train_ds, eval_ds


def longest_micro_batch(cfg: RunConfig, lengths: list[int]) -> int:
    """Tokens of the run's largest micro-batch: the token budget, or the batch of its longest sample
    (padded batches are that wide; packed ones at most that long; a preference pair's length counts both
    answers)."""
    if cfg.data.max_tokens_per_batch:
        return cfg.data.max_tokens_per_batch
    longest = max(lengths, default=0)
    return cfg.train.per_device_batch_size * longest


def train(cfg: RunConfig) -> Path:
    """Train as `cfg` says; returns the final adapter folder. Torch's process-wide switches that the speed
    options change are restored when it returns or fails, and a process group that training started
    (under torchrun) is closed once every rank is done."""
    started_here = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    done = False
    try:
        with backend_switches_restored():
            adapter = _train(cfg)
        done = True
        return adapter
    finally:
        if started_here and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Left to the interpreter's shutdown, the process group's threads can outlive what they use: gloo
            # then aborts a rank at exit ("terminate called without an active exception") and torchrun reports
            # the run as failed. So: free the Trainer's reference cycles (they hold the DDP module, which holds
            # the group), let every rank finish its writes, then close the group.
            import gc

            gc.collect()
            if done:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def _train(cfg: RunConfig) -> Path:
    t_start = time.time()
    t = cfg.train
    out = Path(t.output_dir)
    # Nothing is written before the checks (a refused run leaves no trace) and the data audit.
    check_output_dir(out, t.resume, t.overwrite)
    resume = None
    if t.resume:
        resume = find_resume_checkpoint(out)
        if resume:
            check_resume_state(out, resume, sys.argv)
            check_resume_compatible(out, cfg)
        print0(f"resuming from {resume}" if resume else f"no complete checkpoint in {out} to resume from; starting fresh")

    info = inspect_checkpoint(cfg.model.path)
    check_packing(info.llm_type, cfg.data.packing)
    tokenizer = load_tokenizer(cfg.model.path)
    settings = encode_settings(cfg, info)
    print0(f"checkpoint {cfg.model.path}: format {info.format}, template {settings.template.name}, "
           f"tile {settings.tile_size}px x {settings.tokens_per_tile} tokens, max {settings.max_dynamic_patch} tiles")
    train_ds, _, specs = prepare_data(cfg, tokenizer, settings, cfg.data.meta, train=True)
    eval_ds, eval_specs = None, []
    if cfg.data.eval_meta:
        eval_ds, _, eval_specs = prepare_data(cfg, tokenizer, settings, cfg.data.eval_meta, train=False)
    elif cfg.data.eval_fraction > 0:
        train_ds, eval_ds = split_heldout(train_ds, cfg.data.eval_fraction, t.seed)
        print0(f"held out {len(eval_ds)} of {len(eval_ds) + len({ln.index for ln in train_ds.lines})} samples "
               f"(data.eval_fraction={cfg.data.eval_fraction}) for evaluation")
    data_fp = {"train": fingerprint([s.annotation for s in specs]), "train_samples": len(train_ds)}
    if eval_ds is not None:
        data_fp["eval_samples"] = len(eval_ds)
        if eval_specs:
            data_fp["eval"] = fingerprint([s.annotation for s in eval_specs])

    dtype = resolve_dtype(cfg.model.dtype)
    if cfg.policy.init in MUTATING_INITS and zero_stage(t.deepspeed) == 3:
        raise UserError(f"policy.init={cfg.policy.init} is not supported with DeepSpeed ZeRO-3 (the adapter "
                        "conversion needs whole weights); use ZeRO-1/2, DDP or policy.init=default")
    if is_main() and t.overwrite and earlier_run(out):
        print0(f"train.overwrite=true: deleting the earlier run in {out} ({', '.join(earlier_run(out))})")
        clear_earlier_run(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create train.output_dir {out}: {e.strerror or e}") from None
    if is_main():
        save_config(cfg, out / "config.yaml")
    # TrainingArguments before the model: with ZeRO-3 the weights are then partitioned while loading.
    args = training_arguments(cfg, out, dtype, eval_ds is not None)

    from transformers import set_seed

    set_seed(t.seed)  # LoRA init (and PiSSA's randomised SVD) reproducible
    model = load_model(cfg.model.path, dtype=dtype)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    for note in set_attention(model, cfg.model.attn_implementation):
        print0(note)
    if cfg.data.packing:  # attention within each packed sample (torch varlen on a GPU)
        model.set_attn_implementation({"text_config": register_varlen_attention()})
        print0(f"attention: LLM per packed sample (data.packing; unpacked batches such as generation use SDPA), "
               f"vision tower {cfg.model.attn_implementation}")
    sharded = sharded_weights(t)
    speed = speed_options(model, t, before_adapters=True, sharded=sharded)
    model = apply_policy(model, cfg.policy, info.llm_type)
    speed += speed_options(model, t, before_adapters=False, sharded=sharded)
    if image_tokens_checked_on_the_gpu(model):
        speed.append("image tokens checked on the GPU (no host sync)")
    if speed:
        print0("speed options: " + "; ".join(speed))
    init_dir = None
    if cfg.policy.init in MUTATING_INITS and is_peft(model):
        init_dir = out / INIT_ADAPTER
        if is_main() and not (resume and (init_dir / "adapter_config.json").exists()):
            save_initial_adapter(model, init_dir)
    table = trainable_table(model, cfg.policy)
    print0(format_table(table, cfg.policy))
    meta = run_metadata(cfg, info, settings, data_fp)
    meta["trainable"] = table
    if is_main():
        write_json(out / RUN_META, meta)
        write_json(out / "trainable_params.json", table)

    stats = StepStats()
    resume_step = read_json(resume / "trainer_state.json")["global_step"] if resume else None
    log = LogLine(stats, out, print_fn=print0, resume_step=resume_step, is_main=is_main())
    curve = LossCurve(log, out)
    callbacks: list = [log, curve]
    watchdog = None
    if t.watchdog:
        # float16 loss scaling skips the first optimizer steps (overflow): give the adapters longer to move.
        lora_check = t.watchdog_lora_steps + (40 if dtype == torch.float16 else 0)
        watchdog = Watchdog(stats, model, lora_check_step=lora_check, max_grad_norm_alarm=t.watchdog_grad_norm)
        callbacks.append(watchdog)
    gen_eval = None
    if t.generate_steps and eval_ds is not None:
        gen_eval = GenerationEval(generation_samples(eval_ds.lines, t.generate_samples), tokenizer, settings,
                                  t.generate_steps, t.generate_max_new_tokens, t.eval_batch_size or t.per_device_batch_size)
        gen_eval.watchdog = watchdog
        callbacks.append(gen_eval)
    dummy = t.dummy_vision == "always" or (t.dummy_vision == "auto" and world_size() > 1)
    preference = None
    if t.objective == "mpo":
        p = cfg.preference
        preference = PreferenceObjective(model, p.beta, p.sigmoid_weight, p.bco_pair_weight, p.sft_weight, dummy,
                                         shared_tiles=not sharded)
        pref_state = PreferenceState(preference.running)
        callbacks.append(pref_state)
        if resume and not pref_state.restore(resume):
            raise UserError(f"{resume} holds no preference state (the BCO running mean): it was not written by an "
                            "MPO run; start a new run (train.overwrite=true) instead of resuming")
    trainer = InternVLTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=data_collator(tokenizer, settings, dummy, cfg.data.packing, preference=preference is not None,
                                    sharded=sharded),
        callbacks=callbacks, stats=stats, lengths=train_ds.lengths, fast_loss=cfg.data.packing,
        loss_reduction=t.loss_reduction, token_budget=cfg.data.max_tokens_per_batch, preference=preference,
        measure=log.measure,
    )
    if not sharded:  # (partitioned weights are whole only inside the wrapped forward)
        trainer.add_callback(_KernelWarmUp(model))
    if t.gradient_checkpointing and t.checkpoint_layers != 1 and not sharded:
        trainer.add_callback(_CheckpointShare(model, t.checkpoint_layers, longest_micro_batch(cfg, train_ds.lengths)))
    trainer.remove_callback(PrinterCallback)  # the LogLine prints instead of raw dicts
    if t.fsdp and not trainer.is_fsdp_enabled:
        print0("warning: train.fsdp is set, but accelerate enables FSDP on GPUs only: this run uses DDP")
    use_tensorboard_dir(trainer, out / "tensorboard")
    if gen_eval is not None:
        gen_eval.trainer = trainer

    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except KeyboardInterrupt:
        last = last_complete_checkpoint(out)
        print0("\ninterrupted: " + (f"the last complete checkpoint is {last}" if last else
                                   f"no checkpoint was complete yet (one every train.save_steps={t.save_steps} steps)"))
        print0(f"to continue: {resume_command(out, sys.argv, t.overwrite)}")
        raise  # cli.py exits 130
    if watchdog and watchdog.diagnosis:
        if is_main():
            log.write({"step": trainer.state.global_step, "watchdog": watchdog.diagnosis})
        raise TrainingHealthError(f"training stopped by the loss-health watchdog: {watchdog.diagnosis}")
    evaluated_last = any("eval_loss" in r and r.get("step") == trainer.state.global_step
                         for r in trainer.state.log_history)
    if eval_ds is not None and not evaluated_last:
        trainer.evaluate()  # logged through LogLine (metrics.jsonl, tensorboard)

    adapter_dir = save_final(trainer, out, init_dir)
    if is_main():
        tokenizer.save_pretrained(adapter_dir)
        for name in ("preprocessor_config.json", "generation_config.json"):
            if (Path(cfg.model.path) / name).exists():
                (adapter_dir / name).write_bytes((Path(cfg.model.path) / name).read_bytes())
        meta["train_seconds"] = round(time.time() - t_start, 1)
        meta["global_step"] = trainer.state.global_step
        meta["final_loss"] = next((r["loss"] for r in reversed(log.history) if "loss" in r), None)
        final_eval = next((r for r in reversed(log.history) if "eval_loss" in r), None)
        if final_eval:
            meta["final_eval_loss"] = final_eval["eval_loss"]
        if gen_eval is not None and gen_eval.results:
            meta["final_generation_eval"] = gen_eval.results[-1]
        write_json(adapter_dir / RUN_META, meta)
        save_config(cfg, adapter_dir / "config.yaml")
        curve.write()
        print0(f"adapter saved to {adapter_dir}")
        print0(f"metrics: {out / 'metrics.jsonl'}, loss curve: {out / 'loss_curve.png'}"
               + (f", tensorboard: tensorboard --logdir {out / 'tensorboard'}" if "tensorboard" in t.report_to else ""))
        print0(f"next: internvl-lora merge {adapter_dir} MERGED")
    return adapter_dir
